//! Start-up: open the metadata store, start or reach the object store, check the bucket, and
//! run the pingora server with the registry service and its background tasks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;

use crate::config::Config;
use crate::config::MetadataConfig;
use crate::http::access_log::AccessLog;
use crate::http::ops::{OpsApp, Readiness, ReadinessProbe};
use crate::http::service::BerthService;
use crate::meta::instrumented::Instrumented;
use crate::meta::journal::{self, Journal, Journaled, LogProgress, Replayer};
use crate::meta::postgres::PgStore;
use crate::meta::redb::RedbStore;
use crate::meta::MetaStore;
use crate::mirror::Mirrors;
use crate::registry::{Registry, RegistrySettings};
use crate::storage::embedded::{EmbeddedOptions, EmbeddedS3};
use crate::storage::ObjectStore;

/// Access key id of the embedded object store (its secret is random per start).
pub const EMBEDDED_ACCESS_KEY: &str = "berth-embedded";

/// Everything that can stop berth from starting, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {cause}")]
    DataDir { path: String, cause: std::io::Error },
    #[error("{0}")]
    Meta(#[from] crate::meta::MetaError),
    #[error("embedded object store: {0}")]
    Embedded(std::io::Error),
    #[error("object store: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("{0}")]
    Mirror(String),
}

/// Resolves the storage settings (starting the embedded S3 endpoint when none is configured)
/// and checks that the bucket is reachable.
pub fn prepare(config: Config) -> Result<(Config, Arc<Registry>), StartError> {
    let (config, rt, probe) = reach_storage(config)?;
    let store = Arc::new(ObjectStore::new(&config.storage)?);
    let meta: Arc<dyn MetaStore> = match &config.metadata {
        MetadataConfig::Redb => {
            let redb = RedbStore::open(&config.data_dir.join("meta.redb"))?;
            if config.journal.enabled {
                rt.block_on(bring_up_to_date(&redb, Some(&redb), &probe, &config))?;
            }
            with_journal(redb, &config, &store)
        }
        MetadataConfig::Postgres(pg) => {
            // Before serving, on the throwaway runtime: nodes starting together take turns.
            let migrated = rt.block_on(crate::meta::postgres::migrate(pg))?;
            log::info!(
                "metadata: PostgreSQL, schema version {}{}",
                crate::meta::postgres::SCHEMA_VERSION,
                if migrated.applied.is_empty() {
                    " (up to date)"
                } else {
                    ""
                }
            );
            let pgstore = PgStore::connect(pg)?;
            let pool = pgstore.clone();
            crate::metrics::register_metadata_pool(move || pool.pool_status());
            if config.journal.enabled {
                rt.block_on(bring_up_to_date(&pgstore, None, &probe, &config))?;
            }
            with_journal(pgstore, &config, &store)
        }
    };
    drop(rt);
    let registry = Registry::new(meta, store, RegistrySettings::from_config(&config))
        .with_mirrors(Mirrors::from_config(&config.proxy).map_err(StartError::Mirror)?);
    Ok((config, Arc::new(registry)))
}

/// The backend as the registry sees it: timed, and journaled unless `journal.enabled` is off.
fn with_journal<M: MetaStore>(
    meta: M,
    config: &Config,
    store: &Arc<ObjectStore>,
) -> Arc<dyn MetaStore> {
    if config.journal.enabled {
        let journal = Arc::new(Journal::new(store.clone()));
        Arc::new(Instrumented::new(Journaled::new(meta, journal)))
    } else {
        log::warn!("journal.enabled is false: the bucket cannot rebuild the metadata store");
        Arc::new(Instrumented::new(meta))
    }
}

