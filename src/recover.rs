//! `berth recover`: builds a fresh metadata store from the bucket alone (the verified blobs
//! and the journal, see [`crate::meta::journal`]), with progress on stdout.

use std::time::Instant;

use crate::config::Config;
use crate::meta::journal::{self, Progress, Replayer};
use crate::meta::redb::RedbStore;
use crate::meta::MetaStore;
use crate::server::{reach_storage, StartError};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("{0}")]
    Meta(#[from] crate::meta::MetaError),
    #[error(
        "the metadata store {0} is not empty: move it away (or delete it) to rebuild it from \
         the bucket"
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

pub fn run(config: Config) -> Result<(), RecoverError> {
    crate::server::prepare_data_dir(&config)?;
    let path = config.data_dir.join("meta.redb");
    let meta = RedbStore::open(&path).map_err(StartError::from)?;
    let (config, rt, store, _) = reach_storage(config, &meta)?;
    let started = Instant::now();
    rt.block_on(async {
        if !journal::is_fresh(&meta).await? {
            return Err(RecoverError::NotFresh(path.display().to_string()));
        }
        if !journal::bucket_has_records(&store).await? {
            return Err(RecoverError::NothingInBucket(store.bucket().to_string()));
        }
        println!(
            "recovering {} from bucket {:?} (prefix {:?})",
            path.display(),
            store.bucket(),
            store.prefix()
        );
        let replayer = Replayer {
            store: &store,
            meta: &meta,
            concurrency: config.journal.rebuild_concurrency,
            progress: &PrintProgress,
        };
        meta.begin_bulk();
        let stats = replayer.rebuild().await;
        meta.end_bulk().await?;
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
