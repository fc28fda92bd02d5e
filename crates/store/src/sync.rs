//! The syncer: makes the writer's commits durable off the writer's thread, and
//! hands every op its outcome.
//!
//! The writer commits each transaction with `synchronous=NORMAL` (its frames are in
//! the `-wal` file, in the page cache, once `COMMIT` returns) and queues it here,
//! with its ops and their outcomes, in commit order. The syncer thread takes every
//! transaction queued so far, runs one `fdatasync` on its own descriptor of the
//! `-wal` file (the same inode as SQLite's: `fdatasync` flushes the file, whichever
//! descriptor asks) and only then calls their completions, in commit order. So an
//! answer never leaves before an `fdatasync` that started after its transaction's
//! `COMMIT` returned; the writer neither waits in `fdatasync` nor wakes the
//! waiting clients itself, and the ops that come in meanwhile gather into its next
//! transaction (see [`SyncQueue::wait_for_sync`]). A transaction of state changes
//! only needs no sync; it is still completed here (in order) when anything is
//! queued or in flight ahead of it, else by the writer at once. See the module docs of `store.rs` for why this is as durable as
//! `synchronous=FULL`, and what a failed sync does.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

use crate::error::{StorageKind, StoreError};
use crate::store::{complete, defer_wakes, Msg, Request, Shared};
use crate::timeline::{self, Stage};
use crate::walbuf::Unsynced;
use crate::Outcome;

/// One committed transaction: its ops and their outcomes, in order.
pub(crate) struct Committed {
    pub(crate) requests: Vec<Request>,
    pub(crate) results: Vec<Result<Outcome, StoreError>>,
    /// It holds an acknowledged op: completed only after a sync.
    pub(crate) durable: bool,
}

impl Committed {
    /// Calls the completions. One that panics is reported and the others still run:
    /// the syncer must not die with syncs and answers owed (the writer would wait
    /// for it for ever).
    fn release(self) {
        for (request, result) in self.requests.into_iter().zip(self.results) {
            let call = std::panic::AssertUnwindSafe(|| complete(request, result));
            if std::panic::catch_unwind(call).is_err() {
                tracing::error!("store: a write's completion panicked");
            }
        }
    }
}

/// What the writer and the syncer share.
#[derive(Default)]
pub(crate) struct SyncQueue {
    state: Mutex<SyncState>,
    /// The syncer waits here for work.
    ready: Condvar,
    /// The writer waits here for a sync in flight to end.
    taken: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Committed, not yet completed, in commit order.
    queued: VecDeque<Committed>,
    /// The syncer has taken transactions and not yet completed them all.
    in_flight: bool,
    /// The writer is running a transaction (from [`SyncQueue::committing`] to its
    /// [`SyncQueue::push`] or [`SyncQueue::committed_nothing`]).
    committing: bool,
    /// Transactions pushed so far (the syncer waits for the next one).
    pushes: u64,
    /// A sync failed: what it covered is back at the front of `queued`, for the
    /// writer to settle ([`SyncQueue::take_failed`]); the syncer waits until then.
    failed: Option<StoreError>,
    closing: bool,
    /// Test hooks: a sync waits while `hold` is set (`held` says it is waiting),
    /// and fails with `fail_next` instead of syncing.
    #[cfg(test)]
    hold: Option<mpsc::Receiver<()>>,
    #[cfg(test)]
    held: bool,
    /// The next sync of a transaction that needs one fails with this instead of
    /// syncing: a test hook, and what the writer does when its log could not be
    /// written out after a commit (walbuf.rs; never seen).
    fail_next: Option<std::io::Error>,
    /// Test hook: this many repairs of the log fail.
    #[cfg(test)]
    fail_repairs: u32,
    /// Test hook: a failed sync also loses what it was to write, as Linux may drop
    /// (or mark clean) the pages it could not write: the log's bytes past what the
    /// last good sync covered read back as zeros (as never written). The log's
    /// length before the last good sync marks what it covered (so this is for a
    /// log not reset since).
    #[cfg(test)]
    lose_unsynced: bool,
    #[cfg(test)]
    synced_len: u64,
}

