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
    /// Build a fresh metadata store (the configured one: data_dir/meta.redb, or a PostgreSQL
    /// database; either must be empty) from the bucket alone: the verified blobs and the journal.
    Recover {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Directory for the metadata store; overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Load and validate the config, print it (secrets redacted), and exit.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Adopt a CNCF distribution registry's storage in place: record its repositories, tags,
    /// manifests and blobs in berth's metadata store, the blobs under distribution's own
    /// objects (no blob byte is read or copied). Idempotent: a re-run adds only what is new.
    /// With the embedded redb store, berth must not be serving the same data_dir meanwhile.
    #[command(group(clap::ArgGroup::new("from").required(true).args(["from_bucket", "from_dir"])))]
    Import {
        /// berth's config (its metadata store and bucket).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// distribution's S3 storage is in berth's bucket (`storage.bucket`).
        #[arg(long)]
        from_bucket: bool,
        /// distribution's S3 `rootdirectory` (with --from-bucket), "" by default.
        #[arg(long, default_value = "", requires = "from_bucket")]
        root_directory: String,
        /// distribution's filesystem `rootdirectory`, adopted into the embedded object store
        /// by hard links.
        #[arg(long)]
        from_dir: Option<PathBuf>,
    },
    /// Run one garbage-collection pass and print what it deleted (asks a running `berth serve`
    /// through its metrics.listen when it answers there).
    Gc {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Directory for metadata and embedded objects; overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also walk every blob and manifest and queue strays the queue does not hold.
        #[arg(long)]
        full: bool,
        /// Also delete orphan objects and abort stale multipart uploads in the bucket.
        #[arg(long)]
        orphans: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
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
        Command::Import {
            config,
            data_dir,
            from_bucket: _,
            root_directory,
            from_dir,
        } => {
            let config = match load_tool_config(config, data_dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let from = match from_dir {
                Some(dir) => berth::import::command::From::Dir(dir),
                None => berth::import::command::From::Bucket { root_directory },
            };
            berth::import::command::run(config, from)
        }
        Command::Recover { config, data_dir } => {
            let config = match load_tool_config(config, data_dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match berth::recover::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("berth: recover: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Gc {
            config,
            data_dir,
            dry_run,
            full,
            orphans,
            json,
        } => {
            let config = match load_tool_config(config, data_dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let opts = berth::gc::GcOptions {
                dry_run,
                full,
                orphans,
            };
            match berth::gc::command::run(config, opts) {
                Ok(report) if json => {
                    println!("{}", serde_json::to_string(&report).expect("json"));
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("berth gc: {e}");
                    ExitCode::from(1)
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

/// The config of a one-shot command (import, recover, ...), with logging and TLS set up.
fn load_tool_config(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<Config, ExitCode> {
    let overrides = Overrides {
        listen: None,
        data_dir,
    };
    let config = Config::load(config.as_deref(), &overrides).map_err(|e| {
        eprintln!("berth: {e}");
        ExitCode::from(2)
    })?;
    init_logging(&config.log_level);
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(config)
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
