//! [`PgStore`]: the [`MetaStore`] on PostgreSQL, for many berth nodes sharing one database.
//!
//! # Driver
//!
//! tokio-postgres (the async half of rust-postgres, maintained for years, no ORM, no compile
//! time database) with a deadpool-postgres pool and rustls for TLS through
//! tokio-postgres-rustls: no OpenSSL, ring as elsewhere in berth. Statements are prepared once
//! per connection (`prepare_cached`).
//!
//! # Consistency across nodes
//!
//! Every method is one statement or one transaction at PostgreSQL's default READ COMMITTED
//! isolation, with the row it changes locked by the change itself: upserts (`ON CONFLICT`) for
//! the blob index, manifests, tags and links, so two nodes finishing the same digest or moving
//! the same tag serialize on that row; foreign keys with `ON DELETE CASCADE` so a tag or a
//! referrers entry never outlives its manifest. Nothing is cached: every read sees every
//! commit acknowledged before it began, on any node.
//!
//! Garbage collection decides with row locks, then looks in a later statement (a fresh
//! snapshot at READ COMMITTED, so it sees every writer that held the lock): a collection takes
//! the blob record (or the manifest row) `FOR UPDATE`; a manifest PUT takes its referenced blob
//! records and manifests `FOR SHARE` before checking its references, and links take the blob
//! record `FOR KEY SHARE` (the foreign key). Whichever comes second sees what the first did: a
//! PUT after a collection finds the reference gone ([`ManifestPut::MissingReference`]), a
//! collection after a PUT finds the blob referenced. Pruning an emptied repository takes its
//! catalog row `FOR UPDATE`; every write that adds to a repository holds that row
//! `FOR KEY SHARE` (see `list_repo`).
//!
//! Claims ([`MetaStore::claim`]) are rows with an expiry by the database's clock (one clock for
//! all nodes). A save under a claim locks the claim row (`FOR SHARE`) in its transaction, so a
//! writer whose claim has passed to another never commits.
//!
//! # The bucket journal's order
//!
//! [`MetaStore::journal_order`] holds the journal stripes a write touches as session advisory
//! locks (`pg_advisory_lock(ORDER_LOCK_CLASS, stripe)`, taken in stripe order: no deadlock) on a
//! connection of a pool of its own (a write holding it still takes a connection from the main
//! pool for its commit: sharing one pool, writers could take every connection and wait for
//! each other forever). Under the locks, one autocommitted upsert gives the write its record
//! time: after `journal_order.last_ms` of each stripe and not before the node's clock, stored
//! back before the record is written. The locks go with `pg_advisory_unlock_all()` after the
//! local commit, or with the connection when the node dies (or the guard is dropped).
//! [`MetaStore::journal_stripes`] holds stripes the same way for a catch-up replaying a record,
//! and reads their `last_ms` without moving them.
//!
//! # Errors
//!
//! A lost connection, a pool that cannot connect in time, a statement timeout, a server
//! shutting down or a standby refusing writes are [`MetaError::Unavailable`] (503 and
//! Retry-After to clients); the pool drops dead connections and opens new ones by itself when
//! the database returns.

mod migrations;
mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

pub use migrations::{migrate, Migrated, SCHEMA_VERSION};

/// Unix seconds by the database's clock (one clock for every node), at transaction start.
macro_rules! now_secs {
    () => {
        "floor(extract(epoch FROM now()))::bigint"
    };
}

use super::journal::{HeldStripes, OrderGuard};
use super::{
    upload_claim, BlobCollection, BlobRecord, Candidate, CandidateKind, Linked, ManifestPut,
    ManifestRecord, MetaError, MetaResult, MetaStore, Part, PendingChange, QueuedCandidate,
    Referrer, TagInfo, UploadSession,
};
use crate::config::PostgresConfig;
use crate::registry::names::Digest;

/// The PostgreSQL metadata store. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Connections holding journal order locks ([`MetaStore::journal_order`]).
    order_pool: Pool,
    /// Replaying the bucket journal at start: GC touches keep a candidate's queued time (a
    /// replayed record is old news; it must not put off a collection by another grace).
    replaying: Arc<AtomicBool>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// What the pool holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    pub in_use: usize,
    pub idle: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
    pub max: usize,
}

/// The driver's settings from berth's config: TLS as the URL's `sslmode` says, the statement
/// timeout as a connection option.
pub(crate) fn driver_config(
    c: &PostgresConfig,
) -> MetaResult<(
    tokio_postgres::Config,
    tokio_postgres_rustls::MakeRustlsConnect,
)> {
    // berth verifies the server's certificate whenever TLS is used, so libpq's verify-ca and
    // verify-full mean what the driver calls require.
    let url = c
        .url
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require");
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        // The driver's message names the bad part, never the password.
        MetaError::Failed(format!("metadata.postgres.url: {e}"))
    })?;
    config
        .application_name("berth")
        .connect_timeout(c.connect_timeout)
        .options(format!(
            "-c statement_timeout={}",
            c.statement_timeout.as_millis()
        ));
    let tls = tls::connector(c.ca_bundle.as_deref())
        .map_err(|e| MetaError::Failed(format!("metadata.postgres.ca_bundle: {e}")))?;
    Ok((config, tls))
}