impl SyncQueue {
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer hands over a committed transaction. Returns it back when nothing
    /// is ahead of it and it needs no sync: the writer completes it at once.
    pub(crate) fn push(&self, committed: Committed) -> Option<Committed> {
        let mut state = self.lock();
        state.committing = false;
        state.pushes += 1;
        if !committed.durable
            && state.queued.is_empty()
            && !state.in_flight
            && state.failed.is_none()
        {
            return Some(committed);
        }
        state.queued.push_back(committed);
        drop(state);
        self.ready.notify_one();
        None
    }

    /// After a failed sync: the error and every transaction not completed yet (the
    /// ones the sync covered and any committed since), in commit order. The syncer
    /// carries on with what is queued after this.
    pub(crate) fn take_failed(&self) -> Option<(StoreError, Vec<Committed>)> {
        let mut state = self.lock();
        let error = state.failed.take()?;
        let committed = state.queued.drain(..).collect();
        drop(state);
        self.ready.notify_one();
        Some((error, committed))
    }

    /// The writer starts a transaction: a sync about to start waits for it, so that
    /// the ops that came in while the previous sync ran share the next one instead
    /// of needing one more (with 64 clients waiting, one per sync, not two halves).
    pub(crate) fn committing(&self) {
        self.lock().committing = true;
    }

    /// The transaction started with [`SyncQueue::committing`] failed.
    pub(crate) fn committed_nothing(&self) {
        self.lock().committing = false;
        self.ready.notify_one();
    }

