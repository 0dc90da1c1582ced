//! `berth recover`: builds a fresh metadata store from the bucket alone (the verified blobs
//! and the journal, see [`crate::meta::journal`]), with progress on stdout: the store the
//! config names, `meta.redb` in the data directory or a PostgreSQL database (an empty one,
//! its schema migrated here). No node may serve that store meanwhile.

use std::time::Instant;

use crate::config::{Config, MetadataConfig};
use crate::meta::journal::{self, Progress, Replayer};
use crate::server::{reach_storage, Backend, StartError};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("{0}")]
    Meta(#[from] crate::meta::MetaError),
    #[error(
        "the metadata store {0} is not empty: move it away (or delete it), or name an empty \
         database, to rebuild it from the bucket"
    )]
    NotFresh(String),
    #[error("bucket {0:?} holds no journal record and no verified blob: nothing to recover")]
    NothingInBucket(String),
}

/// Progress lines on stdout (the command's output is for the operator).
struct PrintProgress;

impl Progress for PrintProgress {
    fn report(&self, line: &str) {
        println!("{line}");
    }
}

/// The store the config names, for people (never the database URL: it may hold a password).
fn describe(config: &Config) -> String {
    match &config.metadata {
        MetadataConfig::Redb => config.data_dir.join("meta.redb").display().to_string(),
        MetadataConfig::Postgres(pg) => {
            let db = pg
                .url
                .parse::<tokio_postgres::Config>()
                .ok()
                .and_then(|c| c.get_dbname().map(str::to_owned));
            match db {
                Some(db) => format!("PostgreSQL database {db:?}"),
                None => "PostgreSQL (metadata.postgres.url)".to_owned(),
            }
        }
    }
}

pub fn run(config: Config) -> Result<(), RecoverError> {
    crate::server::prepare_data_dir(&config)?;
    let what = describe(&config);
    let backend = Backend::open(&config)?;
    let (rt, store) = reach_storage(&config, backend.meta())?;
    let meta = backend.meta();
    let started = Instant::now();
    rt.block_on(async {
        if !journal::is_fresh(meta).await? {
            return Err(RecoverError::NotFresh(what));
        }
        if !journal::bucket_has_records(&store).await? {
            return Err(RecoverError::NothingInBucket(store.bucket().to_string()));
        }
        println!(
            "recovering {what} from bucket {:?} (prefix {:?})",
            store.bucket(),
            store.prefix()
        );
        let replayer = Replayer {
            store: &store,
            meta,
            concurrency: config.journal.rebuild_concurrency,
            progress: &PrintProgress,
        };
        // redb: commits without the fsync until the end; both: GC touches keep queued times.
        backend.set_replaying(true);
        if let Backend::Redb(redb) = &backend {
            redb.begin_bulk();
        }
        let stats = replayer.rebuild().await;
        if let Backend::Redb(redb) = &backend {
            redb.end_bulk().await?;
        }
        backend.set_replaying(false);
        let stats = stats?;
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        meta.set_journal_watermark(&now).await?;
        let mut repos = 0usize;
        let mut last: Option<String> = None;
        loop {
            let page = meta.repositories(last.as_deref(), 1000).await?;
            repos += page.len();
            match page.last() {
                Some(l) if page.len() == 1000 => last = Some(l.clone()),
                _ => break,
            }
        }
        println!(
            "recovered in {:.1?}: {repos} repositories; {stats}",
            started.elapsed()
        );
        Ok(())
    })
}