/// `berth migrate`: applies the schema migrations of `config`'s database and says what it did.
pub fn migrate_command(config: &crate::config::Config) -> Result<String, String> {
    let crate::config::MetadataConfig::Postgres(pg) = &config.metadata else {
        return Err("metadata.backend is not postgres: there is nothing to migrate".into());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let m = rt.block_on(migrate(pg)).map_err(|e| e.to_string())?;
    Ok(if m.applied.is_empty() {
        format!("schema version {}: up to date", m.from)
    } else {
        format!(
            "schema version {} -> {} (applied {:?})",
            m.from, SCHEMA_VERSION, m.applied
        )
    })
}

impl PgStore {
    /// A pool for `c`. No connection is made until the first call: connections belong to the
    /// runtime that opens them, so they are opened by the runtimes that serve.
    pub fn connect(c: &PostgresConfig) -> MetaResult<PgStore> {
        let pool = |max_size: usize| {
            let (config, tls) = driver_config(c)?;
            let manager = Manager::from_config(
                config,
                tls,
                ManagerConfig {
                    // A connection whose socket closed (database restarted) is replaced when
                    // it is next taken from the pool.
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(max_size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(c.connect_timeout))
                .create_timeout(Some(c.connect_timeout))
                .recycle_timeout(Some(c.connect_timeout))
                .build()
                .map_err(|e| MetaError::Failed(format!("postgres pool: {e}")))
        };
        Ok(PgStore {
            pool: pool(c.max_connections)?,
            // Lazy like the main pool: as many as writes hold order locks at once.
            order_pool: pool(c.max_connections)?,
            replaying: Default::default(),
        })
    }

    /// Replay of the bucket journal on or off (see [`touch`]).
    pub fn set_replaying(&self, on: bool) {
        self.replaying.store(on, Ordering::SeqCst);
    }

    /// A transaction on `c`; while replaying, one whose GC touches keep queued times.
    async fn begin<'a>(
        &self,
        c: &'a mut deadpool_postgres::Object,
        what: &'static str,
    ) -> MetaResult<Tx<'a>> {
        let tx = c.transaction().await.map_err(db(what))?;
        if self.replaying.load(Ordering::SeqCst) {
            tx.batch_execute("SET LOCAL berth.keep_queued = 'on'")
                .await
                .map_err(db(what))?;
        }
        Ok(tx)
    }

    /// Writes every row of `snapshot` in one transaction, each as an upsert: a re-run changes
    /// nothing that the source did not change (`berth metadata copy`).
    pub async fn import(&self, snapshot: &super::copy::Snapshot) -> MetaResult<()> {
        const WHAT: &str = "import";
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        let st = |sql: &'static str| {
            let tx = &tx;
            async move { tx.prepare(sql).await.map_err(db(WHAT)) }
        };
        let repo = st("INSERT INTO repositories (name) VALUES ($1) ON CONFLICT DO NOTHING").await?;
        for name in &snapshot.repositories {
            tx.execute(&repo, &[name]).await.map_err(db(WHAT))?;
        }
        let blob = st(
            "INSERT INTO blobs (digest, size, object_key) VALUES ($1, $2, $3)
                       ON CONFLICT (digest) DO UPDATE SET size = EXCLUDED.size,
                         object_key = EXCLUDED.object_key",
        )
        .await?;
        for (digest, record) in &snapshot.blobs {
            let size = to_i64("blob size", record.size)?;
            tx.execute(&blob, &[digest, &size, &record.key])
                .await
                .map_err(db(WHAT))?;
        }
        let link =
            st("INSERT INTO repo_blobs (repo, digest) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .await?;
        for (repo, digest) in &snapshot.links {
            tx.execute(&link, &[repo, digest]).await.map_err(db(WHAT))?;
        }
        let manifest = st("INSERT INTO manifests (repo, digest, media_type, subject, body, refs)
                           VALUES ($1, $2, $3, $4, $5, $6)
                           ON CONFLICT (repo, digest) DO UPDATE SET media_type = EXCLUDED.media_type,
                             subject = EXCLUDED.subject, body = EXCLUDED.body, refs = EXCLUDED.refs")
        .await?;
        for (repo, digest, m) in &snapshot.manifests {
            let subject = m.subject.as_ref().map(Digest::as_str);
            let refs = digest_strs(&m.references);
            tx.execute(
                &manifest,
                &[repo, digest, &m.media_type, &subject, &&m.body[..], &refs],
            )
            .await
            .map_err(db(WHAT))?;
        }
        let tag = st(concat!(
            "INSERT INTO tags (repo, tag, digest, updated) VALUES ($1, $2, $3, ",
            now_secs!(),
            ") ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest"
        ))
        .await?;
        for (repo, name, digest) in &snapshot.tags {
            tx.execute(&tag, &[repo, name, digest])
                .await
                .map_err(db(WHAT))?;
        }
        let referrer = st("INSERT INTO referrers (repo, subject, digest, descriptor)
                           VALUES ($1, $2, $3, $4)
                           ON CONFLICT (repo, subject, digest) DO UPDATE SET descriptor = EXCLUDED.descriptor")
        .await?;
        for (repo, subject, digest, descriptor) in &snapshot.referrers {
            tx.execute(&referrer, &[repo, subject, digest, &&descriptor[..]])
                .await
                .map_err(db(WHAT))?;
        }
        let upload = st(UPSERT_SESSION).await?;
        let clear = st("DELETE FROM upload_pending WHERE id = $1").await?;
        let pending = st("INSERT INTO upload_pending (id, seq, bytes) VALUES ($1, 0, $2)").await?;
        for (s, bytes) in &snapshot.uploads {
            let p = SessionParams::new(s)?;
            tx.execute(
                &upload,
                &[
                    &s.id,
                    &s.repo,
                    &s.key,
                    &s.multipart_id,
                    &p.parts,
                    &p.received,
                    &s.hasher,
                    &p.created,
                    &p.updated,
                ],
            )
            .await
            .map_err(db(WHAT))?;
            tx.execute(&clear, &[&s.id]).await.map_err(db(WHAT))?;
            if !bytes.is_empty() {
                tx.execute(&pending, &[&s.id, &&bytes[..]])
                    .await
                    .map_err(db(WHAT))?;
            }
        }
        // The reference index and the queue, as the schema upgrade builds them.
        tx.batch_execute(BUILD_GC_INDEX).await.map_err(db(WHAT))?;
        tx.commit().await.map_err(db(WHAT))
    }

    pub fn pool_status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus {
            in_use: s.size.saturating_sub(s.available),
            idle: s.available,
            waiting: s.waiting,
            max: s.max_size,
        }
    }

    async fn conn(&self, what: &'static str) -> MetaResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| pool_error(what, e))
    }

    async fn query_opt(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<Option<Row>> {
        let c = self.conn(what).await?;
        let st = c.prepare_cached(sql).await.map_err(db(what))?;
        c.query_opt(&st, params).await.map_err(db(what))
    }

    async fn query(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<Vec<Row>> {
        let c = self.conn(what).await?;
        let st = c.prepare_cached(sql).await.map_err(db(what))?;
        c.query(&st, params).await.map_err(db(what))
    }

    async fn execute(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<u64> {
        let c = self.conn(what).await?;
        let st = c.prepare_cached(sql).await.map_err(db(what))?;
        c.execute(&st, params).await.map_err(db(what))
    }
}

/// SQLSTATEs that mean "not now" rather than "wrong": the client may retry.
fn retryable(code: &str) -> bool {
    // 08: connection exception; 53: insufficient resources; 57P0x: shutting down / starting;
    // 57014: statement timeout; 40001/40P01: serialization failure / deadlock; 25006: a
    // read-only transaction (a standby after failover).
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P0")
        || matches!(code, "57014" | "40001" | "40P01" | "25006")
}

fn classify(what: &str, e: tokio_postgres::Error) -> MetaError {
    let unavailable = match e.as_db_error() {
        Some(db) => retryable(db.code().code()),
        // Not an answer from the server: the connection failed, closed or timed out.
        None => {
            e.is_closed()
                || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
                || e.to_string().contains("timeout")
        }
    };
    if unavailable {
        MetaError::Unavailable(format!("{what}: {e}"))
    } else {
        MetaError::Failed(format!("{what}: {e}"))
    }
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> MetaError {
    move |e| classify(what, e)
}

fn pool_error(what: &str, e: PoolError) -> MetaError {
    match e {
        PoolError::Backend(e) => classify(what, e),
        PoolError::Timeout(_) => {
            MetaError::Unavailable(format!("{what}: no database connection in time"))
        }
        other => MetaError::Failed(format!("{what}: {other}")),
    }
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> MetaError {
    MetaError::Failed(format!("corrupt record in {what}: {detail}"))
}

fn parse_digest(table: &str, s: &str) -> MetaResult<Digest> {
    Digest::parse(s).ok_or_else(|| corrupt(table, format_args!("bad digest {s:?}")))
}

fn to_i64(what: &str, n: u64) -> MetaResult<i64> {
    i64::try_from(n).map_err(|_| MetaError::Failed(format!("{what}: {n} out of range")))
}

fn to_u64(table: &str, n: i64) -> MetaResult<u64> {
    u64::try_from(n).map_err(|_| corrupt(table, format_args!("negative value {n}")))
}

fn blob_record(row: &Row) -> MetaResult<BlobRecord> {
    Ok(BlobRecord {
        size: to_u64("blobs", row.get(0))?,
        key: row.get(1),
    })
}

/// `(media_type, subject, body, refs)` starting at column `at`.
fn manifest_record(row: &Row, at: usize) -> MetaResult<ManifestRecord> {
    let subject: Option<&str> = row.get(at + 1);
    let body: &[u8] = row.get(at + 2);
    let refs: Vec<&str> = row.get(at + 3);
    Ok(ManifestRecord {
        media_type: row.get(at),
        body: Bytes::copy_from_slice(body),
        subject: subject.map(|s| parse_digest("manifests", s)).transpose()?,
        references: refs
            .into_iter()
            .map(|r| parse_digest("manifests", r))
            .collect::<MetaResult<_>>()?,
    })
}

fn digest_strs(digests: &[Digest]) -> Vec<&str> {
    digests.iter().map(Digest::as_str).collect()
}

/// Builds the reference index from `manifests.refs` and queues every manifest and every
/// unreferenced blob that is not queued yet (the schema upgrade; `berth metadata copy`).
pub(crate) const BUILD_GC_INDEX: &str = concat!(
    "INSERT INTO manifest_references (repo, manifest, reference)
       SELECT repo, digest, unnest(refs) FROM manifests ON CONFLICT DO NOTHING;
     INSERT INTO gc_queue (kind, repo, digest, since)
       SELECT 1, repo, digest, ",
    now_secs!(),
    " FROM manifests ON CONFLICT DO NOTHING;
     INSERT INTO gc_queue (kind, repo, digest, since)
       SELECT 0, '', digest, ",
    now_secs!(),
    " FROM blobs b
       WHERE NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.reference = b.digest)
       ON CONFLICT DO NOTHING;"
);

/// `gc_queue.kind` of blob and manifest candidates.
const BLOB: i16 = 0;
const MANIFEST: i16 = 1;

fn kind_code(kind: CandidateKind) -> i16 {
    match kind {
        CandidateKind::Blob => BLOB,
        CandidateKind::Manifest => MANIFEST,
    }
}

/// `(kind, repo or "", digest)` of a candidate.
/// Candidates as the three arrays an `unnest` over `gc_queue`'s key takes.
fn candidate_columns(candidates: &[Candidate]) -> (Vec<i16>, Vec<&str>, Vec<&str>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for c in candidates {
        let (kind, repo, digest) = candidate_key(c);
        columns.0.push(kind);
        columns.1.push(repo);
        columns.2.push(digest);
    }
    columns
}

fn candidate_key(c: &Candidate) -> (i16, &str, &str) {
    match c {
        Candidate::Blob(d) => (BLOB, "", d.as_str()),
        Candidate::Manifest { repo, digest } => (MANIFEST, repo.as_str(), digest.as_str()),
    }
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// The first key of the journal order's advisory locks ("jrnl"); the second is the stripe.
/// (Two-key advisory locks never collide with the one-key migration lock.)
const ORDER_LOCK_CLASS: i32 = 0x6a72_6e6c;

/// Journal order locks held on a connection of the order pool.
struct PgOrderGuard {
    /// None once released.
    conn: Option<deadpool_postgres::Object>,
    time_ms: u64,
}

#[async_trait]
impl OrderGuard for PgOrderGuard {
    fn time_ms(&self) -> u64 {
        self.time_ms
    }

    async fn release(mut self: Box<Self>) {
        let Some(c) = self.conn.take() else {
            return;
        };
        if let Err(e) = c.batch_execute("SELECT pg_advisory_unlock_all()").await {
            // The connection goes, and its locks with it.
            log::warn!("journal order: releasing the stripes: {e}");
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

impl PgStore {
    /// Holds `stripes` of the journal's order on a connection of the order pool (session
    /// advisory locks, waiting for whoever holds them), in stripe order so that two nodes
    /// never wait for each other.
    async fn hold_stripes(&self, what: &'static str, stripes: &[i32]) -> MetaResult<PgOrderGuard> {
        let c = self
            .order_pool
            .get()
            .await
            .map_err(|e| pool_error(what, e))?;
        let guard = PgOrderGuard {
            conn: Some(c),
            time_ms: 0,
        };
        let c = guard.conn.as_ref().expect("just taken");
        // In stripe order (the subquery's).
        let lock = c
            .prepare_cached(
                "SELECT pg_advisory_lock($1, s)
                   FROM (SELECT s FROM unnest($2::int[]) AS s ORDER BY s) AS sorted",
            )
            .await
            .map_err(db(what))?;
        c.query(&lock, &[&ORDER_LOCK_CLASS, &stripes])
            .await
            .map_err(db(what))?;
        Ok(guard)
    }
}

impl Drop for PgOrderGuard {
    /// Not released (an error before the guard was handed out, or the write's future was
    /// dropped): the connection leaves the pool and closes, which lets its locks go.
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

async fn tx_query(
    tx: &Tx<'_>,
    what: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> MetaResult<Vec<Row>> {
    let st = tx.prepare_cached(sql).await.map_err(db(what))?;
    tx.query(&st, params).await.map_err(db(what))
}

async fn tx_opt(
    tx: &Tx<'_>,
    what: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> MetaResult<Option<Row>> {
    let st = tx.prepare_cached(sql).await.map_err(db(what))?;
    tx.query_opt(&st, params).await.map_err(db(what))
}

async fn tx_exec(
    tx: &Tx<'_>,
    what: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> MetaResult<u64> {
    let st = tx.prepare_cached(sql).await.map_err(db(what))?;
    tx.execute(&st, params).await.map_err(db(what))
}

/// Queues the candidate at now, replacing an earlier time (but while replaying the journal:
/// see [`PgStore::set_replaying`]).
async fn touch(
    tx: &Tx<'_>,
    what: &'static str,
    kind: i16,
    repo: &str,
    digest: &str,
) -> MetaResult<()> {
    tx_exec(
        tx,
        what,
        concat!(
            "INSERT INTO gc_queue (kind, repo, digest, since) VALUES ($1, $2, $3, ",
            now_secs!(),
            ") ON CONFLICT (kind, repo, digest) DO UPDATE SET since = EXCLUDED.since
               WHERE current_setting('berth.keep_queued', true) IS DISTINCT FROM 'on'"
        ),
        &[&kind, &repo, &digest],
    )
    .await
    .map(|_| ())
}

/// Lists `repo` in the catalog and holds its row (`FOR KEY SHARE`) until commit: a concurrent
/// prune (which takes the row `FOR UPDATE`) then either waits and sees what this transaction
/// added, or ran first and the row is inserted again.
async fn list_repo(tx: &Tx<'_>, what: &'static str, repo: &str) -> MetaResult<()> {
    // Two rounds always suffice unless the row is deleted and inserted again in between.
    for _ in 0..3 {
        let held = tx_opt(
            tx,
            what,
            "SELECT 1 FROM repositories WHERE name = $1 FOR KEY SHARE",
            &[&repo],
        )
        .await?;
        if held.is_some() {
            return Ok(());
        }
        let inserted = tx_opt(
            tx,
            what,
            "INSERT INTO repositories (name) VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1",
            &[&repo],
        )
        .await?;
        if inserted.is_some() {
            return Ok(());
        }
    }
    Err(MetaError::Unavailable(format!(
        "{what}: repository {repo} keeps changing"
    )))
}

/// Removes `repo` from the catalog if it has no manifest and no blob link. True if it did.
async fn prune(tx: &Tx<'_>, what: &'static str, repo: &str) -> MetaResult<bool> {
    // Lock first, decide in the next statement: its snapshot sees every writer that held the row.
    tx_opt(
        tx,
        what,
        "SELECT 1 FROM repositories WHERE name = $1 FOR UPDATE",
        &[&repo],
    )
    .await?;
    let n = tx_exec(
        tx,
        what,
        "DELETE FROM repositories WHERE name = $1
           AND NOT EXISTS (SELECT 1 FROM manifests WHERE repo = $1)
           AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE repo = $1)",
        &[&repo],
    )
    .await?;
    Ok(n > 0)
}

/// Deletes a manifest with its tags, referrers entry and references (ON DELETE CASCADE);
/// queues what that may have freed and its referrers; prunes an emptied repository. None if
/// there was no such manifest.
async fn remove_manifest(
    tx: &Tx<'_>,
    what: &'static str,
    repo: &str,
    digest: &str,
) -> MetaResult<Option<ManifestRecord>> {
    let Some(row) = tx_opt(
        tx,
        what,
        "DELETE FROM manifests WHERE repo = $1 AND digest = $2
         RETURNING media_type, subject, body, refs",
        &[&repo, &digest],
    )
    .await?
    else {
        return Ok(None);
    };
    let record = manifest_record(&row, 0)?;
    let refs = digest_strs(&record.references);
    if !refs.is_empty() {
        // References no manifest of the repository holds any more.
        tx_exec(
            tx,
            what,
            concat!(
                "INSERT INTO gc_queue (kind, repo, digest, since)
                 SELECT 0, ''::text, f, ",
                now_secs!(),
                " FROM unnest($2::text[]) f
                   WHERE NOT EXISTS (SELECT 1 FROM manifest_references WHERE repo = $1 AND reference = f)
                     AND EXISTS (SELECT 1 FROM blobs WHERE digest = f)
                 UNION ALL
                 SELECT 1, $1::text, f, ",
                now_secs!(),
                " FROM unnest($2::text[]) f
                   WHERE NOT EXISTS (SELECT 1 FROM manifest_references WHERE repo = $1 AND reference = f)
                     AND EXISTS (SELECT 1 FROM manifests WHERE repo = $1 AND digest = f)
                 ON CONFLICT (kind, repo, digest) DO UPDATE SET since = EXCLUDED.since
               WHERE current_setting('berth.keep_queued', true) IS DISTINCT FROM 'on'"
            ),
            &[&repo, &refs],
        )
        .await?;
    }
    // Its referrers lost their subject.
    tx_exec(
        tx,
        what,
        concat!(
            "INSERT INTO gc_queue (kind, repo, digest, since)
             SELECT 1, repo, digest, ",
            now_secs!(),
            " FROM referrers WHERE repo = $1 AND subject = $2
             ON CONFLICT (kind, repo, digest) DO UPDATE SET since = EXCLUDED.since
               WHERE current_setting('berth.keep_queued', true) IS DISTINCT FROM 'on'"
        ),
        &[&repo, &digest],
    )
    .await?;
    prune(tx, what, repo).await?;
    Ok(Some(record))
}

/// Deletes `repo:tag` (only if it points at `expected`, when given) and queues the manifest it
/// pointed at. False if there was no such tag.
async fn untag(
    tx: &Tx<'_>,
    what: &'static str,
    repo: &str,
    tag: &str,
    expected: Option<&str>,
) -> MetaResult<bool> {
    let Some(row) = tx_opt(
        tx,
        what,
        "DELETE FROM tags WHERE repo = $1 AND tag = $2 AND ($3::text IS NULL OR digest = $3)
         RETURNING digest",
        &[&repo, &tag, &expected],
    )
    .await?
    else {
        return Ok(false);
    };
    touch(tx, what, MANIFEST, repo, row.get(0)).await?;
    Ok(true)
}

const SESSION_COLUMNS: &str =
    "id, repo, object_key, multipart_id, parts, received, hasher, created, updated";

fn session(row: &Row) -> MetaResult<UploadSession> {
    let parts: serde_json::Value = row.get(4);
    Ok(UploadSession {
        id: row.get(0),
        repo: row.get(1),
        key: row.get(2),
        multipart_id: row.get(3),
        parts: serde_json::from_value::<Vec<Part>>(parts).map_err(|e| corrupt("uploads", e))?,
        offset: to_u64("uploads", row.get(5))?,
        hasher: row.get(6),
        created: to_u64("uploads", row.get(7))?,
        updated: to_u64("uploads", row.get(8))?,
        writer: None,
    })
}

/// The columns of [`SESSION_COLUMNS`] as parameters, in order.
struct SessionParams {
    parts: serde_json::Value,
    received: i64,
    created: i64,
    updated: i64,
}

impl SessionParams {
    fn new(s: &UploadSession) -> MetaResult<SessionParams> {
        Ok(SessionParams {
            parts: serde_json::to_value(&s.parts)
                .map_err(|e| MetaError::Failed(format!("encode upload parts: {e}")))?,
            received: to_i64("upload offset", s.offset)?,
            created: to_i64("upload created", s.created)?,
            updated: to_i64("upload updated", s.updated)?,
        })
    }
}

/// Inserts or replaces a session row ($1..$9 as in [`SESSION_COLUMNS`]).
const UPSERT_SESSION: &str = "INSERT INTO uploads (id, repo, object_key, multipart_id, parts, received, hasher, created, updated)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
     ON CONFLICT (id) DO UPDATE SET repo = EXCLUDED.repo, object_key = EXCLUDED.object_key,
       multipart_id = EXCLUDED.multipart_id, parts = EXCLUDED.parts, received = EXCLUDED.received,
       hasher = EXCLUDED.hasher, created = EXCLUDED.created, updated = EXCLUDED.updated";

#[async_trait]
impl MetaStore for PgStore {
    // ---- claims ----

    async fn claim(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<bool> {
        let secs = ttl.as_secs_f64();
        let row = self
            .query_opt(
                "claim",
                "INSERT INTO claims (name, holder, expires)
                 VALUES ($1, $2, now() + make_interval(secs => $3))
                 ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires
                 WHERE claims.holder = EXCLUDED.holder OR claims.expires <= now()
                 RETURNING 1",
                &[&name, &holder, &secs],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn release(&self, name: &str, holder: &str) -> MetaResult<()> {
        self.execute(
            "release",
            "DELETE FROM claims WHERE name = $1 AND holder = $2",
            &[&name, &holder],
        )
        .await
        .map(|_| ())
    }

    // ---- blobs ----

    async fn blob(&self, digest: &Digest) -> MetaResult<Option<BlobRecord>> {
        self.query_opt(
            "blob",
            "SELECT size, object_key FROM blobs WHERE digest = $1",
            &[&digest.as_str()],
        )
        .await?
        .map(|r| blob_record(&r))
        .transpose()
    }

    async fn repo_blob(&self, repo: &str, digest: &Digest) -> MetaResult<Option<BlobRecord>> {
        self.query_opt(
            "repo_blob",
            "SELECT b.size, b.object_key FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
             WHERE l.repo = $1 AND l.digest = $2",
            &[&repo, &digest.as_str()],
        )
        .await?
        .map(|r| blob_record(&r))
        .transpose()
    }

    async fn link_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        const WHAT: &str = "link_blob";
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        // The blob row is locked against collection until the link is in.
        let found = tx_opt(
            &tx,
            WHAT,
            "SELECT 1 FROM blobs WHERE digest = $1 FOR KEY SHARE",
            &[&digest.as_str()],
        )
        .await?;
        if found.is_none() {
            tx.rollback().await.map_err(db(WHAT))?;
            return Ok(false);
        }
        tx_exec(
            &tx,
            WHAT,
            "INSERT INTO repo_blobs (repo, digest) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&repo, &digest.as_str()],
        )
        .await?;
        touch(&tx, WHAT, BLOB, "", digest.as_str()).await?;
        list_repo(&tx, WHAT, repo).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(true)
    }

    async fn adopt_blobs(
        &self,
        repo: &str,
        blobs: &[(Digest, BlobRecord)],
    ) -> MetaResult<Vec<Linked>> {
        const WHAT: &str = "adopt_blobs";
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        let mut out = Vec::with_capacity(blobs.len());
        for (digest, record) in blobs {
            out.push(insert_blob(&tx, WHAT, digest, record).await?);
            tx_exec(
                &tx,
                WHAT,
                "INSERT INTO repo_blobs (repo, digest) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&repo, &digest.as_str()],
            )
            .await?;
            touch(&tx, WHAT, BLOB, "", digest.as_str()).await?;
        }
        list_repo(&tx, WHAT, repo).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(out)
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        const WHAT: &str = "unlink_blob";
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        // The queue row before the link, in the order a collection takes them.
        touch(&tx, WHAT, BLOB, "", digest.as_str()).await?;
        let n = tx_exec(
            &tx,
            WHAT,
            "DELETE FROM repo_blobs WHERE repo = $1 AND digest = $2",
            &[&repo, &digest.as_str()],
        )
        .await?;
        if n == 0 {
            tx.rollback().await.map_err(db(WHAT))?;
            return Ok(false);
        }
        prune(&tx, WHAT, repo).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(true)
    }

    // ---- manifests and tags ----

    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        record: ManifestRecord,
        tag: Option<&str>,
        referrer: Option<Referrer>,
    ) -> MetaResult<ManifestPut> {
        const WHAT: &str = "put_manifest";
        let refs = digest_strs(&record.references);
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        if !refs.is_empty() {
            // Decided here, against a concurrent collection: the referenced blob records
            // first (a collection holds them FOR UPDATE), then, in fresh snapshots, the links
            // and manifests, locked until commit.
            tx_query(
                &tx,
                WHAT,
                "SELECT 1 FROM blobs WHERE digest = ANY($1) FOR SHARE",
                &[&refs],
            )
            .await?;
            let mut present = std::collections::HashSet::new();
            for sql in [
                "SELECT digest FROM repo_blobs WHERE repo = $1 AND digest = ANY($2) FOR SHARE",
                "SELECT digest FROM manifests WHERE repo = $1 AND digest = ANY($2) FOR SHARE",
            ] {
                for row in tx_query(&tx, WHAT, sql, &[&repo, &refs]).await? {
                    present.insert(row.get::<_, String>(0));
                }
            }
            if let Some(missing) = record
                .references
                .iter()
                .find(|r| !present.contains(r.as_str()))
            {
                tx.rollback().await.map_err(db(WHAT))?;
                return Ok(ManifestPut::MissingReference(missing.clone()));
            }
        }
        let subject = record.subject.as_ref().map(Digest::as_str);
        // Same digest, same body, same references: a re-put keeps the stored ones.
        let inserted: bool = tx_opt(
            &tx,
            WHAT,
            "INSERT INTO manifests (repo, digest, media_type, subject, body, refs)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (repo, digest) DO UPDATE SET media_type = EXCLUDED.media_type,
               subject = EXCLUDED.subject, body = EXCLUDED.body
             RETURNING xmax = 0",
            &[
                &repo,
                &digest.as_str(),
                &record.media_type,
                &subject,
                &&record.body[..],
                &refs,
            ],
        )
        .await?
        .is_some_and(|r| r.get(0));
        // A replaced record whose subject no longer holds leaves no stale referrer.
        let referrer_subject = referrer.as_ref().map(|r| r.subject.as_str());
        tx_exec(
            &tx,
            WHAT,
            "DELETE FROM referrers WHERE repo = $1 AND digest = $2
               AND subject IS DISTINCT FROM $3::text",
            &[&repo, &digest.as_str(), &referrer_subject],
        )
        .await?;
        if let Some(r) = &referrer {
            tx_exec(
                &tx,
                WHAT,
                "INSERT INTO referrers (repo, subject, digest, descriptor) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (repo, subject, digest) DO UPDATE SET descriptor = EXCLUDED.descriptor",
                &[&repo, &r.subject.as_str(), &digest.as_str(), &&r.descriptor[..]],
            )
            .await?;
        }
        if inserted && !refs.is_empty() {
            tx_exec(
                &tx,
                WHAT,
                "INSERT INTO manifest_references (repo, manifest, reference)
                 SELECT $1, $2, unnest($3::text[]) ON CONFLICT DO NOTHING",
                &[&repo, &digest.as_str(), &refs],
            )
            .await?;
        }
        match tag {
            Some(tag) => {
                let moved_from: Option<String> = tx_opt(
                    &tx,
                    WHAT,
                    "SELECT digest FROM tags WHERE repo = $1 AND tag = $2 FOR UPDATE",
                    &[&repo, &tag],
                )
                .await?
                .map(|r| r.get(0));
                tx_exec(
                    &tx,
                    WHAT,
                    concat!(
                        "INSERT INTO tags (repo, tag, digest, updated) VALUES ($1, $2, $3, ",
                        now_secs!(),
                        ") ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest,
                           updated = EXCLUDED.updated"
                    ),
                    &[&repo, &tag, &digest.as_str()],
                )
                .await?;
                if let Some(old) = moved_from.filter(|old| old != digest.as_str()) {
                    touch(&tx, WHAT, MANIFEST, repo, &old).await?;
                }
            }
            None => touch(&tx, WHAT, MANIFEST, repo, digest.as_str()).await?,
        }
        list_repo(&tx, WHAT, repo).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(ManifestPut::Stored)
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ManifestRecord>> {
        self.query_opt(
            "manifest",
            "SELECT media_type, subject, body, refs FROM manifests WHERE repo = $1 AND digest = $2",
            &[&repo, &digest.as_str()],
        )
        .await?
        .map(|r| manifest_record(&r, 0))
        .transpose()
    }

    async fn tagged_manifest(
        &self,
        repo: &str,
        tag: &str,
    ) -> MetaResult<Option<(Digest, ManifestRecord)>> {
        // One statement, one snapshot: the tag and the manifest it points at.
        let Some(row) = self
            .query_opt(
                "tagged_manifest",
                "SELECT t.digest, m.media_type, m.subject, m.body, m.refs
                 FROM tags t JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest
                 WHERE t.repo = $1 AND t.tag = $2",
                &[&repo, &tag],
            )
            .await?
        else {
            return Ok(None);
        };
        let digest = parse_digest("tags", row.get(0))?;
        Ok(Some((digest, manifest_record(&row, 1)?)))
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        const WHAT: &str = "delete_manifest";
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        let removed = remove_manifest(&tx, WHAT, repo, digest.as_str()).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(removed.is_some())
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<bool> {
        const WHAT: &str = "delete_tag";
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        let deleted = untag(&tx, WHAT, repo, tag, None).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(deleted)
    }

    async fn tags(&self, repo: &str, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "tags",
                "SELECT tag FROM tags WHERE repo = $1 AND ($2::text IS NULL OR tag > $2)
                 ORDER BY tag LIMIT $3",
                &[&repo, &last, &limit],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn repositories(&self, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "repositories",
                "SELECT name FROM repositories WHERE ($1::text IS NULL OR name > $1)
                 ORDER BY name LIMIT $2",
                &[&last, &limit],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn repository_exists(&self, repo: &str) -> MetaResult<bool> {
        let row = self
            .query_opt(
                "repository_exists",
                "SELECT 1 FROM repositories WHERE name = $1",
                &[&repo],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> MetaResult<Vec<Bytes>> {
        let rows = self
            .query(
                "referrers",
                "SELECT descriptor FROM referrers WHERE repo = $1 AND subject = $2 ORDER BY digest",
                &[&repo, &subject.as_str()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Bytes::copy_from_slice(r.get::<_, &[u8]>(0)))
            .collect())
    }

    // ---- upload sessions ----

    async fn create_upload(&self, session: &UploadSession) -> MetaResult<()> {
        let p = SessionParams::new(session)?;
        let mut c = self.conn("create_upload").await?;
        let tx = self.begin(&mut c, "create_upload").await?;
        let upsert = tx
            .prepare_cached(UPSERT_SESSION)
            .await
            .map_err(db("create_upload"))?;
        tx.execute(
            &upsert,
            &[
                &session.id,
                &session.repo,
                &session.key,
                &session.multipart_id,
                &p.parts,
                &p.received,
                &session.hasher,
                &p.created,
                &p.updated,
            ],
        )
        .await
        .map_err(db("create_upload"))?;
        // A fresh session starts with no pending bytes, whatever a reused id left.
        let clear = tx
            .prepare_cached("DELETE FROM upload_pending WHERE id = $1")
            .await
            .map_err(db("create_upload"))?;
        tx.execute(&clear, &[&session.id])
            .await
            .map_err(db("create_upload"))?;
        tx.commit().await.map_err(db("create_upload"))
    }

    async fn upload(&self, id: &str) -> MetaResult<Option<UploadSession>> {
        self.query_opt(
            "upload",
            &format!("SELECT {SESSION_COLUMNS} FROM uploads WHERE id = $1"),
            &[&id],
        )
        .await?
        .map(|r| session(&r))
        .transpose()
    }

    async fn pending(&self, id: &str) -> MetaResult<Bytes> {
        let rows = self
            .query(
                "pending",
                "SELECT bytes FROM upload_pending WHERE id = $1 ORDER BY seq",
                &[&id],
            )
            .await?;
        if let [one] = &rows[..] {
            return Ok(Bytes::copy_from_slice(one.get::<_, &[u8]>(0)));
        }
        let len = rows.iter().map(|r| r.get::<_, &[u8]>(0).len()).sum();
        let mut out = Vec::with_capacity(len);
        for r in &rows {
            out.extend_from_slice(r.get::<_, &[u8]>(0));
        }
        Ok(Bytes::from(out))
    }

    async fn save_upload(&self, session: &UploadSession, change: PendingChange) -> MetaResult<()> {
        const WHAT: &str = "save_upload";
        let p = SessionParams::new(session)?;
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        if let Some(writer) = &session.writer {
            // Locks the claim row until commit: it cannot pass to another writer meanwhile.
            let held = tx
                .prepare_cached(
                    "SELECT 1 FROM claims WHERE name = $1 AND holder = $2 AND expires > now()
                     FOR SHARE",
                )
                .await
                .map_err(db(WHAT))?;
            if tx
                .query_opt(&held, &[&upload_claim(&session.id), writer])
                .await
                .map_err(db(WHAT))?
                .is_none()
            {
                return Err(MetaError::Unavailable(format!(
                    "upload {}: claimed by another writer",
                    session.id
                )));
            }
        }
        let upsert = tx.prepare_cached(UPSERT_SESSION).await.map_err(db(WHAT))?;
        tx.execute(
            &upsert,
            &[
                &session.id,
                &session.repo,
                &session.key,
                &session.multipart_id,
                &p.parts,
                &p.received,
                &session.hasher,
                &p.created,
                &p.updated,
            ],
        )
        .await
        .map_err(db(WHAT))?;
        if change.clear {
            let clear = tx
                .prepare_cached("DELETE FROM upload_pending WHERE id = $1")
                .await
                .map_err(db(WHAT))?;
            tx.execute(&clear, &[&session.id]).await.map_err(db(WHAT))?;
        }
        if let Some(bytes) = change.append.as_ref().filter(|b| !b.is_empty()) {
            // The session row is locked by the upsert above: sequence numbers cannot race.
            let append = tx
                .prepare_cached(
                    "INSERT INTO upload_pending (id, seq, bytes)
                     SELECT $1, COALESCE(max(seq) + 1, 0), $2 FROM upload_pending WHERE id = $1",
                )
                .await
                .map_err(db(WHAT))?;
            tx.execute(&append, &[&session.id, &&bytes[..]])
                .await
                .map_err(db(WHAT))?;
        }
        tx.commit().await.map_err(db(WHAT))
    }

    async fn delete_upload(&self, id: &str) -> MetaResult<bool> {
        // Pending bytes go with the session (ON DELETE CASCADE).
        let row = self
            .query_opt(
                "delete_upload",
                "WITH c AS (DELETE FROM claims WHERE name = $2),
                      d AS (DELETE FROM uploads WHERE id = $1 RETURNING 1)
                 SELECT count(*) FROM d",
                &[&id, &upload_claim(id)],
            )
            .await?;
        Ok(row.is_some_and(|r| r.get::<_, i64>(0) > 0))
    }

    async fn idle_uploads(&self, cutoff: u64) -> MetaResult<Vec<UploadSession>> {
        // A cutoff past i64 means "every session" (the embedded sweep at start asks that way).
        let cutoff = i64::try_from(cutoff).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "idle_uploads",
                &format!("SELECT {SESSION_COLUMNS} FROM uploads WHERE updated < $1"),
                &[&cutoff],
            )
            .await?;
        rows.iter().map(session).collect()
    }

    async fn finish_upload(
        &self,
        id: &str,
        repo: &str,
        digest: &Digest,
        record: BlobRecord,
    ) -> MetaResult<Linked> {
        const WHAT: &str = "finish_upload";
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        let forget = tx
            .prepare_cached(
                "WITH c AS (DELETE FROM claims WHERE name = $2)
                 DELETE FROM uploads WHERE id = $1",
            )
            .await
            .map_err(db(WHAT))?;
        tx.execute(&forget, &[&id, &upload_claim(id)])
            .await
            .map_err(db(WHAT))?;
        let linked = insert_blob(&tx, WHAT, digest, &record).await?;
        tx_exec(
            &tx,
            WHAT,
            "INSERT INTO repo_blobs (repo, digest) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&repo, &digest.as_str()],
        )
        .await?;
        touch(&tx, WHAT, BLOB, "", digest.as_str()).await?;
        list_repo(&tx, WHAT, repo).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(linked)
    }

    // ---- bucket journal ----

    async fn journal_watermark(&self) -> MetaResult<Option<String>> {
        Ok(self
            .query_opt(
                "journal_watermark",
                "SELECT watermark FROM journal_watermark",
                &[],
            )
            .await?
            .map(|r| r.get(0)))
    }

    async fn set_journal_watermark(&self, watermark: &str) -> MetaResult<()> {
        self.execute(
            "set_journal_watermark",
            "INSERT INTO journal_watermark (one, watermark) VALUES (true, $1)
             ON CONFLICT (one) DO UPDATE SET watermark = EXCLUDED.watermark",
            &[&watermark],
        )
        .await
        .map(|_| ())
    }

    async fn journal_order(
        &self,
        stripes: &[u32],
        at_ms: u64,
    ) -> MetaResult<Option<Box<dyn OrderGuard>>> {
        const WHAT: &str = "journal order";
        let at = to_i64(WHAT, at_ms)?;
        let stripes: Vec<i32> = stripes.iter().map(|&s| s as i32).collect();
        let mut guard = self.hold_stripes(WHAT, &stripes).await?;
        let c = guard.conn.as_ref().expect("held");
        // Under the locks nobody else writes these rows: one statement moves them all to the
        // new time, committed before the record is written.
        let next = c
            .prepare_cached(
                "WITH t AS (
                   SELECT GREATEST($2::bigint, COALESCE(max(last_ms) + 1, 0)) AS ms
                     FROM journal_order WHERE stripe = ANY($1::int[]))
                 INSERT INTO journal_order (stripe, last_ms)
                   SELECT s, t.ms FROM unnest($1::int[]) AS s, t
                 ON CONFLICT (stripe) DO UPDATE SET last_ms = EXCLUDED.last_ms
                 RETURNING last_ms",
            )
            .await
            .map_err(db(WHAT))?;
        let rows = c.query(&next, &[&stripes, &at]).await.map_err(db(WHAT))?;
        let ms = rows.first().map_or(at, |r| r.get::<_, i64>(0));
        guard.time_ms = to_u64("journal_order", ms)?;
        Ok(Some(Box::new(guard)))
    }

    async fn journal_stripes(&self, stripes: &[u32]) -> MetaResult<Option<HeldStripes>> {
        const WHAT: &str = "journal stripes";
        let stripes: Vec<i32> = stripes.iter().map(|&s| s as i32).collect();
        let guard = self.hold_stripes(WHAT, &stripes).await?;
        let c = guard.conn.as_ref().expect("held");
        // Every write that moved these rows has let the stripes go: committed, or its node died.
        let read = c
            .prepare_cached(
                "SELECT stripe, last_ms FROM journal_order WHERE stripe = ANY($1::int[])",
            )
            .await
            .map_err(db(WHAT))?;
        let mut last_ms = std::collections::BTreeMap::new();
        for r in c.query(&read, &[&stripes]).await.map_err(db(WHAT))? {
            last_ms.insert(r.get::<_, i32>(0) as u32, to_u64(WHAT, r.get(1))?);
        }
        Ok(Some(HeldStripes {
            guard: Box::new(guard),
            last_ms,
        }))
    }

    // ---- garbage collection ----

    async fn gc_candidates(
        &self,
        kind: CandidateKind,
        cutoff: u64,
        limit: usize,
    ) -> MetaResult<Vec<QueuedCandidate>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cutoff = i64::try_from(cutoff).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "gc_candidates",
                "SELECT repo, digest, since FROM gc_queue WHERE kind = $1 AND since <= $2
                 ORDER BY since, repo, digest LIMIT $3",
                &[&kind_code(kind), &cutoff, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let digest = parse_digest("gc_queue", r.get(1))?;
                Ok(QueuedCandidate {
                    candidate: match kind {
                        CandidateKind::Blob => Candidate::Blob(digest),
                        CandidateKind::Manifest => Candidate::Manifest {
                            repo: r.get(0),
                            digest,
                        },
                    },
                    since: to_u64("gc_queue", r.get(2))?,
                })
            })
            .collect()
    }

    async fn gc_queue_len(&self) -> MetaResult<u64> {
        let row = self
            .query_opt("gc_queue_len", "SELECT count(*) FROM gc_queue", &[])
            .await?
            .ok_or_else(|| MetaError::Failed("gc_queue_len: no row".into()))?;
        to_u64("gc_queue", row.get(0))
    }

    async fn gc_enqueue(&self, candidates: &[Candidate], now: u64) -> MetaResult<u64> {
        if candidates.is_empty() {
            return Ok(0);
        }
        let now = to_i64("gc_enqueue now", now)?;
        let (kinds, repos, digests) = candidate_columns(candidates);
        self.execute(
            "gc_enqueue",
            "INSERT INTO gc_queue (kind, repo, digest, since)
             SELECT k, r, d, $4 FROM unnest($1::smallint[], $2::text[], $3::text[]) AS u(k, r, d)
             ON CONFLICT DO NOTHING",
            &[&kinds, &repos, &digests, &now],
        )
        .await
    }

    async fn gc_dequeue(&self, candidates: &[Candidate]) -> MetaResult<()> {
        if candidates.is_empty() {
            return Ok(());
        }
        let (kinds, repos, digests) = candidate_columns(candidates);
        self.execute(
            "gc_dequeue",
            "DELETE FROM gc_queue q USING unnest($1::smallint[], $2::text[], $3::text[]) AS u(k, r, d)
             WHERE q.kind = u.k AND q.repo = u.r AND q.digest = u.d",
            &[&kinds, &repos, &digests],
        )
        .await
        .map(|_| ())
    }

    async fn collect_blob(&self, digest: &Digest, cutoff: u64) -> MetaResult<BlobCollection> {
        const WHAT: &str = "collect_blob";
        let digest = digest.as_str();
        let cutoff = i64::try_from(cutoff).unwrap_or(i64::MAX);
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        // The record first: links and manifest PUTs referencing it wait (or come after).
        tx_opt(
            &tx,
            WHAT,
            "SELECT 1 FROM blobs WHERE digest = $1 FOR UPDATE",
            &[&digest],
        )
        .await?;
        let since: Option<i64> = tx_opt(
            &tx,
            WHAT,
            "SELECT since FROM gc_queue WHERE kind = 0 AND repo = '' AND digest = $1 FOR UPDATE",
            &[&digest],
        )
        .await?
        .map(|r| r.get(0));
        if since.is_none_or(|since| since > cutoff) {
            // Touched within the grace (an upload, a mount, an unlink), or not queued.
            tx.rollback().await.map_err(db(WHAT))?;
            return Ok(BlobCollection::default());
        }
        let mut out = BlobCollection::default();
        let unlinked = tx_query(
            &tx,
            WHAT,
            "DELETE FROM repo_blobs l WHERE l.digest = $1 AND NOT EXISTS
               (SELECT 1 FROM manifest_references m WHERE m.repo = l.repo AND m.reference = $1)
             RETURNING l.repo",
            &[&digest],
        )
        .await?;
        out.unlinked = unlinked.iter().map(|r| r.get(0)).collect();
        out.unlinked.sort();
        // Unreferenced everywhere: every link went just now, and the record goes.
        out.deleted = tx_opt(
            &tx,
            WHAT,
            "DELETE FROM blobs WHERE digest = $1
               AND NOT EXISTS (SELECT 1 FROM manifest_references WHERE reference = $1)
             RETURNING size, object_key",
            &[&digest],
        )
        .await?
        .map(|r| blob_record(&r))
        .transpose()?;
        tx_exec(
            &tx,
            WHAT,
            "DELETE FROM gc_queue WHERE kind = 0 AND repo = '' AND digest = $1",
            &[&digest],
        )
        .await?;
        for repo in &out.unlinked {
            if prune(&tx, WHAT, repo).await? {
                out.pruned.push(repo.clone());
            }
        }
        tx.commit().await.map_err(db(WHAT))?;
        Ok(out)
    }

    async fn collect_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        cutoff: u64,
    ) -> MetaResult<Option<ManifestRecord>> {
        const WHAT: &str = "collect_manifest";
        let digest = digest.as_str();
        let cutoff = i64::try_from(cutoff).unwrap_or(i64::MAX);
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        // The row first: a PUT re-tagging it or listing it waits (or comes after).
        let found = tx_opt(
            &tx,
            WHAT,
            "SELECT subject FROM manifests WHERE repo = $1 AND digest = $2 FOR UPDATE",
            &[&repo, &digest],
        )
        .await?;
        let since: Option<i64> = tx_opt(
            &tx,
            WHAT,
            "SELECT since FROM gc_queue WHERE kind = 1 AND repo = $1 AND digest = $2 FOR UPDATE",
            &[&repo, &digest],
        )
        .await?
        .map(|r| r.get(0));
        if since.is_none_or(|since| since > cutoff) {
            tx.rollback().await.map_err(db(WHAT))?;
            return Ok(None);
        }
        tx_exec(
            &tx,
            WHAT,
            "DELETE FROM gc_queue WHERE kind = 1 AND repo = $1 AND digest = $2",
            &[&repo, &digest],
        )
        .await?;
        if found.is_none() {
            tx.commit().await.map_err(db(WHAT))?;
            return Ok(None);
        }
        // Alive if tagged, listed by an index of the repository, or a referrer of a live
        // manifest; an untag, an index delete or its subject's delete queues it again.
        let alive = tx_opt(
            &tx,
            WHAT,
            "SELECT EXISTS (SELECT 1 FROM tags WHERE repo = $1 AND digest = $2)
                 OR EXISTS (SELECT 1 FROM manifest_references WHERE repo = $1 AND reference = $2)
                 OR EXISTS (SELECT 1 FROM manifests m JOIN manifests s
                              ON s.repo = m.repo AND s.digest = m.subject
                            WHERE m.repo = $1 AND m.digest = $2)",
            &[&repo, &digest],
        )
        .await?
        .is_some_and(|r| r.get(0));
        let removed = if alive {
            None
        } else {
            remove_manifest(&tx, WHAT, repo, digest).await?
        };
        tx.commit().await.map_err(db(WHAT))?;
        Ok(removed)
    }

    async fn blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<(Digest, BlobRecord)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.map(Digest::as_str);
        let rows = self
            .query(
                "blobs",
                "SELECT size, object_key, digest FROM blobs WHERE ($1::text IS NULL OR digest > $1)
                 ORDER BY digest LIMIT $2",
                &[&after, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((parse_digest("blobs", r.get(2))?, blob_record(r)?)))
            .collect()
    }

    async fn is_referenced(&self, digest: &Digest) -> MetaResult<bool> {
        let row = self
            .query_opt(
                "is_referenced",
                "SELECT 1 FROM manifest_references WHERE reference = $1 LIMIT 1",
                &[&digest.as_str()],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn repo_manifests(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Digest>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.map(Digest::as_str);
        let rows = self
            .query(
                "repo_manifests",
                "SELECT digest FROM manifests WHERE repo = $1 AND ($2::text IS NULL OR digest > $2)
                 ORDER BY digest LIMIT $3",
                &[&repo, &after, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| parse_digest("manifests", r.get(0)))
            .collect()
    }

    async fn tag_details(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<TagInfo>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "tag_details",
                "SELECT tag, digest, updated FROM tags WHERE repo = $1 AND ($2::text IS NULL OR tag > $2)
                 ORDER BY tag LIMIT $3",
                &[&repo, &last, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(TagInfo {
                    tag: r.get(0),
                    digest: parse_digest("tags", r.get(1))?,
                    updated: to_u64("tags", r.get(2))?,
                })
            })
            .collect()
    }

    async fn delete_tag_if(&self, repo: &str, tag: &str, digest: &Digest) -> MetaResult<bool> {
        const WHAT: &str = "delete_tag_if";
        let mut c = self.conn(WHAT).await?;
        let tx = self.begin(&mut c, WHAT).await?;
        let deleted = untag(&tx, WHAT, repo, tag, Some(digest.as_str())).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(deleted)
    }

    /// The database answers and takes writes: not a standby (after a failover the old
    /// primary's address may point at one) nor read-only by setting.
    async fn check_writable(&self) -> MetaResult<()> {
        let row = self
            .query_opt(
                "check_writable",
                "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'",
                &[],
            )
            .await?
            .ok_or_else(|| MetaError::Failed("check_writable: no row".into()))?;
        if row.get::<_, bool>(0) {
            return Err(MetaError::Unavailable(
                "PostgreSQL is read-only (a standby, or transaction_read_only is on)".into(),
            ));
        }
        Ok(())
    }
}

/// Adds `digest -> record` to the global index unless it is there; the row is locked (by the
/// insert, or `FOR KEY SHARE`) until commit. Two nodes finishing the same digest: the second
/// waits on the first's row, then finds it and links that record.
async fn insert_blob(
    tx: &Tx<'_>,
    what: &'static str,
    digest: &Digest,
    record: &BlobRecord,
) -> MetaResult<Linked> {
    let size = to_i64("blob size", record.size)?;
    // A record collected between the two statements: this upload's bytes become the record.
    for _ in 0..3 {
        let inserted = tx_opt(
            tx,
            what,
            "INSERT INTO blobs (digest, size, object_key) VALUES ($1, $2, $3)
             ON CONFLICT (digest) DO NOTHING RETURNING 1",
            &[&digest.as_str(), &size, &record.key],
        )
        .await?;
        if inserted.is_some() {
            return Ok(Linked::New);
        }
        let existing = tx_opt(
            tx,
            what,
            "SELECT size, object_key FROM blobs WHERE digest = $1 FOR KEY SHARE",
            &[&digest.as_str()],
        )
        .await?;
        if let Some(row) = existing {
            return Ok(Linked::Existing(blob_record(&row)?));
        }
    }
    Err(MetaError::Unavailable(format!(
        "{what}: blob {digest} keeps changing"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_states() {
        for code in [
            "08006", "08001", "57P01", "57P03", "57014", "40001", "40P01", "53300", "25006",
        ] {
            assert!(retryable(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02", "42601"] {
            assert!(!retryable(code), "{code}");
        }
    }
}
