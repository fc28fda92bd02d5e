//! The schema and its migrations. `PRAGMA user_version` holds the version; each
//! migration runs in its own transaction together with the version bump, so a crash
//! mid-migration leaves the previous version intact.

use rusqlite::Connection;

/// Migrations in order: `MIGRATIONS[n]` takes version n to n + 1. Append only.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 0 → 1: tasks, per-session settings, metadata.
    r#"
    CREATE TABLE tasks (
        seq         INTEGER PRIMARY KEY,
        id          TEXT NOT NULL UNIQUE,
        session     TEXT NOT NULL,
        text        TEXT NOT NULL,
        state       TEXT NOT NULL,
        -- Per-session queue order: +seq for a message appended, -seq for one put in
        -- front (interrupt), so ascending order is the queue's order.
        queue_order INTEGER NOT NULL,
        mode        TEXT NOT NULL,
        priority    TEXT NOT NULL,
        options     TEXT,
        message_id  TEXT,
        created_at  INTEGER NOT NULL,
        started_at  INTEGER,
        finished_at INTEGER,
        progress    TEXT,
        result      TEXT,
        ending      TEXT,
        reason      TEXT,
        exit_code   INTEGER,
        exit_signal INTEGER,
        pid         INTEGER,
        pid_start   INTEGER,
        boot_id     TEXT,
        attempt_of  TEXT,
        checkpoint  TEXT
    );
    CREATE INDEX tasks_live ON tasks(queue_order)
        WHERE state IN ('queued', 'starting', 'running', 'stopping');
    CREATE UNIQUE INDEX tasks_message ON tasks(session, message_id)
        WHERE message_id IS NOT NULL;
    CREATE INDEX tasks_finished ON tasks(finished_at, seq)
        WHERE finished_at IS NOT NULL;
    CREATE INDEX tasks_session ON tasks(session, seq);
    CREATE TABLE session_settings (
        session     TEXT PRIMARY KEY,
        mode        TEXT NOT NULL,
        debounce_ms INTEGER NOT NULL,
        cap         INTEGER NOT NULL,
        drop_policy TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 1 → 2: a message's own run-time limit (`send.timeout_ms`) is kept with it, and
    // finished tasks can be listed by id (pages of `tasks --all`).
    r#"
    ALTER TABLE tasks ADD COLUMN timeout_ms INTEGER;
    CREATE INDEX tasks_finished_id ON tasks(id) WHERE finished_at IS NOT NULL;
    "#,
    // 2 → 3: cheaper inserts (each index is one more B-tree every new task is written
    // into, and a commit writes every page it touched to the WAL). `tasks_session` is
    // dropped: no query uses it (per-session history filters finished tasks by
    // `tasks_finished`). `tasks_live` keeps its rows but tests the state with `OR`
    // instead of `IN (...)`, which SQLite evaluates on every insert and state update
    // by building a temporary table; a query for `state = 'queued'` still implies it.
    r#"
    DROP INDEX tasks_session;
    DROP INDEX tasks_live;
    CREATE INDEX tasks_live ON tasks(queue_order)
        WHERE state = 'queued' OR state = 'starting' OR state = 'running' OR state = 'stopping';
    "#,
];

/// The version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub(crate) fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Runs every migration past `from`.
pub(crate) fn migrate(conn: &mut Connection, from: i64) -> rusqlite::Result<()> {
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", n as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