/// Creates the data directory, starts the embedded S3 endpoint when the config names none,
/// and checks the bucket. The check runs on a throwaway runtime with its own client (`probe`),
/// so that no pooled connection outlives the runtime it was made on: start-up work in the
/// bucket (catch-up, rebuild) runs on the same pair, which the caller drops before serving.
pub fn reach_storage(
    mut config: Config,
) -> Result<(Config, tokio::runtime::Runtime, ObjectStore), StartError> {
    let dir_err = |cause| StartError::DataDir {
        path: config.data_dir.display().to_string(),
        cause,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(dir_err)?;

    if config.storage.endpoint.is_none() {
        // A new secret every start. The access key id stays the same: s3s-fs binds an
        // in-progress multipart upload to the key id that created it, and an upload must
        // survive a restart of berth. The key id is not a secret.
        let (_, secret_key) = EmbeddedS3::random_keys();
        let s3 = EmbeddedS3::start(EmbeddedOptions {
            root: config.data_dir.join("objects"),
            bucket: config.storage.bucket.clone(),
            listen: "127.0.0.1:0".parse().expect("loopback address"),
            access_key: EMBEDDED_ACCESS_KEY.to_string(),
            secret_key,
            request_counter: None,
            refuse_writes: None,
        })
        .map_err(StartError::Embedded)?;
        log::info!("embedded object store on {}", s3.endpoint);
        config.storage.endpoint = Some(s3.endpoint);
        config.storage.access_key = s3.access_key;
        config.storage.secret_key = s3.secret_key;
    }

    let probe = ObjectStore::new(&config.storage)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Embedded)?;
    rt.block_on(probe.check())?;
    Ok((config, rt, probe))
}

/// The journal at start: a store that never saw the journal is rebuilt from the bucket when
/// the bucket has records (and says so in the log); any other store replays the records
/// from its watermark on, which repairs a crash between a record and its local commit.
async fn bring_up_to_date(
    meta: &dyn MetaStore,
    bulk: Option<&RedbStore>,
    store: &ObjectStore,
    config: &Config,
) -> Result<(), StartError> {
    let replayer = Replayer {
        store,
        meta,
        concurrency: config.journal.rebuild_concurrency,
        progress: &LogProgress,
    };
    match meta.journal_watermark().await? {
        Some(watermark) => {
            let stats = replayer.catch_up(Some(&watermark)).await?;
            if stats.total_records() > 0 {
                log::info!("journal: caught up from the bucket after {watermark}: {stats}");
            }
        }
        None if journal::bucket_has_records(store).await? => {
            let fresh = journal::is_fresh(meta).await?;
            log::info!(
                "journal: the metadata store at {} has no journal watermark{} and bucket {:?} \
                 has records: rebuilding it from the bucket",
                config.data_dir.join("meta.redb").display(),
                if fresh { " (it is empty)" } else { "" },
                store.bucket(),
            );
            if let Some(redb) = bulk {
                redb.begin_bulk();
            }
            let stats = replayer.rebuild().await;
            if let Some(redb) = bulk {
                redb.end_bulk().await?;
            }
            log::info!(
                "journal: metadata store rebuilt from the bucket: {}",
                stats?
            );
        }
        None => {}
    }
    // Nothing of this process is in flight before the server starts: every record so far is
    // applied. (Records other nodes are still committing are within CATCH_UP_MARGIN.)
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    meta.set_journal_watermark(&now).await?;
    Ok(())
}

