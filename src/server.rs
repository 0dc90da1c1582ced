//! Start-up: open the metadata store, start or reach the object store, check the bucket, and
//! run the pingora server with the registry service and its background tasks.

use std::collections::HashSet;
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
use crate::http::drain::{Drain, InFlight};
use crate::http::ops::{OpsApp, Readiness, ReadinessProbe};
use crate::http::service::BerthService;
use crate::meta::instrumented::Instrumented;
use crate::meta::journal::{self, Journal, Journaled, LogProgress, Replayer};
use crate::meta::postgres::PgStore;
use crate::meta::redb::RedbStore;
use crate::meta::MetaStore;
use crate::mirror::Mirrors;
use crate::registry::{Registry, RegistrySettings};
use crate::storage::{local, ObjectStore};

/// Everything that can stop berth from starting, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {cause}")]
    DataDir { path: String, cause: std::io::Error },
    #[error("{0}")]
    Meta(#[from] crate::meta::MetaError),
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    #[error("object store: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("{0}")]
    Mirror(String),
}

/// Opens the metadata store, opens the object store (the local one when no endpoint is
/// configured) and checks that the bucket is reachable; then brings the metadata store up to
/// date with the bucket journal.
pub fn prepare(config: Config) -> Result<(Config, Arc<Registry>), StartError> {
    prepare_data_dir(&config)?;
    // First the metadata store: redb's lock stops a second berth on the same data directory
    // here, before it touches the local store's files.
    let backend = Backend::open(&config)?;
    let (rt, probe) = reach_storage(&config, backend.meta())?;
    let store = Arc::new(open_object_store(&config)?);
    if config.journal.enabled {
        rt.block_on(bring_up_to_date(&backend, &probe, &config))?;
    } else {
        log::warn!("journal.enabled is false: the bucket cannot rebuild the metadata store");
    }
    drop(rt);
    let meta = backend.into_registry_meta(&config, &store);
    let registry = Registry::new(meta, store, RegistrySettings::from_config(&config))
        .with_mirrors(Mirrors::from_config(&config.proxy).map_err(StartError::Mirror)?);
    Ok((config, Arc::new(registry)))
}

/// The metadata backend the config names, opened.
pub(crate) enum Backend {
    Redb(RedbStore),
    Postgres(PgStore),
}

impl Backend {
    /// redb at `data_dir/meta.redb`, or PostgreSQL (its schema migrated first).
    pub(crate) fn open(config: &Config) -> Result<Backend, StartError> {
        Ok(match &config.metadata {
            MetadataConfig::Redb => {
                Backend::Redb(RedbStore::open(&config.data_dir.join("meta.redb"))?)
            }
            MetadataConfig::Postgres(pg) => Backend::Postgres(connect_postgres(pg)?),
        })
    }

    pub(crate) fn meta(&self) -> &dyn MetaStore {
        match self {
            Backend::Redb(m) => m,
            Backend::Postgres(m) => m,
        }
    }

    /// The backend as the registry sees it: timed, and journaled unless `journal.enabled`
    /// is off.
    /// Replaying the bucket journal: GC touches keep queued times.
    pub(crate) fn set_replaying(&self, on: bool) {
        match self {
            Backend::Redb(m) => m.set_replaying(on),
            Backend::Postgres(m) => m.set_replaying(on),
        }
    }

    fn into_registry_meta(self, config: &Config, store: &Arc<ObjectStore>) -> Arc<dyn MetaStore> {
        fn wrap<M: MetaStore>(
            meta: M,
            config: &Config,
            store: &Arc<ObjectStore>,
        ) -> Arc<dyn MetaStore> {
            if config.journal.enabled {
                let journal = Arc::new(Journal::new(store.clone()));
                Arc::new(Instrumented::new(Journaled::new(meta, journal)))
            } else {
                Arc::new(Instrumented::new(meta))
            }
        }
        match self {
            Backend::Redb(m) => wrap(m, config, store),
            Backend::Postgres(m) => wrap(m, config, store),
        }
    }
}

/// Migrates the schema (nodes starting together take turns) and opens the pool, on a
/// throwaway runtime before serving.
fn connect_postgres(pg: &crate::config::PostgresConfig) -> Result<PgStore, StartError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
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
    let store = PgStore::connect(pg)?;
    let pool = store.clone();
    crate::metrics::register_metadata_pool(move || pool.pool_status());
    Ok(store)
}

