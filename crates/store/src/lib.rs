//! agentd-store: everything agentd keeps on disk, in its state dir.
//!
//! - [`Store`]: tasks, the queue and per-session settings in one SQLite file
//!   (`agentd.db`: WAL, schema versioned by `PRAGMA user_version`; every commit uses
//!   `synchronous=NORMAL`, and a syncer thread `fdatasync`s the log before the
//!   completions of acknowledged ops run: see [`Op::acknowledged`]).
//!   All SQL of agentd is in this crate. Writes are [`Op`]s, committed by one writer
//!   thread with group commit; an op's completion fires only after its transaction
//!   committed (and, if acknowledged, was synced after that), so agentd
//!   acknowledges a message only once it is on disk. Opening
//!   the store recovers it ([`Recovery`]): queued tasks in their per-session order,
//!   active ones marked interrupted, settings, recent message ids.
//! - [`InstanceLock`]: one agentd per state dir (`flock` on `agentd.lock`).
//! - [`TaskLog`] / [`LogReader`]: per-task output logs with a size cap.
//! - [`ProcessIdentity`]: a pid with its start time and boot id, so a pid read back
//!   from disk is signalled only if it is still the same process.
//!
//! The interface is narrow on purpose (ops in, records out, no SQL outside): a
//! store shared by several hosts would be a second implementation of the same ops.

mod error;
pub mod lock;
pub mod output;
pub mod pid;
mod record;
mod schema;
mod store;
mod sync;
pub mod timeline;
mod walbuf;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_pages;
#[cfg(test)]
mod tests_sync;

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

pub use error::{StorageKind, StoreError};
pub use lock::{InstanceLock, LockError, EXIT_ALREADY_RUNNING};
pub use output::{LogReader, TaskLog};
pub use pid::{Liveness, ProcessIdentity};
pub use record::{Exit, PreviousRun, Recovery, SessionSettings, State, TaskRecord};
pub use schema::SCHEMA_VERSION;
pub use store::{
    Batch, Completion, Op, Outcome, Reader, Retention, Stats, Store, StoreOptions, StoreWriter,
    Ticket, DB_FILE, REFUSED_FILE,
};

/// Creates the state dir (and its parents) with mode 0700 if it is missing. An
/// existing one must belong to this user; group or other access is removed from it.
pub fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "the state dir {} is not a directory",
            dir.display()
        )));
    }
    if meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(std::io::Error::other(format!(
            "the state dir {} belongs to another user (uid {}); give agentd a --state-dir of your own",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