/// Runs the server until it is told to stop. Never returns.
pub fn run(config: Config, registry: Arc<Registry>) -> ! {
    crate::auth::ignore_sighup_until_listening();
    let guard = match crate::auth::Guard::from_config(&config) {
        Ok(g) => Arc::new(g),
        Err(e) => fail_start(&e),
    };
    let tls = match config.tls.as_ref().map(crate::tls::settings).transpose() {
        Ok(t) => t,
        Err(e) => fail_start(&e),
    };
    let conf = ServerConf {
        threads: config.threads,
        // Without this pingora waits 5 min on SIGTERM even when idle.
        grace_period_seconds: Some(config.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let access_log = AccessLog::new(config.access_log.then_some(config.log_format));
    let mut http = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        BerthService::new(registry.clone())
            .with_guard(guard.clone())
            .with_access_log(access_log.clone()),
        "berth registry",
    );
    let resolver = match tls {
        Some((settings, resolver)) => {
            http.add_tls_with_settings(&config.listen.to_string(), None, settings);
            Some(resolver)
        }
        None => {
            http.add_tcp(&config.listen.to_string());
            None
        }
    };
    server.add_service(http);
    let collector = crate::gc::command::collector_for(&registry, &config);
    // One claim holder name per process, for every background task.
    let node = uuid::Uuid::new_v4().to_string();
    if let Some(every) = config.gc.interval {
        server.add_service(background_service(
            "garbage collection",
            GcLoop {
                collector: collector.clone(),
                registry: registry.clone(),
                node: node.clone(),
                every,
            },
        ));
    }
    server.add_service(background_service(
        "SIGHUP reload",
        crate::auth::HangupReload {
            guard,
            tls: resolver,
        },
    ));
    if let Some(addr) = config.metrics.listen {
        crate::metrics::init();
        let readiness = Readiness::new();
        let mut ops = Service::new(
            "berth ops".to_string(),
            OpsApp {
                readiness: readiness.clone(),
                gc: collector,
            },
        );
        ops.add_tcp(&addr.to_string());
        server.add_service(ops);
        server.add_service(background_service(
            "readiness probe",
            ReadinessProbe {
                registry: registry.clone(),
                readiness,
            },
        ));
        log::info!("metrics and health on http://{addr}/metrics, /healthz, /readyz");
    }
    server.add_service(background_service(
        "upload expiry",
        UploadExpiry { registry, node },
    ));
    log::info!(
        "berth {} listening on {}{}",
        env!("CARGO_PKG_VERSION"),
        config.listen,
        if config.tls.is_some() { " (TLS)" } else { "" }
    );
    server.run(RunArgs::default());
    // The lines of the last requests may still be in the access log's buffer.
    access_log.flush();
    std::process::exit(0)
}

fn fail_start(e: &str) -> ! {
    eprintln!("berth: cannot start: {e}");
    std::process::exit(1)
}

/// Runs a garbage-collection pass every `gc.interval`, on one node at a time: the node holding
/// the claim [`GC_PASS`] (several collectors would be safe, every decision being one
/// transaction, but would only compete for the same rows).
struct GcLoop {
    collector: Arc<crate::gc::Collector>,
    registry: Arc<Registry>,
    /// This node's claim holder name.
    node: String,
    every: Duration,
}

const GC_PASS: &str = "task:gc";

#[async_trait]
impl BackgroundService for GcLoop {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    match self.registry.meta.claim(GC_PASS, &self.node, self.every * 3).await {
                        Ok(true) => {}
                        Ok(false) => continue, // another node's turn
                        Err(e) => {
                            log::warn!("gc: {e}");
                            continue;
                        }
                    }
                    if let Err(e) = self.collector.run(crate::gc::GcOptions::default()).await {
                        log::warn!("gc: {e}");
                    }
                }
            }
        }
    }
}

/// Aborts upload sessions idle past `upload.session_expiry`, on one node at a time: the node
/// holding the claim [`UPLOAD_EXPIRY`] (renewed every round; another node takes over when it
/// lapses).
struct UploadExpiry {
    registry: Arc<Registry>,
    /// This node's claim holder name.
    node: String,
}

const UPLOAD_EXPIRY: &str = "task:upload-expiry";

#[async_trait]
impl BackgroundService for UploadExpiry {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let every = (self.registry.settings.session_expiry / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(300));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let meta = &self.registry.meta;
                    match meta.claim(UPLOAD_EXPIRY, &self.node, every * 3).await {
                        Ok(true) => {}
                        Ok(false) => continue, // another node's turn
                        Err(e) => {
                            log::warn!("upload expiry: {e}");
                            continue;
                        }
                    }
                    match self.registry.expire_uploads().await {
                        Ok(0) => {}
                        Ok(n) => log::info!("expired {n} idle upload sessions"),
                        Err(e) => log::warn!("upload expiry: {e}"),
                    }
                }
            }
        }
    }
}