    /// Waits while a sync is in flight, until its completions are called: the ops
    /// that come in meanwhile (with them the answered clients' next ones) gather
    /// into one transaction for the next sync. Committing during the sync instead
    /// (overlapping the commit with it) split 64 waiting clients into two halves
    /// answered by alternate syncs, in about two commits per sync, and measured
    /// slower and costlier per message than this (ARCHITECTURE.md). The writer
    /// holds ops to commit from here on (see [`SyncQueue::committing`]).
    pub(crate) fn wait_for_sync(&self) {
        let mut state = self.lock();
        state.committing = true;
        while state.in_flight && state.failed.is_none() && !state.closing {
            state = self.taken.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Ends the syncer once it has synced and completed what is queued.
    pub(crate) fn close(&self) {
        self.lock().closing = true;
        self.ready.notify_one();
    }

    /// The syncer thread. `wake` tells the writer of a failed sync.
    pub(crate) fn run(
        shared: Arc<Shared>,
        wal: File,
        unsynced: Arc<Unsynced>,
        wake: mpsc::Sender<Msg>,
    ) {
        let queue = &shared.sync;
        loop {
            let mut state = queue.lock();
            while (state.queued.is_empty() || state.failed.is_some()) && !state.closing {
                state = queue.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.queued.is_empty() || state.failed.is_some() {
                // Closing: the writer settles a failure itself.
                return;
            }
            // A transaction being committed now joins this sync (waiting for that
            // one only: a writer that commits back to back never holds it off).
            let pushes = state.pushes;
            while state.committing && state.pushes == pushes && !state.closing {
                state = queue.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            // Every transaction taken here was queued after its COMMIT returned, so
            // the sync below, which starts after this, covers all of them.
            let taken: Vec<Committed> = state.queued.drain(..).collect();
            state.in_flight = true;
            let ops: usize = taken.iter().map(|c| c.requests.len()).sum();
            timeline::mark(Stage::SyncTaken, ops as u32);
            let durable = taken.iter().any(|c| c.durable);
            #[cfg(test)]
            if durable {
                if let Some(hold) = state.hold.take() {
                    state.held = true;
                    drop(state);
                    let _ = hold.recv();
                    state = queue.lock();
                    state.held = false;
                }
            }
            let injected = if durable {
                state.fail_next.take()
            } else {
                None
            };
            drop(state);
            #[cfg(test)]
            let len_before = wal.metadata().map(|m| m.len()).unwrap_or(0);
            let synced = if durable {
                timeline::mark(Stage::SyncStart, 0);
                let mark = unsynced.mark();
                let result = match injected {
                    Some(e) => Err(e),
                    // A sync of SQLite's own (a checkpoint's) failed since the
                    // last good one: what this one covers may be lost all the same.
                    None => wal.sync_data().and_then(|()| {
                        if unsynced.poisoned() {
                            Err(std::io::Error::other("an earlier sync of it failed"))
                        } else {
                            Ok(())
                        }
                    }),
                };
                timeline::mark(Stage::SyncEnd, 0);
                match &result {
                    Ok(()) => {
                        unsynced.synced(mark);
                        shared.syncs.fetch_add(1, Ordering::Relaxed);
                    }
                    // Before the writer hears of it: from now on nothing trusts
                    // the log's unsynced bytes (walbuf.rs).
                    Err(_) => unsynced.failed(),
                }
                result
            } else {
                Ok(())
            };
            match synced {
                Ok(()) => {
                    #[cfg(test)]
                    if durable {
                        queue.lock().synced_len = len_before;
                    }
                    // The tickets answered here wake together, with one call.
                    defer_wakes(&shared, || {
                        for committed in taken {
                            committed.release();
                        }
                    });
                    timeline::mark(Stage::Released, ops as u32);
                    queue.lock().in_flight = false;
                    queue.taken.notify_one();
                }
                Err(e) => {
                    // Not tried again: after an I/O error Linux may have dropped the
                    // pages it could not write, so a second fdatasync could succeed
                    // without them. The writer settles what this covered.
                    tracing::warn!("store: cannot sync the write-ahead log: {e}");
                    let kind = match e.raw_os_error() {
                        Some(libc::ENOSPC | libc::EDQUOT) => StorageKind::Full,
                        _ => StorageKind::Io,
                    };
                    let mut state = queue.lock();
                    #[cfg(test)]
                    if state.lose_unsynced {
                        lose_unsynced(&wal, state.synced_len);
                    }
                    for committed in taken.into_iter().rev() {
                        state.queued.push_front(committed);
                    }
                    state.in_flight = false;
                    state.failed = Some(StoreError::Storage {
                        kind,
                        detail: format!("cannot sync the write-ahead log to disk: {e}"),
                    });
                    drop(state);
                    queue.taken.notify_one();
                    let _ = wake.send(Msg::SyncFailed);
                }
            }
        }
    }

    /// Holds the next sync (of a transaction that needs one) until the returned
    /// sender is dropped (tests only).
    #[cfg(test)]
    pub(crate) fn hold(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        self.lock().hold = Some(rx);
        tx
    }

    /// The syncer is waiting in a hold.
    #[cfg(test)]
    pub(crate) fn held(&self) -> bool {
        self.lock().held
    }

    /// The next sync (of a transaction that needs one) fails with `e` instead of
    /// syncing.
    pub(crate) fn fail_next(&self, e: std::io::Error) {
        self.lock().fail_next = Some(e);
    }

    /// Every failed sync from now on also loses the log's bytes it was to write
    /// (tests only).
    #[cfg(test)]
    pub(crate) fn lose_unsynced(&self) {
        self.lock().lose_unsynced = true;
    }

    /// The store is closing (tests only).
    #[cfg(test)]
    pub(crate) fn closing(&self) -> bool {
        self.lock().closing
    }

    /// The next `n` repairs of the log after a failed sync fail (tests only).
    #[cfg(test)]
    pub(crate) fn fail_repairs(&self, n: u32) {
        self.lock().fail_repairs = n;
    }

    /// Whether this repair is to fail (counts it).
    #[cfg(test)]
    pub(crate) fn repair_fails(&self) -> bool {
        let mut state = self.lock();
        let fails = state.fail_repairs > 0;
        state.fail_repairs = state.fail_repairs.saturating_sub(1);
        fails
    }
}

/// Overwrites the log from `from` to its end with zeros: what reads return once the
/// page cache has dropped pages that never reached the disk (tests only).
#[cfg(test)]
fn lose_unsynced(wal: &File, from: u64) {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let path = format!("/proc/self/fd/{}", wal.as_raw_fd());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("the log opened for writing");
    let len = file.metadata().expect("the log's size").len();
    if len > from {
        file.write_all_at(&vec![0; (len - from) as usize], from)
            .expect("the log overwritten");
    }
}
