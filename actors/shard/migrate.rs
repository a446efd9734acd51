//! Schema migrations: the SQL files of `schema/`, compiled into the binary and applied
//! in order to a shard at connect time.
//!
//! Each file runs once, in a transaction of its own that also records it in
//! `schema_migrations`, under a transaction-scoped advisory lock, so two nodes sharing a
//! database never apply one twice and a failed file leaves the ones before it applied.
//! Files must never be edited once released: a change is a new file.
//!
//! Nothing here may make the server send NOTICEs on an ordinary start (no `IF NOT EXISTS`
//! on objects that exist): they would reach the node's log at info.

use deadpool_postgres::Client;

/// Every migration, in order: (version, SQL).
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../../schema/0001_init.sql")),
    ("0002_sealed_email", include_str!("../../schema/0002_sealed_email.sql")),
    ("0003_recommendations", include_str!("../../schema/0003_recommendations.sql")),
    ("0004_replication", include_str!("../../schema/0004_replication.sql")),
];

/// An arbitrary constant naming the migration lock.
const LOCK_KEY: i64 = 0x636f_736d_6963;

/// Applies the migrations this database does not have yet; returns how many ran.
pub async fn apply(client: &mut Client) -> Result<usize, tokio_postgres::Error> {
    // The bookkeeping table, created under the lock (so two nodes cannot race on it)
    // and only when missing.
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
    if tx.query_one("SELECT to_regclass('schema_migrations') IS NULL", &[]).await?.get::<_, bool>(0) {
        tx.batch_execute(
            "CREATE TABLE schema_migrations (
                 version text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    }
    tx.commit().await?;

    let mut applied = 0;
    for (version, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
        let done = tx.query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[version]).await?.is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[version]).await?;
            applied += 1;
        }
        tx.commit().await?;
    }
    Ok(applied)
}
