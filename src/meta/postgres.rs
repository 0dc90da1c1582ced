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
//! Claims ([`MetaStore::claim`]) are rows with an expiry by the database's clock (one clock for
//! all nodes). A save under a claim locks the claim row (`FOR SHARE`) in its transaction, so a
//! writer whose claim has passed to another never commits.
//!
//! # Errors
//!
//! A lost connection, a pool that cannot connect in time, a statement timeout, a server
//! shutting down or a standby refusing writes are [`MetaError::Unavailable`] (503 and
//! Retry-After to clients); the pool drops dead connections and opens new ones by itself when
//! the database returns.

mod migrations;
mod tls;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

pub use migrations::{migrate, Migrated, SCHEMA_VERSION};

use super::{
    upload_claim, BlobRecord, Linked, ManifestRecord, MetaError, MetaResult, MetaStore, Part,
    PendingChange, Referrer, UploadSession,
};
use crate::config::PostgresConfig;
use crate::registry::names::Digest;

/// The PostgreSQL metadata store. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
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
        let (config, tls) = driver_config(c)?;
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                // A connection whose socket closed (database restarted) is replaced when it is
                // next taken from the pool.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(c.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(c.connect_timeout))
            .create_timeout(Some(c.connect_timeout))
            .recycle_timeout(Some(c.connect_timeout))
            .build()
            .map_err(|e| MetaError::Failed(format!("postgres pool: {e}")))?;
        Ok(PgStore { pool })
    }

    /// Writes every row of `snapshot` in one transaction, each as an upsert: a re-run changes
    /// nothing that the source did not change (`berth metadata copy`).
    pub async fn import(&self, snapshot: &super::copy::Snapshot) -> MetaResult<()> {
        const WHAT: &str = "import";
        let mut c = self.conn(WHAT).await?;
        let tx = c.transaction().await.map_err(db(WHAT))?;
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
        let manifest = st("INSERT INTO manifests (repo, digest, media_type, subject, body)
                           VALUES ($1, $2, $3, $4, $5)
                           ON CONFLICT (repo, digest) DO UPDATE SET media_type = EXCLUDED.media_type,
                             subject = EXCLUDED.subject, body = EXCLUDED.body")
        .await?;
        for (repo, digest, m) in &snapshot.manifests {
            let subject = m.subject.as_ref().map(Digest::as_str);
            tx.execute(
                &manifest,
                &[repo, digest, &m.media_type, &subject, &&m.body[..]],
            )
            .await
            .map_err(db(WHAT))?;
        }
        let tag = st("INSERT INTO tags (repo, tag, digest) VALUES ($1, $2, $3)
                      ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest")
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

    /// A trivial query: Ok when the database answers.
    pub async fn ping(&self) -> MetaResult<()> {
        self.query_opt("ping", "SELECT 1", &[]).await.map(|_| ())
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

/// `(media_type, subject, body)` starting at column `at`.
fn manifest_record(row: &Row, at: usize) -> MetaResult<ManifestRecord> {
    let subject: Option<&str> = row.get(at + 1);
    let body: &[u8] = row.get(at + 2);
    Ok(ManifestRecord {
        media_type: row.get(at),
        body: Bytes::copy_from_slice(body),
        subject: subject.map(|s| parse_digest("manifests", s)).transpose()?,
    })
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
        // One statement: the blob row is locked against removal until the link is in.
        let row = self
            .query_opt(
                "link_blob",
                "WITH b AS (SELECT digest FROM blobs WHERE digest = $2 FOR KEY SHARE),
                      l AS (INSERT INTO repo_blobs (repo, digest) SELECT $1, digest FROM b
                            ON CONFLICT DO NOTHING),
                      r AS (INSERT INTO repositories (name) SELECT $1 FROM b
                            ON CONFLICT DO NOTHING)
                 SELECT count(*) FROM b",
                &[&repo, &digest.as_str()],
            )
            .await?;
        Ok(row.is_some_and(|r| r.get::<_, i64>(0) > 0))
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let n = self
            .execute(
                "unlink_blob",
                "DELETE FROM repo_blobs WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.as_str()],
            )
            .await?;
        Ok(n > 0)
    }

    // ---- manifests and tags ----

    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        record: ManifestRecord,
        tag: Option<&str>,
        referrer: Option<Referrer>,
    ) -> MetaResult<()> {
        let subject = record.subject.as_ref().map(Digest::as_str);
        let referrer_subject = referrer.as_ref().map(|r| r.subject.as_str());
        let descriptor = referrer.as_ref().map(|r| &r.descriptor[..]);
        // One statement, so one round trip and atomic without BEGIN/COMMIT. A replaced record
        // whose subject no longer holds leaves no stale referrer. Foreign keys are checked at
        // the end of the statement, when the manifest row is in.
        self.execute(
            "put_manifest",
            "WITH m AS (
                 INSERT INTO manifests (repo, digest, media_type, subject, body)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (repo, digest) DO UPDATE SET media_type = EXCLUDED.media_type,
                   subject = EXCLUDED.subject, body = EXCLUDED.body),
             stale AS (
                 DELETE FROM referrers WHERE repo = $1 AND digest = $2
                   AND subject IS DISTINCT FROM $6::text),
             r AS (
                 INSERT INTO referrers (repo, subject, digest, descriptor)
                 SELECT $1, $6, $2, $7 WHERE $6::text IS NOT NULL
                 ON CONFLICT (repo, subject, digest) DO UPDATE SET descriptor = EXCLUDED.descriptor),
             t AS (
                 INSERT INTO tags (repo, tag, digest) SELECT $1, $8, $2 WHERE $8::text IS NOT NULL
                 ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest)
             INSERT INTO repositories (name) VALUES ($1) ON CONFLICT DO NOTHING",
            &[
                &repo,
                &digest.as_str(),
                &record.media_type,
                &subject,
                &&record.body[..],
                &referrer_subject,
                &descriptor,
                &tag,
            ],
        )
        .await
        .map(|_| ())
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ManifestRecord>> {
        self.query_opt(
            "manifest",
            "SELECT media_type, subject, body FROM manifests WHERE repo = $1 AND digest = $2",
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
                "SELECT t.digest, m.media_type, m.subject, m.body
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
        // Its tags and its referrers entry go with it (ON DELETE CASCADE).
        let n = self
            .execute(
                "delete_manifest",
                "DELETE FROM manifests WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.as_str()],
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<bool> {
        let n = self
            .execute(
                "delete_tag",
                "DELETE FROM tags WHERE repo = $1 AND tag = $2",
                &[&repo, &tag],
            )
            .await?;
        Ok(n > 0)
    }

    async fn tags(&self, repo: &str, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = to_i64("tags limit", limit as u64)?;
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
        let limit = to_i64("repositories limit", limit as u64)?;
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
        let tx = c.transaction().await.map_err(db("create_upload"))?;
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
        let tx = c.transaction().await.map_err(db(WHAT))?;
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
        let cutoff = to_i64("idle_uploads cutoff", cutoff)?;
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
        let size = to_i64("blob size", record.size)?;
        let mut c = self.conn(WHAT).await?;
        let tx = c.transaction().await.map_err(db(WHAT))?;
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
        // Two nodes finishing the same digest: the second waits on the first's row, then
        // finds it and links that record.
        let insert = tx
            .prepare_cached(
                "INSERT INTO blobs (digest, size, object_key) VALUES ($1, $2, $3)
                 ON CONFLICT (digest) DO NOTHING RETURNING 1",
            )
            .await
            .map_err(db(WHAT))?;
        let linked = match tx
            .query_opt(&insert, &[&digest.as_str(), &size, &record.key])
            .await
            .map_err(db(WHAT))?
        {
            Some(_) => Linked::New,
            None => {
                let existing = tx
                    .prepare_cached(
                        "SELECT size, object_key FROM blobs WHERE digest = $1 FOR KEY SHARE",
                    )
                    .await
                    .map_err(db(WHAT))?;
                let row = tx
                    .query_one(&existing, &[&digest.as_str()])
                    .await
                    .map_err(db(WHAT))?;
                Linked::Existing(blob_record(&row)?)
            }
        };
        let link = tx
            .prepare_cached(
                "WITH r AS (INSERT INTO repositories (name) VALUES ($1) ON CONFLICT DO NOTHING)
                 INSERT INTO repo_blobs (repo, digest) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(db(WHAT))?;
        tx.execute(&link, &[&repo, &digest.as_str()])
            .await
            .map_err(db(WHAT))?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(linked)
    }
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
