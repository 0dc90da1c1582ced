//! The `berth` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use berth::config::{Config, Overrides};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "OCI Distribution v1.1 registry gateway to S3-compatible storage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry (embedded object store unless the config names storage.endpoint).
    Serve {
        /// YAML config file (see conf/berth.yaml); built-in defaults when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on; overrides `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory for metadata and embedded objects; overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Load and validate the config, print it (secrets redacted), and exit.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Bring the PostgreSQL metadata schema up to date (`metadata.backend: postgres`) and
    /// exit, without serving. `serve` does the same at start.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Metadata maintenance.
    Metadata {
        #[command(subcommand)]
        command: MetadataCommand,
    },
}

#[derive(Subcommand)]
enum MetadataCommand {
    /// Copy every repository, tag, manifest, blob record, referrer and open upload session
    /// from a redb file to a PostgreSQL database (moving from one node to many). Stop the
    /// berth that uses the redb file first. Running it again is harmless.
    Copy {
        /// `redb:PATH` (e.g. redb:/var/lib/berth/meta.redb).
        #[arg(long)]
        from: String,
        /// `postgres:URL` (e.g. postgres:postgres://berth@db/berth); `_env:NAME` reads the URL
        /// from the environment.
        #[arg(long)]
        to: String,
    },
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => {
            match Config::load(config.as_deref(), &Overrides::default()) {
                Ok(c) => {
                    println!("config ok: {c:#?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("berth: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Migrate { config } => {
            let config = match Config::load(Some(&config), &Overrides::default()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("berth: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&config.log_level);
            report(berth::meta::postgres::migrate_command(&config))
        }
        Command::Metadata {
            command: MetadataCommand::Copy { from, to },
        } => {
            init_logging("info");
            report(berth::meta::copy::copy_command(&from, &to))
        }
        Command::Serve {
            config,
            listen,
            data_dir,
        } => {
            let overrides = Overrides { listen, data_dir };
            let config = match Config::load(config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("berth: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&config.log_level);
            let _ = rustls::crypto::ring::default_provider().install_default();
            match berth::server::prepare(config) {
                Ok((config, registry)) => berth::server::run(config, registry),
                Err(e) => {
                    eprintln!("berth: cannot start: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// A maintenance command's outcome: its summary on stdout, or its error and exit status 1.
fn report(outcome: Result<String, String>) -> ExitCode {
    match outcome {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::from(1)
        }
    }
}

/// `RUST_LOG` wins over the config's `log_level`.
fn init_logging(level: &str) {
    let env = env_logger::Env::default().default_filter_or(level);
    env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .init();
}

/// Part buffers (`upload.part_size`, 8 MiB by default) are the only large allocations berth
/// makes. glibc's dynamic mmap threshold rises to their size once the first one is freed, after
/// which freed buffers stay in per-thread arenas: RSS then plateaus ~20 MiB above the working
/// set. A fixed threshold keeps every part buffer an mmap that goes back to the system when
/// freed, so peak memory is the working set. `MALLOC_MMAP_THRESHOLD_`, if set, wins.
///
/// Fixing the mmap threshold also leaves the trim threshold at glibc's 128 KiB, so the arena top
/// was handed back (madvise) after nearly every proxied blob chunk (~300 KiB) and faulted in and
/// zeroed again for the next: ~12% of berth's CPU per proxied GiB. Up to 1 MiB of free arena top
/// is kept instead. `MALLOC_TRIM_THRESHOLD_`, if set, wins.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (env, param) in [
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only changes allocator tunables; called before any thread starts.
            unsafe {
                libc::mallopt(param, 1 << 20);
            }
        }
    }
}
