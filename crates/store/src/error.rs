//! The store's errors. Each message names the file and says what to do.

use std::path::PathBuf;

/// What kind of trouble a failed write met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// The disk (or the store's size limit) is full.
    Full,
    /// Any other failure to read or write the file.
    Io,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The file is not a readable agentd store. agentd must not start on it.
    #[error(
        "the store {} is corrupt or not an agentd store ({detail}); agentd will not start on it. \
         Move it aside together with its -wal and -shm files to start with an empty store, \
         or restore it from a backup",
        .path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    /// The file was written by a newer agentd.
    #[error(
        "the store {} has schema version {found}, but this agentd knows versions up to \
         {supported}; run the newer agentd, or give this one another --state-dir",
        .path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The file or its directory cannot be opened.
    #[error(
        "cannot open the store {}: {detail}; check that the state dir exists and that you \
         can read and write it",
        .path.display()
    )]
    Open { path: PathBuf, detail: String },
    /// A write failed on the disk; nothing of the failed transaction was recorded. The
    /// writer carries on, and later writes succeed once the disk is writable again.
    #[error("{}: nothing was recorded ({detail})", match .kind {
        StorageKind::Full => "the disk holding agentd's store is full",
        StorageKind::Io => "agentd's store cannot be written",
    })]
    Storage { kind: StorageKind, detail: String },
    /// This write was refused (e.g. a task id that already exists); other writes of the
    /// same transaction were committed.
    #[error("the store refused a write: {0}")]
    Rejected(String),
    /// The store was closed, or its writer thread is gone.
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// True for disk trouble (full, I/O): worth retrying later.
    pub fn is_storage(&self) -> bool {
        matches!(self, StoreError::Storage { .. })
    }
}

/// How a rusqlite error is treated by the writer.
pub(crate) fn classify(e: &rusqlite::Error) -> Option<StorageKind> {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::DiskFull) => Some(StorageKind::Full),
        Some(
            C::SystemIoFailure
            | C::CannotOpen
            | C::ReadOnly
            | C::DatabaseCorrupt
            | C::NotADatabase
            | C::DatabaseBusy
            | C::DatabaseLocked
            | C::OutOfMemory
            | C::FileLockingProtocolFailed
            | C::OperationInterrupted
            | C::InternalMalfunction,
        ) => Some(StorageKind::Io),
        _ => None,
    }
}

pub(crate) fn storage(kind: StorageKind, e: &rusqlite::Error) -> StoreError {
    StoreError::Storage {
        kind,
        detail: e.to_string(),
    }
}
