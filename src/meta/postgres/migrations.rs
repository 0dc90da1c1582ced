//! Versioned schema migrations, embedded in the binary and applied in order, each in its own
//! transaction, under a PostgreSQL advisory lock: nodes starting together take turns, and the
//! second finds the schema up to date. A database whose schema is newer than this binary knows
//! is refused (an older berth must not write to a schema it does not understand).

use tokio_postgres::Client;

use super::{db, driver_config};
use crate::config::PostgresConfig;
use crate::meta::{MetaError, MetaResult};

/// `(version, name, SQL)`, in version order from 1. Never edit a released one: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (
        2,
        "gc_journal",
        include_str!("migrations/0002_gc_journal.sql"),
    ),
    (
        3,
        "journal_order",
        include_str!("migrations/0003_journal_order.sql"),
    ),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Key of the advisory lock held while migrating ("berth" in ASCII).
const LOCK_KEY: i64 = 0x0062_6572_7468;

/// What [`migrate`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The schema version before.
    pub from: i32,
    /// The versions applied now, in order (empty: already up to date).
    pub applied: Vec<i32>,
}

/// Brings the database's schema to [`SCHEMA_VERSION`] on a connection of its own (dropped
/// before returning, so that it may run on a throwaway runtime before serving starts).
pub async fn migrate(c: &PostgresConfig) -> MetaResult<Migrated> {
    let (config, tls) = driver_config(c)?;
    let (client, connection) = config.connect(tls).await.map_err(db("connect"))?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("migration connection: {e}");
        }
    });
    let result = migrate_on(&client).await;
    drop(client);
    let _ = driver.await;
    result
}

async fn migrate_on(client: &Client) -> MetaResult<Migrated> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(db("migration lock"))?;
    let result = apply(client).await;
    // Released with the connection anyway; unlocking now lets a waiting node go on at once.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    result
}

async fn apply(client: &Client) -> MetaResult<Migrated> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS berth_schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(db("migration table"))?;
    let from: i32 = client
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM berth_schema_migrations",
            &[],
        )
        .await
        .map_err(db("schema version"))?
        .get(0);
    if from > SCHEMA_VERSION {
        return Err(MetaError::Failed(format!(
            "the database's schema is version {from}, newer than this berth knows \
             ({SCHEMA_VERSION}): a newer berth has migrated it; run that version (or newer)"
        )));
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > from) {
        let what = format!("schema migration {version} ({name})");
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| db("begin")(e).context(&what))?;
        let step = async {
            client.batch_execute(sql).await?;
            after(client, *version).await?;
            client
                .execute(
                    "INSERT INTO berth_schema_migrations (version, name) VALUES ($1, $2)",
                    &[version, name],
                )
                .await?;
            client.batch_execute("COMMIT").await
        }
        .await;
        if let Err(e) = step {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(db("apply")(e).context(&what));
        }
        log::info!("metadata: applied {what}");
        applied.push(*version);
    }
    Ok(Migrated { from, applied })
}

/// What a migration needs beyond its SQL, in its transaction: version 2 computes the references
/// of the manifests already stored from their bodies (berth's parser, not SQL), then builds the
/// reference index and queues every manifest and unreferenced blob (at now: nothing is
/// collected before a grace has passed since the upgrade).
async fn after(client: &Client, version: i32) -> Result<(), tokio_postgres::Error> {
    if version != 2 {
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT repo, digest, media_type, body FROM manifests WHERE refs IS NULL",
            &[],
        )
        .await?;
    let update = client
        .prepare("UPDATE manifests SET refs = $3 WHERE repo = $1 AND digest = $2")
        .await?;
    for row in &rows {
        let refs = crate::registry::manifest::references(row.get(2), row.get(3));
        let refs: Vec<&str> = refs.iter().map(|d| d.as_str()).collect();
        client
            .execute(
                &update,
                &[&row.get::<_, &str>(0), &row.get::<_, &str>(1), &refs],
            )
            .await?;
    }
    client
        .batch_execute("ALTER TABLE manifests ALTER COLUMN refs SET NOT NULL")
        .await?;
    client.batch_execute(super::BUILD_GC_INDEX).await?;
    if !rows.is_empty() {
        log::info!(
            "metadata: built the reference index of {} stored manifests",
            rows.len()
        );
    }
    Ok(())
}