/// Creates the data directory and proves it writable (a clear error at start, not at the
/// first push).
pub fn prepare_data_dir(config: &Config) -> Result<(), StartError> {
    let dir_err = |cause| StartError::DataDir {
        path: config.data_dir.display().to_string(),
        cause,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(dir_err)?;
    check_writable(&config.data_dir).map_err(dir_err)
}

/// The object store the config names: S3 at `storage.endpoint`, else the local store under
/// `<data_dir>/objects`.
pub fn open_object_store(config: &Config) -> Result<ObjectStore, StartError> {
    Ok(match config.storage.endpoint {
        Some(_) => ObjectStore::new(&config.storage)?,
        None => ObjectStore::local(&config.data_dir.join("objects"), &config.storage)?,
    })
}

/// Opens the object store and checks the bucket; for the local store, first sweeps what a
/// crash stranded there (uploads no session of `meta` names). The check runs on a throwaway
/// runtime with its own client (`probe`), so that no pooled connection outlives the runtime it
/// was made on: start-up work in the bucket (catch-up, rebuild) runs on the same pair, which
/// the caller drops before serving.
pub fn reach_storage(
    config: &Config,
    meta: &dyn MetaStore,
) -> Result<(tokio::runtime::Runtime, ObjectStore), StartError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    if config.storage.endpoint.is_none() {
        let root = config.data_dir.join("objects");
        let live: HashSet<String> = rt
            .block_on(meta.idle_uploads(u64::MAX))?
            .into_iter()
            .filter_map(|s| s.multipart_id)
            .collect();
        match local::sweep(&root, &live) {
            Ok(0) => {}
            Ok(n) => log::info!("local object store: removed {n} files stranded by a crash"),
            Err(e) => log::warn!("local object store: sweeping stranded files: {e}"),
        }
        log::info!("object store: local, under {}", root.display());
    }
    let probe = open_object_store(config)?;
    rt.block_on(probe.check())?;
    Ok((rt, probe))
}

/// The journal at start: a store that never saw the journal is rebuilt from the bucket when
/// the bucket has records (and says so in the log); any other store replays the records
/// from its watermark on, which repairs a crash between a record and its local commit.
async fn bring_up_to_date(
    backend: &Backend,
    store: &ObjectStore,
    config: &Config,
) -> Result<(), StartError> {
    let meta = backend.meta();
    let redb = match backend {
        Backend::Redb(r) => Some(r),
        Backend::Postgres(_) => None,
    };
    let replayer = Replayer {
        store,
        meta,
        concurrency: config.journal.rebuild_concurrency,
        progress: &LogProgress,
    };
    backend.set_replaying(true);
    let caught_up = catch_up(meta, redb, &replayer, store, config).await;
    backend.set_replaying(false);
    caught_up?;
    // Nothing of this process is in flight before the server starts: every record so far is
    // applied. (Records other nodes are still committing are within CATCH_UP_MARGIN.)
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    meta.set_journal_watermark(&now).await?;
    Ok(())
}

/// `bulk`: a redb store, whose commits skip the fsync during a rebuild.
async fn catch_up(
    meta: &dyn MetaStore,
    bulk: Option<&RedbStore>,
    replayer: &Replayer<'_>,
    store: &ObjectStore,
    config: &Config,
) -> Result<(), StartError> {
    match meta.journal_watermark().await? {
        Some(watermark) => {
            let stats = replayer.catch_up(Some(&watermark)).await?;
            if stats.total_records() > 0 || stats.superseded > 0 {
                log::info!("journal: caught up from the bucket after {watermark}: {stats}");
            }
        }
        None if journal::bucket_has_records(store).await? => {
            let fresh = journal::is_fresh(meta).await?;
            log::info!(
                "journal: the metadata store ({}) has no journal watermark{} and bucket {:?} \
                 has records: rebuilding it from the bucket",
                match &config.metadata {
                    MetadataConfig::Redb => config.data_dir.join("meta.redb").display().to_string(),
                    MetadataConfig::Postgres(_) => "PostgreSQL".to_string(),
                },
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
    Ok(())
}

/// The data directory takes new files: better said at start than at the first push.
fn check_writable(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(".berth-write-check");
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
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
    // pingora binds in its service threads, retries a used port for a while and then panics
    // there, leaving a process with no listener: find out here, in a second, and say so.
    for addr in std::iter::once(config.listen).chain(config.metrics.listen) {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            fail_start(&format!("cannot listen on {addr}: {e}"));
        }
    }
    let conf = ServerConf {
        threads: config.threads,
        // Without this pingora waits 5 min on SIGTERM even when idle.
        grace_period_seconds: Some(config.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    crate::http::transfers::init(config.threads, config.upload.transfer_nice);

    let access_log = AccessLog::new(config.access_log.then_some(config.log_format));
    let in_flight = InFlight::default();
    let mut http = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        BerthService::new(registry.clone())
            .with_guard(guard.clone())
            .with_access_log(access_log.clone())
            .with_in_flight(in_flight.clone()),
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
    let busy = {
        let in_flight = in_flight.clone();
        Arc::new(move || in_flight.count() > 0)
    };
    let collector = crate::gc::command::collector_for(&registry, &config, busy);
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
    server.add_service(background_service(
        "shutdown drain",
        Drain {
            in_flight,
            grace: config.shutdown_grace,
            access_log: access_log.clone(),
        },
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
                        Ok(pass) if pass.expired > 0 => {
                            log::info!("expired {} idle upload sessions", pass.expired)
                        }
                        Ok(_) => {} // failures are logged per session
                        Err(e) => log::warn!("upload expiry: listing idle sessions: {e:?}"),
                    }
                }
            }
        }
    }
}
