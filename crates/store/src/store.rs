//! The store: one SQLite file (`agentd.db`, WAL) in the state dir, written by one
//! writer thread with group commit, made durable by a syncer thread, read back at
//! start for recovery.
//!
//! Writes are [`Op`]s. A caller submits an op and is told its outcome once the
//! transaction holding it has committed (or failed) and, for an acknowledged op
//! (new work, settings, a flush: see [`Op::acknowledged`]), once it is on disk. The
//! writer takes every op that is waiting, runs them all in one transaction and
//! commits once, so 64 clients share commits and syncs instead of queueing for them.
//!
//! Durability: the sync is the syncer's. The writer commits every transaction with
//! `synchronous=NORMAL`: in WAL mode `COMMIT` appends the transaction's frames, the
//! last one marked as a commit, to the `-wal` file and returns without an `fsync`.
//! The frames are then in the page cache, so they survive agentd being killed
//! (kill -9, OOM); an OS crash or power loss can still lose them. The writer hands
//! the committed transaction (its ops and outcomes) to the syncer thread
//! (`sync.rs`) and goes on to the next batch. The syncer takes everything handed
//! over so far, runs one `fdatasync` on its own descriptor of the `-wal` file and
//! only then calls the completions, in commit order. An acknowledged op's
//! completion therefore runs only after an `fdatasync` that started after its
//! `COMMIT` returned. The writer spends no time in `fsync` and none waking the
//! clients; while a sync is in flight the ops that come in gather for its next
//! transaction (committing during the sync was tried: it split 64 waiting clients
//! into halves answered by alternate syncs and measured slower, see
//! `SyncQueue::wait_for_sync`). A transaction of state changes only (started,
//! finished, progress, checkpoint, prune) needs no sync; its completions still wait
//! behind any sync ahead of them (all completions run in commit order), and run on
//! the writer at once when nothing is ahead.
//!
//! Why this is as durable as committing with `synchronous=FULL` (which syncs the
//! log inside `COMMIT`, before it returns):
//! - The same bytes reach the disk. With FULL, SQLite writes the frames and then
//!   syncs the `-wal` file; here SQLite writes the same frames (through `walbuf.rs`,
//!   which writes a transaction's frames in one call per 128 KiB, all before `COMMIT`
//!   returns, which the writer checks after every commit) and the syncer syncs
//!   the same file before anyone is told (SQLite as bundled calls `fsync`; the
//!   syncer's `fdatasync` leaves out only the file's times, which recovery does not
//!   read). `fdatasync` flushes the inode's dirty
//!   pages and the size it needs, whichever descriptor it is called on, so the
//!   syncer's descriptor flushes what SQLite wrote through its own. SQLite creates
//!   the `-wal` file when the connection first reads the store (before the syncer
//!   opens it) and keeps the inode while a connection is open: resetting the log
//!   writes it from the start again, `journal_size_limit` and
//!   `wal_checkpoint(TRUNCATE)` truncate it in place, and only closing the last
//!   connection deletes it (tests_sync.rs compares the inodes through checkpoints,
//!   resets and a truncation). The state dir is synced once at open, so the file's
//!   name is on disk as well.
//! - Recovery finds it. After a crash SQLite rebuilds the log's index from the
//!   `-wal` file: frames whose salts match the header and whose running checksums
//!   hold, up to the last frame marked as a commit. A synced transaction's frames
//!   and every frame before them (the sync covers the whole file) are on disk, so
//!   recovery keeps it and everything committed before it, as with FULL.
//! - Checkpoints do not depend on the syncer. In WAL mode `synchronous=NORMAL`
//!   still syncs the `-wal` file before a checkpoint copies pages into the store
//!   file, and syncs the store file after, before the log may be reset. A
//!   transaction checkpointed before the syncer got to it is therefore on disk in
//!   the store file already; its completion still waits for the syncer (harmless).
//! - Resetting the log (after a complete checkpoint the next transaction writes it
//!   from the start with new salts) writes and syncs the new header before any new
//!   frame in NORMAL mode too (SQLite syncs the header at a reset unless syncs are
//!   off). Frames of the old log left on disk past the new ones fail the salt
//!   check; what they held was checkpointed and synced into the store file before.
//! - A reader may see a committed transaction before it is synced (WAL makes a
//!   commit visible when `COMMIT` returns; with FULL only after its sync). Nothing
//!   is acknowledged from such a read: agentd answers new work only from its
//!   insert's completion, its readers serve history and de-duplication of
//!   finished tasks, and its memory holds new work before it is committed at all.
//!   If power fails before the sync, the task is lost together with every such
//!   view of it, and no one was told it was saved.
//! - A sync that fails acknowledges nothing it covered (see Disk trouble below).
//!
//! Where it differs is only after a failed sync: with FULL a failed sync leaves its
//! transaction uncommitted and the next one writes over its frames; here SQLite
//! holds it as committed, so the store undoes it itself (below). Nothing is read
//! back from the log to do so: after a failed `fdatasync` Linux may have dropped
//! the pages it could not write, or kept them clean but not on disk (PostgreSQL's
//! "fsyncgate"), so a read could return what the disk holds instead of what SQLite
//! wrote, and a later `fdatasync` could succeed without them ever reaching the disk.
//! The writer's log keeps its own copy of every byte written since the last good
//! sync (`walbuf::Unsynced`, normally what one sync covers), and the repair writes
//! all of it again and syncs: a sync that succeeds after the rewrite covers pages
//! dirtied after the error, so the log on disk then holds exactly what SQLite counts
//! as committed. Until then the log is poisoned: SQLite's own syncs of it fail at
//! once, so no checkpoint copies its frames into the store file (a failed sync of
//! SQLite's own poisons it too, and the syncer's next sync then counts as failed,
//! whatever its `fdatasync` said). tests_sync.rs has a hook that zeroes what a
//! failed sync was to write: reading it back made the store file malformed.
//!
//! Disk trouble (full, I/O errors) while writing rolls the transaction back. New
//! work ([`Op::Insert`]) then fails at once with [`StoreError::Storage`], so nothing
//! is acknowledged that is not on disk; state changes of existing tasks are kept
//! and retried (first in every later transaction, and on a timer) and complete when
//! they finally commit. A failed `fdatasync` is not tried again as if a second try
//! could succeed for the same pages (after an I/O error Linux may drop the pages it
//! could not write and report the error only once). Every transaction not yet
//! completed (those the sync covered, and those committed since, which follow
//! frames that may be lost) is settled by the writer: new work fails with
//! [`StoreError::Storage`] and its rows are deleted again (an internal
//! `Op::Discard`, first of the next transaction), and its senders are told only
//! once that deletion is synced (the discard's completion) or, when the log cannot
//! be repaired, once their ids are recorded in [`REFUSED_FILE`] beside the store
//! (synced, with the dir), which the next open deletes before recovery: until then
//! a crash could bring the rows back, so "not saved" would not be true yet. Only if
//! neither can be written do they wait (for the repair); settings and flushes
//! are written again, in order, ahead of anything newer (with
//! [`StoreWriter::submit_reporting`], told of the failure at once); state changes
//! keep what they did. Since SQLite counts the unsynced frames as committed and
//! later commits would follow them, nothing more is written until the log is
//! repaired as above (tried before every transaction, and on the retry timer;
//! meanwhile new work is refused at once and state changes wait). The writer never
//! stops over it.
//!
//! Closing: the syncer syncs and completes what is committed and ends; if its last
//! sync failed, the writer settles it as above and then, with the syncer gone,
//! repairs the log and commits what is left (the discard, settings written again,
//! state changes waiting) with `synchronous=FULL` before it tells anyone, so a task
//! refused at close does not come back at the next start. If that last try fails
//! too (the disk still failing), everything left is reported as not saved, the
//! refused tasks' senders once their ids are in [`REFUSED_FILE`] as above; only if
//! that file cannot be written either may they come back (logged as an error). If the log could not be written again,
//! it stays poisoned and is not checkpointed: its frames are left to the next
//! open's recovery, which checks their checksums.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use uuid::Uuid;

use crate::error::{classify, storage, StorageKind, StoreError};
use crate::output;
use crate::pid::ProcessIdentity;
use crate::record::{Exit, PreviousRun, Recovery, SessionSettings, State, TaskRecord};
use crate::schema;
use crate::sync::{Committed, SyncQueue};
use crate::timeline::{self, Stage};
use crate::walbuf;

/// Name of the store file in the state dir.
pub const DB_FILE: &str = "agentd.db";

/// Most ops in one transaction, give or take one hand-over: a [`Batch`] is taken
/// whole (it is handed over in parts of at most this many), so a transaction holds
/// fewer than twice this.
const MAX_BATCH: usize = 8192;

/// How finished tasks are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Finished tasks older than this are deleted (with their logs).
    pub max_age: Option<Duration>,
    /// At most this many finished tasks are kept (the newest).
    pub max_finished: Option<u64>,
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub retention: Retention,
    /// The reason recorded on tasks that were active when the previous agentd died.
    pub interrupted_reason: String,
    /// How many recent message ids [`Recovery::recent_messages`] holds.
    pub recent_messages: usize,
    /// How often the writer prunes on its own.
    pub prune_interval: Duration,
    /// How soon writes that failed on the disk are tried again.
    pub retry_interval: Duration,
    /// Caps the file at this many pages (`PRAGMA max_page_count`): a full disk for tests.
    pub max_page_count: Option<u64>,
    /// Whether [`Recovery::queued`] is filled at open. agentd reads the queued tasks
    /// a page at a time instead ([`Reader::queued_page`]), so that a large queue is
    /// never in memory twice (as records and as tasks).
    pub read_queued: bool,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            retention: Retention {
                max_age: Some(Duration::from_secs(30 * 24 * 3600)),
                max_finished: Some(10_000),
            },
            interrupted_reason: "daemon crashed".to_string(),
            recent_messages: 10_000,
            prune_interval: Duration::from_secs(3600),
            retry_interval: Duration::from_secs(1),
            max_page_count: None,
            read_queued: true,
        }
    }
}

/// One write.
#[derive(Debug, Clone)]
pub enum Op {
    /// A new task (new work, or a follow-up or resumed attempt). `front`: it goes to
    /// the front of its session's queue (interrupt mode). A task whose
    /// (session, message_id) is already stored is not inserted: the outcome is
    /// [`Outcome::Duplicate`] with the stored task's id. Fails at once on disk
    /// trouble, so the message can be refused.
    Insert { task: Box<TaskRecord>, front: bool },
    /// The task was admitted: `starting`, with its start time (and agent, if known).
    /// `text`: the prompt the agent got, when it differs from the message (a
    /// collected follow-up).
    Start {
        id: Uuid,
        at: i64,
        process: Option<ProcessIdentity>,
        text: Option<String>,
    },
    /// The agent process is known.
    SetProcess { id: Uuid, process: ProcessIdentity },
    /// A non-terminal state change (`running`, `stopping`; `queued` again).
    SetState { id: Uuid, state: State },
    /// The latest progress line.
    Progress { id: Uuid, text: String },
    /// The task ended. `progress` (if given) is its last progress line.
    Finish {
        id: Uuid,
        state: State,
        at: i64,
        progress: Option<String>,
        result: Option<String>,
        ending: Option<String>,
        reason: Option<String>,
        exit: Option<Exit>,
    },
    /// The agent's latest checkpoint (replaces the previous one).
    Checkpoint { id: Uuid, data: String },
    /// A session's queue settings (`/queue`).
    Settings(SessionSettings),
    /// A session's queue settings back to the defaults (`/queue reset`).
    ResetSettings { session: String },
    /// Prunes finished tasks by the retention now.
    Prune,
    /// Writes nothing; completes once every op submitted before it has committed.
    Flush,
    /// Caps the file size in pages (`None`: SQLite's default): a full disk for tests.
    #[doc(hidden)]
    LimitPages(Option<u64>),
    /// Deletes tasks whose inserts committed but whose sync failed, so that what
    /// the store holds is what their senders were told (refused). The writer's own.
    #[doc(hidden)]
    Discard(Vec<Uuid>),
}

impl Op {
    /// New work fails at once on disk trouble; everything else is retried.
    fn fail_fast(&self) -> bool {
        matches!(self, Op::Insert { .. })
    }

    /// Whether a client is (or may be) told this op is saved: new work (a message is
    /// acknowledged once its insert committed), queue settings, a flush. Its
    /// completion waits for a sync of the write-ahead log that started after its
    /// transaction committed; a transaction of state changes only needs no sync
    /// (see the module docs).
    pub fn acknowledged(&self) -> bool {
        match self {
            Op::Insert { .. }
            | Op::Settings(_)
            | Op::ResetSettings { .. }
            | Op::Flush
            | Op::Discard(_) => true,
            Op::Start { .. }
            | Op::SetProcess { .. }
            | Op::SetState { .. }
            | Op::Progress { .. }
            | Op::Finish { .. }
            | Op::Checkpoint { .. }
            | Op::Prune
            | Op::LimitPages(_) => false,
        }
    }
}

/// What an op did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Inserted,
    /// The message was stored before, as this task.
    Duplicate(Uuid),
    /// Rows changed (0 when the task is not stored).
    Updated(usize),
    /// Ids of the tasks pruned.
    Pruned(Vec<Uuid>),
    Done,
}

/// Called with an op's outcome once its transaction committed or failed.
pub type Completion = Box<dyn FnOnce(Result<Outcome, StoreError>) + Send>;

pub(crate) struct Request {
    op: Op,
    done: Option<Completion>,
    /// `done` hears of a failure at once, though the op waits to be retried.
    early: bool,
}

impl Request {
    /// An op whose `done` hears of its outcome (`early`: of a first failure at once).
    fn new(
        op: Op,
        done: impl FnOnce(Result<Outcome, StoreError>) + Send + 'static,
        early: bool,
    ) -> Request {
        Request {
            op,
            done: Some(Box::new(done)),
            early,
        }
    }

    /// An op nobody waits for.
    fn detached(op: Op) -> Request {
        Request {
            op,
            done: None,
            early: false,
        }
    }
}

pub(crate) enum Msg {
    Op(Request),
    /// Several ops handed over at once ([`StoreWriter::submit_batch`]), in order.
    Ops(Vec<Request>),
    /// Sent by [`Store::close`]: everything before it is written, then the writer ends.
    Close,
    /// Sent by the syncer: a sync failed; the writer settles what it covered.
    SyncFailed,
    #[cfg(test)]
    Hold(mpsc::Receiver<()>),
}

/// Counters of the writer and the syncer, and the queue between them.
#[derive(Default)]
pub(crate) struct Shared {
    commits: AtomicU64,
    synced_commits: AtomicU64,
    pub(crate) syncs: AtomicU64,
    ops: AtomicU64,
    failed_commits: AtomicU64,
    pending_retries: AtomicU64,
    healthy: AtomicBool,
    pub(crate) sync: SyncQueue,
    answers: Answers,
}

/// What the writer has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Transactions committed.
    pub commits: u64,
    /// Of those, the ones that held an acknowledged op: their ops completed only
    /// after a sync of the write-ahead log that started after they committed.
    pub synced_commits: u64,
    /// `fdatasync`s of the write-ahead log by the syncer (one covers every
    /// transaction committed before it started).
    pub syncs: u64,
    /// Ops committed.
    pub ops: u64,
    /// Transactions that failed on the disk.
    pub failed_commits: u64,
    /// State changes waiting to be retried.
    pub pending_retries: u64,
    /// The last transaction committed.
    pub healthy: bool,
}

/// A cheap, cloneable handle to submit writes from any thread.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// Ops to hand to the writer together ([`StoreWriter::submit_batch`]), in the
/// order they were added.
#[derive(Default)]
pub struct Batch(Vec<Request>);

impl Batch {
    /// As [`StoreWriter::submit_with`].
    pub fn submit_with(
        &mut self,
        op: Op,
        done: impl FnOnce(Result<Outcome, StoreError>) + Send + 'static,
    ) {
        self.0.push(Request::new(op, done, false));
    }

    /// As [`StoreWriter::submit_reporting`].
    pub fn submit_reporting(
        &mut self,
        op: Op,
        done: impl FnOnce(Result<Outcome, StoreError>) + Send + 'static,
    ) {
        self.0.push(Request::new(op, done, true));
    }

    /// As [`StoreWriter::submit_detached`].
    pub fn submit_detached(&mut self, op: Op) {
        self.0.push(Request::detached(op));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Waits for one op's outcome.
pub struct Ticket {
    slot: Arc<OnceLock<Result<Outcome, StoreError>>>,
    shared: Arc<Shared>,
}

impl Ticket {
    /// Blocks until the op's transaction committed or failed.
    pub fn wait(self) -> Result<Outcome, StoreError> {
        let word = &self.shared.answers.0;
        loop {
            // The generation is read before the slot: an answer set after this
            // read bumps it, so the wait below returns at once.
            let generation = word.load(Ordering::Acquire);
            if let Some(result) = self.slot.get() {
                return result.clone();
            }
            // Sleeps while the word holds `generation` (or until a spurious wake-up).
            atomic_wait::wait(word, generation);
        }
    }
}

/// Where threads blocked in [`Ticket::wait`] sleep: one futex word for all of them,
/// bumped at every wake-up, so that the syncer wakes every ticket of a sync with one
/// call (`FUTEX_WAKE` of all) instead of one per answer. A ticket of a later sync
/// woken with them finds its slot empty and sleeps again.
#[derive(Default)]
pub(crate) struct Answers(AtomicU32);

impl Answers {
    fn wake_all(&self) {
        self.0.fetch_add(1, Ordering::Release);
        atomic_wait::wake_all(&self.0);
    }
}

thread_local! {
    /// Inside [`defer_wakes`]: tickets answered meanwhile (`Some(true)`) wake their
    /// threads together at its end.
    static DEFERRED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (which calls completions) and wakes the threads of the tickets it
/// answered with one call at the end.
pub(crate) fn defer_wakes(shared: &Shared, f: impl FnOnce()) {
    let outer = DEFERRED.with(|d| d.replace(Some(false)));
    f();
    let answered = DEFERRED.with(|d| d.replace(outer)) == Some(true);
    if answered {
        shared.answers.wake_all();
    }
}

/// A ticket's side held by its completion: sets the outcome and wakes the waiter
/// (at the end of [`defer_wakes`] when inside it). Dropped without an answer (the
/// op was dropped unwritten: the writer is gone), it answers `Closed`.
struct Answer {
    slot: Arc<OnceLock<Result<Outcome, StoreError>>>,
    shared: Arc<Shared>,
}

impl Answer {
    fn send(&self, result: Result<Outcome, StoreError>) {
        if self.slot.set(result).is_err() {
            return;
        }
        let deferred = DEFERRED.with(|d| match d.get() {
            Some(_) => {
                d.set(Some(true));
                true
            }
            None => false,
        });
        if !deferred {
            self.shared.answers.wake_all();
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if self.slot.get().is_none() {
            self.send(Err(StoreError::Closed));
        }
    }
}

impl StoreWriter {
    /// Submits `op`; `done` is called on the writer thread with its outcome after the
    /// transaction holding it committed (keep it short: e.g. send to a channel).
    pub fn submit_with(
        &self,
        op: Op,
        done: impl FnOnce(Result<Outcome, StoreError>) + Send + 'static,
    ) {
        self.send(Request::new(op, done, false));
    }

    /// Submits `op` like [`StoreWriter::submit_with`], but if its transaction fails
    /// and the op has to wait to be retried (every op but new work is retried, in
    /// order, until it commits), `done` is called with that first error at once: for
    /// an answer that must not wait for the disk to recover.
    pub fn submit_reporting(
        &self,
        op: Op,
        done: impl FnOnce(Result<Outcome, StoreError>) + Send + 'static,
    ) {
        self.send(Request::new(op, done, true));
    }

    fn send(&self, request: Request) {
        if let Err(mpsc::SendError(Msg::Op(request))) = self.tx.send(Msg::Op(request)) {
            if let Some(done) = request.done {
                done(Err(StoreError::Closed));
            }
        }
    }

    /// Submits every op of `batch`, in order, as one hand-over: the writer is woken
    /// (a futex wake, when it sleeps) once for all of them, not once per op, and
    /// takes them all into its next transaction (a batch longer than a transaction
    /// may hold is handed over in parts). Each op completes as if submitted alone
    /// by the method its [`Batch`] entry names.
    pub fn submit_batch(&self, batch: Batch) {
        let mut requests = batch.0;
        while !requests.is_empty() {
            let rest = requests.split_off(requests.len().min(MAX_BATCH));
            if let Err(mpsc::SendError(msg)) = self.tx.send(Msg::Ops(requests)) {
                let Msg::Ops(failed) = msg else {
                    unreachable!("sent Ops")
                };
                for request in failed.into_iter().chain(rest) {
                    if let Some(done) = request.done {
                        done(Err(StoreError::Closed));
                    }
                }
                return;
            }
            requests = rest;
        }
    }

    /// Submits `op` and returns a ticket to wait for its outcome.
    pub fn submit(&self, op: Op) -> Ticket {
        let slot = Arc::new(OnceLock::new());
        let answer = Answer {
            slot: Arc::clone(&slot),
            shared: Arc::clone(&self.shared),
        };
        self.submit_with(op, move |result| answer.send(result));
        Ticket {
            slot,
            shared: Arc::clone(&self.shared),
        }
    }

    /// Submits `op` without waiting for it (its failure is only logged).
    pub fn submit_detached(&self, op: Op) {
        let _ = self.tx.send(Msg::Op(Request::detached(op)));
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            commits: s.commits.load(Ordering::Relaxed),
            synced_commits: s.synced_commits.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            ops: s.ops.load(Ordering::Relaxed),
            failed_commits: s.failed_commits.load(Ordering::Relaxed),
            pending_retries: s.pending_retries.load(Ordering::Relaxed),
            healthy: s.healthy.load(Ordering::Relaxed),
        }
    }

    /// The queue between the writer and the syncer, for its test hooks.
    #[cfg(test)]
    pub(crate) fn sync_queue(&self) -> &SyncQueue {
        &self.shared.sync
    }

    /// Stops the writer until the returned sender is dropped (tests only).
    #[cfg(test)]
    pub(crate) fn hold(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Msg::Hold(rx)).unwrap();
        tx
    }
}

/// The open store: the writer thread and the file's path. Dropping it closes the
/// store cleanly (every op submitted before is tried, then the file is marked
/// closed); ops submitted through a [`StoreWriter`] after that fail with
/// [`StoreError::Closed`].
pub struct Store {
    writer: Option<StoreWriter>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating or migrating) `state_dir/agentd.db`, recovers it, and starts
    /// the writer. Tasks that were active become `interrupted` with
    /// `options.interrupted_reason`. Refuses a corrupt or unreadable file, or one
    /// from a newer agentd, with an error naming it.
    pub fn open(state_dir: &Path, options: StoreOptions) -> Result<(Store, Recovery), StoreError> {
        timeline::init();
        let path = state_dir.join(DB_FILE);
        let mut conn = open_checked(&path, &options)?;
        delete_refused(&conn, state_dir).map_err(|detail| StoreError::Open {
            path: path.clone(),
            detail,
        })?;
        let now = now_ms();
        let corrupt = |e: rusqlite::Error| corrupt_or_open(&path, e);
        let recovery = recover(&mut conn, &options, now).map_err(corrupt)?;
        let next_seq: i64 = conn
            .query_row("SELECT coalesce(max(seq), 0) + 1 FROM tasks", [], |r| {
                r.get(0)
            })
            .map_err(corrupt)?;
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            ..Shared::default()
        });
        let (tx, rx) = mpsc::channel();
        let open_err = |detail: String| StoreError::Open {
            path: path.clone(),
            detail,
        };
        // From here on every commit is NORMAL: the syncer makes them durable.
        conn.execute_batch("PRAGMA synchronous=NORMAL")
            .map_err(corrupt)?;
        let wal = open_wal(&path).map_err(open_err)?;
        let unsynced = walbuf::unsynced_of(&conn)
            .ok_or_else(|| open_err("its write-ahead log is not open".into()))?;
        let syncer = {
            let shared = Arc::clone(&shared);
            let wake = tx.clone();
            std::thread::Builder::new()
                .name("agentd-sync".into())
                .spawn(move || SyncQueue::run(shared, wal, unsynced, wake))
                .map_err(|e| open_err(format!("cannot start the sync thread: {e}")))?
        };
        let mut writer = Writer {
            conn,
            synchronous_full: false,
            shared: Arc::clone(&shared),
            syncer: Some(syncer),
            repair: None,
            refused_waiting: Vec::new(),
            next_seq,
            state_dir: state_dir.to_path_buf(),
            options,
        };
        // Prune once at start (failures are retried by the loop's own schedule).
        if let Ok(ids) = writer.prune_now() {
            writer.remove_logs(&ids);
        }
        let thread = std::thread::Builder::new()
            .name("agentd-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        Ok((
            Store {
                writer: Some(StoreWriter { tx, shared }),
                thread: Some(thread),
                path,
            },
            recovery,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle to submit writes.
    pub fn writer(&self) -> StoreWriter {
        self.writer.clone().expect("open until dropped")
    }

    /// Opens a read-only connection for history queries.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Reader::open(&self.path)
    }

    pub fn stats(&self) -> Stats {
        self.writer.as_ref().expect("open until dropped").stats()
    }

    /// Closes the store: waits for the writer to finish every submitted op and mark
    /// the file closed (the next open reports [`PreviousRun::Clean`]).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Other handles may live on: the writer ends at this message, not when the
        // last handle is dropped. Their later ops fail with `Closed`.
        if let Some(writer) = self.writer.take() {
            let _ = writer.tx.send(Msg::Close);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        timeline::dump();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn corrupt_or_open(path: &Path, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::NotADatabase | C::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => StoreError::Open {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    }
}

/// Makes the store file, its write-ahead log and its shared-memory file the user's
/// alone (0600), whatever the umask. SQLite creates a new store file 0644 (less the
/// umask) and gives the other two the store file's mode, so a missing store file is
/// created first, empty (SQLite makes a new store of it), with 0600; one that an older
/// agentd left open to others is made 0600, and so are its companions.
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for file in [path, &beside(path, "-wal"), &beside(path, "-shm")] {
        match std::fs::symlink_metadata(file) {
            Ok(meta) if meta.is_file() && meta.mode() & 0o077 != 0 => {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
                tracing::info!("made {} private (0600)", file.display());
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens the file, checks it is a sound store of a version we know, and migrates it.
fn open_checked(path: &Path, options: &StoreOptions) -> Result<Connection, StoreError> {
    let open_err = |e: rusqlite::Error| corrupt_or_open(path, e);
    make_private(path).map_err(|e| StoreError::Open {
        path: path.to_path_buf(),
        detail: format!("cannot make it private (0600): {e}"),
    })?;
    // Through the VFS that writes a transaction's log frames in one call (walbuf.rs).
    let vfs = walbuf::register().map_err(|detail| StoreError::Open {
        path: path.to_path_buf(),
        detail,
    })?;
    let mut conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        vfs,
    )
    .map_err(open_err)?;
    // The first read of the header finds a file that is not a database at all.
    let version = schema::user_version(&conn).map_err(open_err)?;
    if version < 0 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("schema version {version}"),
        });
    }
    if version > schema::SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported: schema::SCHEMA_VERSION,
        });
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            detail: format!("cannot use write-ahead logging (journal mode is {mode})"),
        });
    }
    conn.execute_batch(
        "PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA journal_size_limit=67108864;",
    )
    .map_err(open_err)?;
    if version > 0 {
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(open_err)?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("integrity check: {check}"),
            });
        }
    }
    schema::migrate(&mut conn, version).map_err(open_err)?;
    if let Some(pages) = options.max_page_count {
        set_max_pages(&conn, Some(pages)).map_err(open_err)?;
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// In the state dir: ids of tasks refused after a failed sync whose deletion could
/// not be written when the store closed (one a line). The next open deletes them
/// before recovery, so that they do not come back.
pub const REFUSED_FILE: &str = "agentd.refused";

/// Records `ids` in [`REFUSED_FILE`] (appended) and syncs it and the state dir.
fn write_refused(state_dir: &Path, ids: &[Uuid]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(state_dir.join(REFUSED_FILE))?;
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::File::open(state_dir)?.sync_all()
}

/// Deletes the tasks [`REFUSED_FILE`] names (a line that is not an id, e.g. one
/// torn by a crash while it was written, names no one told), then the file.
fn delete_refused(conn: &Connection, state_dir: &Path) -> Result<(), String> {
    let path = state_dir.join(REFUSED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let ids: Vec<Uuid> = text
        .lines()
        .filter_map(|line| Uuid::parse_str(line.trim()).ok())
        .collect();
    let deleted = (|| -> rusqlite::Result<usize> {
        let tx = conn.unchecked_transaction()?;
        let mut n = 0;
        for id in &ids {
            n += tx.execute("DELETE FROM tasks WHERE id = ?1", [id.to_string()])?;
        }
        tx.commit()?;
        Ok(n)
    })()
    .map_err(|e| format!("cannot delete the tasks refused at the last close: {e}"))?;
    tracing::info!("store: deleted {deleted} tasks refused when the store last closed");
    std::fs::remove_file(&path)
        .and_then(|()| std::fs::File::open(state_dir)?.sync_all())
        .map_err(|e| format!("cannot remove {}: {e}", path.display()))
}

/// The syncer's own descriptor of `path`'s write-ahead log. SQLite created the file
/// when the connection first read the store (WAL mode), and keeps that inode while a
/// connection is open: resetting the log after a checkpoint writes it from the
/// start, `journal_size_limit` and `wal_checkpoint(TRUNCATE)` truncate it in place;
/// only closing the last connection deletes it. The directory is synced once, so
/// the file's name is on disk too (SQLite's first sync of the log did that as well).
/// `path` with `suffix` appended: the store file's companions (`-wal`, `-shm`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn open_wal(path: &Path) -> Result<std::fs::File, String> {
    let wal_path = beside(path, "-wal");
    let wal = std::fs::File::open(&wal_path).map_err(|e| {
        format!(
            "cannot open its write-ahead log {}: {e}",
            wal_path.display()
        )
    })?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync the state dir {}: {e}", dir.display()))?;
    }
    Ok(wal)
}

fn set_max_pages(conn: &Connection, pages: Option<u64>) -> rusqlite::Result<()> {
    let pages = pages.unwrap_or(4_294_967_294) as i64;
    let _: i64 = conn.query_row(&format!("PRAGMA max_page_count={pages}"), [], |r| r.get(0))?;
    Ok(())
}

/// Inserts a task that has not run, skipping (as a duplicate) one whose
/// (session, message_id) is stored: the unique index finds it, no lookup before.
const INSERT_NEW: &str = "INSERT INTO tasks (seq, id, session, text, state, queue_order, \
    mode, priority, options, message_id, created_at, attempt_of, checkpoint, timeout_ms) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
    ON CONFLICT (session, message_id) WHERE message_id IS NOT NULL DO NOTHING";

/// [`INSERT_NEW`] with every column.
const INSERT_ANY: &str = "INSERT INTO tasks (seq, id, session, text, state, queue_order, \
    mode, priority, options, message_id, created_at, attempt_of, checkpoint, timeout_ms, \
    started_at, finished_at, progress, result, ending, reason, exit_code, exit_signal, pid, \
    pid_start, boot_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, \
    ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25) \
    ON CONFLICT (session, message_id) WHERE message_id IS NOT NULL DO NOTHING";

const COLUMNS: &str = "id, session, text, state, mode, priority, options, message_id, \
    created_at, started_at, finished_at, progress, result, ending, reason, exit_code, \
    exit_signal, pid, pid_start, boot_id, attempt_of, checkpoint, timeout_ms";

/// How many columns [`COLUMNS`] names.
const COLUMN_COUNT: usize = 23;

fn uuid_col(row: &Row, i: usize) -> rusqlite::Result<Uuid> {
    let text: String = row.get(i)?;
    Uuid::parse_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn record(row: &Row) -> rusqlite::Result<TaskRecord> {
    let state: String = row.get(3)?;
    let state = State::parse(&state).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            3,
            rusqlite::types::Type::Text,
            format!("unknown task state {state:?}").into(),
        )
    })?;
    let exit_code: Option<i32> = row.get(15)?;
    let exit_signal: Option<i32> = row.get(16)?;
    let pid: Option<u32> = row.get(17)?;
    let pid_start: Option<i64> = row.get(18)?;
    let boot_id: Option<String> = row.get(19)?;
    let attempt_of: Option<String> = row.get(20)?;
    Ok(TaskRecord {
        id: uuid_col(row, 0)?,
        session: row.get(1)?,
        text: row.get(2)?,
        state,
        mode: row.get(4)?,
        priority: row.get(5)?,
        options: row.get(6)?,
        message_id: row.get(7)?,
        created_at: row.get(8)?,
        started_at: row.get(9)?,
        finished_at: row.get(10)?,
        progress: row.get(11)?,
        result: row.get(12)?,
        ending: row.get(13)?,
        reason: row.get(14)?,
        exit: (exit_code.is_some() || exit_signal.is_some()).then_some(Exit {
            code: exit_code,
            signal: exit_signal,
        }),
        process: match (pid, pid_start, boot_id) {
            (Some(pid), Some(start), Some(boot_id)) => Some(ProcessIdentity {
                pid,
                start_time: start as u64,
                boot_id,
            }),
            _ => None,
        },
        attempt_of: attempt_of.and_then(|t| Uuid::parse_str(&t).ok()),
        checkpoint: row.get(21)?,
        timeout_ms: row.get::<_, Option<i64>>(22)?.map(|ms| ms.max(0) as u64),
    })
}

/// The query of [`queued_page`]. `state = 'queued'` implies the live-task index's
/// condition (an `OR` of the live states), which lets SQLite use it.
pub(crate) fn queued_page_sql() -> String {
    format!(
        "SELECT {COLUMNS}, queue_order FROM tasks WHERE state = 'queued' \
         AND queue_order > ?1 ORDER BY queue_order LIMIT ?2"
    )
}

/// Queued tasks in queue order (each session's in its order; sessions interleave in
/// the order their messages arrived) after the place `after` (None: from the first),
/// at most `limit`, and the place of the last one returned (None if none was). Walks
/// the live-task index: no sort, however long the queue.
fn queued_page(
    conn: &Connection,
    after: Option<i64>,
    limit: usize,
) -> rusqlite::Result<(Vec<TaskRecord>, Option<i64>)> {
    let mut last = None;
    let rows = conn
        .prepare_cached(&queued_page_sql())?
        .query_map(
            params![
                after.unwrap_or(i64::MIN),
                limit.min(i64::MAX as usize) as i64
            ],
            |row| {
                last = Some(row.get::<_, i64>(COLUMN_COUNT)?);
                record(row)
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((rows, last))
}

/// Reads what recovery needs and marks tasks that were active as interrupted, in one
/// transaction.
fn recover(conn: &mut Connection, options: &StoreOptions, now: i64) -> rusqlite::Result<Recovery> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let previous: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'run'", [], |r| r.get(0))
        .optional()?;
    let previous_run = match previous.as_deref() {
        None => PreviousRun::None,
        Some("closed") => PreviousRun::Clean,
        Some(_) => PreviousRun::Crashed,
    };
    let active_sql = format!(
        "SELECT {COLUMNS} FROM tasks WHERE state IN ('starting', 'running', 'stopping') \
         ORDER BY queue_order"
    );
    let mut interrupted: Vec<TaskRecord> = tx
        .prepare(&active_sql)?
        .query_map([], record)?
        .collect::<rusqlite::Result<_>>()?;
    tx.execute(
        "UPDATE tasks SET state = 'interrupted', finished_at = ?1, reason = ?2 \
         WHERE state IN ('starting', 'running', 'stopping')",
        params![now, options.interrupted_reason],
    )?;
    for task in &mut interrupted {
        task.state = State::Interrupted;
        task.finished_at = Some(now);
        task.reason = Some(options.interrupted_reason.clone());
    }
    let queued = if options.read_queued {
        queued_page(&tx, None, usize::MAX)?.0
    } else {
        Vec::new()
    };
    let settings = tx
        .prepare("SELECT session, mode, debounce_ms, cap, drop_policy FROM session_settings")?
        .query_map([], |r| {
            Ok(SessionSettings {
                session: r.get(0)?,
                mode: r.get(1)?,
                debounce_ms: r.get::<_, i64>(2)? as u64,
                cap: r.get(3)?,
                drop_policy: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut recent_messages = tx
        .prepare(
            "SELECT session, message_id, id FROM tasks WHERE message_id IS NOT NULL \
             ORDER BY seq DESC LIMIT ?1",
        )?
        .query_map([options.recent_messages as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, uuid_col(r, 2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    recent_messages.reverse();
    let finished: i64 = tx.query_row(
        "SELECT count(*) FROM tasks WHERE finished_at IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('run', 'open') \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [],
    )?;
    tx.commit()?;
    Ok(Recovery {
        queued,
        interrupted,
        settings,
        recent_messages,
        previous_run,
        finished: finished as u64,
    })
}

struct Writer {
    conn: Connection,
    /// The connection's `synchronous` setting is FULL (else NORMAL).
    synchronous_full: bool,
    shared: Arc<Shared>,
    /// The syncer thread (joined when the writer ends).
    syncer: Option<JoinHandle<()>>,
    /// A sync failed, and the write-ahead log may have lost frames that SQLite
    /// holds as committed: until they are written again from memory and synced
    /// ([`Writer::repaired`]), nothing is written.
    repair: Option<StoreError>,
    /// The senders of tasks deleted again after a failed sync, each group until its
    /// discard is synced or the ids are recorded ([`Writer::record_refused`]).
    refused_waiting: Vec<Waiting>,
    next_seq: i64,
    state_dir: PathBuf,
    options: StoreOptions,
}

/// The statements one transaction has used, kept prepared until it ends: looking a
/// statement up in the connection's cache hashes its SQL, and handing it back
/// resets it and hashes again, per op.
struct Statements<'c> {
    conn: &'c Connection,
    held: Vec<(&'static str, rusqlite::CachedStatement<'c>)>,
}

impl<'c> Statements<'c> {
    fn new(conn: &'c Connection) -> Statements<'c> {
        Statements {
            conn,
            held: Vec::new(),
        }
    }

    /// The prepared statement of `sql` (a few per batch: found by address).
    fn get(&mut self, sql: &'static str) -> rusqlite::Result<&mut rusqlite::CachedStatement<'c>> {
        let i = match self.held.iter().position(|(s, _)| std::ptr::eq(*s, sql)) {
            Some(i) => i,
            None => {
                self.held.push((sql, self.conn.prepare_cached(sql)?));
                self.held.len() - 1
            }
        };
        Ok(&mut self.held[i].1)
    }
}

/// Requests waiting to be told they were refused (shared with a discard's
/// completion).
type Waiting = Arc<Mutex<Vec<Request>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failed attempt at a transaction.
struct Failed(StoreError);

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut pending: VecDeque<Request> = VecDeque::new();
        let mut next_prune = Instant::now() + self.options.prune_interval;
        let mut closing = false;
        while !closing {
            let now = Instant::now();
            let wait = if pending.is_empty() {
                next_prune.saturating_duration_since(now)
            } else {
                self.options.retry_interval
            };
            let mut batch: Vec<Request> = Vec::new();
            let take = |msg: Msg, batch: &mut Vec<Request>, closing: &mut bool| match msg {
                Msg::Op(request) => batch.push(request),
                Msg::Ops(requests) => batch.extend(requests),
                Msg::Close => *closing = true,
                // Settled below, before the next commit.
                Msg::SyncFailed => {}
                #[cfg(test)]
                Msg::Hold(release) => {
                    let _ = release.recv();
                }
            };
            match rx.recv_timeout(wait) {
                Ok(msg) => {
                    take(msg, &mut batch, &mut closing);
                    timeline::mark(Stage::WriterWoke, batch.len() as u32);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => closing = true,
            }
            if !batch.is_empty() {
                self.shared.sync.wait_for_sync();
                timeline::mark(Stage::SyncWaited, 0);
            }
            while batch.len() < MAX_BATCH && !closing {
                match rx.try_recv() {
                    Ok(msg) => take(msg, &mut batch, &mut closing),
                    Err(_) => break,
                }
            }
            if Instant::now() >= next_prune {
                batch.push(Request {
                    op: Op::Prune,
                    done: None,
                    early: false,
                });
                next_prune = Instant::now() + self.options.prune_interval;
            }
            // Size limits act at once, ahead of writes waiting on them.
            let (limits, batch): (Vec<Request>, Vec<Request>) = batch
                .into_iter()
                .partition(|r| matches!(r.op, Op::LimitPages(_)));
            for request in limits {
                let Op::LimitPages(pages) = request.op else {
                    unreachable!()
                };
                let result = set_max_pages(&self.conn, pages)
                    .map(|()| Outcome::Done)
                    .map_err(|e| storage(classify(&e).unwrap_or(StorageKind::Io), &e));
                self.hand_over(Committed {
                    requests: vec![request],
                    results: vec![result],
                    durable: false,
                });
            }
            if let Some((e, committed)) = self.shared.sync.take_failed() {
                self.settle_failed_sync(e, committed, &mut pending);
            }
            let mut all: Vec<Request> = pending.drain(..).collect();
            all.extend(batch);
            if all.is_empty() {
                self.shared.sync.committed_nothing();
            } else {
                self.commit_batch(all, &mut pending);
            }
            self.shared
                .pending_retries
                .store(pending.len() as u64, Ordering::Relaxed);
        }
        // Closing: the syncer syncs and completes what is committed; what could not
        // be written (or synced) is reported, then the file is marked closed.
        self.shared.sync.close();
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
        if let Some((e, committed)) = self.shared.sync.take_failed() {
            self.settle_failed_sync(e, committed, &mut pending);
        }
        let _ = self.set_synchronous(true);
        if !pending.is_empty() {
            // One last try, with the syncer gone: the log repaired if a sync
            // failed, then what is left (the discard of refused tasks, settings
            // written again, state changes waiting) committed with FULL, synced
            // inside COMMIT, before anyone is told.
            let left: Vec<Request> = pending.drain(..).collect();
            let written = self
                .repaired()
                .map_err(Failed)
                .and_then(|()| self.attempt(&left));
            match written {
                Ok(results) => {
                    for (request, result) in left.into_iter().zip(results) {
                        complete(request, result);
                    }
                }
                Err(Failed(e)) => {
                    tracing::error!("store: closing: {e}; {} writes are not saved", left.len());
                    // The refused tasks' rows may still be in the log: recorded
                    // beside it, for the next open to delete, before their senders
                    // are told (done already if it was the repair that failed).
                    self.record_refused(&e);
                    if self.refused_waiting.iter().any(|w| !lock(w).is_empty()) {
                        tracing::error!(
                            "store: closing: refused tasks could not be recorded in \
                             {REFUSED_FILE}: they may come back at the next start"
                        );
                    }
                    for request in left {
                        complete(
                            request,
                            Err(StoreError::Storage {
                                kind: StorageKind::Io,
                                detail: "the store was closed before the write succeeded".into(),
                            }),
                        );
                    }
                }
            }
        }
        let _ = self
            .conn
            .execute("UPDATE meta SET value = 'closed' WHERE key = 'run'", []);
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    }

    /// Commits `batch` in one transaction. On disk trouble: new work fails, state
    /// changes get one more transaction of their own and, failing that, wait in
    /// `pending` (in order) for the next try.
    fn commit_batch(&mut self, batch: Vec<Request>, pending: &mut VecDeque<Request>) {
        let first = match self.repaired() {
            Ok(()) => {
                self.shared.sync.committing();
                timeline::mark(Stage::CommitStart, batch.len() as u32);
                let attempt = self.attempt(&batch);
                timeline::mark(Stage::CommitEnd, batch.len() as u32);
                attempt
            }
            Err(e) => Err(Failed(e)),
        };
        match first {
            Ok(results) => self.finish_ok(batch, results),
            Err(Failed(e)) => {
                self.shared.sync.committed_nothing();
                self.shared.failed_commits.fetch_add(1, Ordering::Relaxed);
                self.shared.healthy.store(false, Ordering::Relaxed);
                let mut retry = Vec::new();
                for request in batch {
                    if request.op.fail_fast() {
                        complete(request, Err(e.clone()));
                    } else {
                        retry.push(request);
                    }
                }
                if retry.is_empty() {
                    return;
                }
                let second = match &self.repair {
                    Some(e) => Err(Failed(e.clone())),
                    None => {
                        self.shared.sync.committing();
                        self.attempt(&retry)
                    }
                };
                match second {
                    Ok(results) => self.finish_ok(retry, results),
                    Err(Failed(e)) => {
                        self.shared.sync.committed_nothing();
                        self.shared.failed_commits.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("store: {e}; {} state changes will be retried", retry.len());
                        for request in &mut retry {
                            if request.early {
                                if let Some(done) = request.done.take() {
                                    done(Err(e.clone()));
                                }
                            }
                        }
                        pending.extend(retry);
                    }
                }
            }
        }
    }

    /// A committed batch goes to the syncer, which completes its ops (after a sync,
    /// if it holds an acknowledged op).
    fn finish_ok(&mut self, batch: Vec<Request>, results: Vec<Result<Outcome, StoreError>>) {
        let durable = batch.iter().any(|r| r.op.acknowledged());
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        if durable {
            self.shared.synced_commits.fetch_add(1, Ordering::Relaxed);
        }
        self.shared
            .ops
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.shared.healthy.store(true, Ordering::Relaxed);
        for result in &results {
            if let Ok(Outcome::Pruned(ids)) = result {
                self.remove_logs(ids);
            }
        }
        self.hand_over(Committed {
            requests: batch,
            results,
            durable,
        });
    }

    /// Hands completions to the syncer, or completes them here when nothing is
    /// ahead of them and they need no sync.
    fn hand_over(&self, committed: Committed) {
        if let Some(now) = self.shared.sync.push(committed) {
            for (request, result) in now.requests.into_iter().zip(now.results) {
                complete(request, result);
            }
        }
    }

    /// A sync failed: `committed` is every transaction not completed yet, in commit
    /// order (the sync covered the first ones; the rest were committed after it
    /// started, behind frames that may be lost). None of them is acknowledged:
    /// new work fails, and its rows are deleted again (`Op::Discard`, first of the
    /// next transaction), so the store holds what its senders were told; other
    /// acknowledged ops (settings, a flush) are written again, in order, before
    /// anything that waits; state changes keep what they did (they never needed a
    /// sync). Until the log is repaired nothing more is written.
    fn settle_failed_sync(
        &mut self,
        e: StoreError,
        committed: Vec<Committed>,
        pending: &mut VecDeque<Request>,
    ) {
        self.shared.failed_commits.fetch_add(1, Ordering::Relaxed);
        self.shared.healthy.store(false, Ordering::Relaxed);
        let mut discard = Vec::new();
        // The senders of tasks deleted again are told once the deletion is on disk
        // (the discard's completion), or once their ids are recorded for the next
        // open to delete ([`Writer::record_refused`]): until then the rows may come
        // back after a crash, so "not saved" would not be true yet.
        let mut refused: Vec<Request> = Vec::new();
        let mut told_with_discard: Vec<Completion> = Vec::new();
        let mut again = VecDeque::new();
        for c in committed {
            for (mut request, result) in c.requests.into_iter().zip(c.results) {
                match (&request.op, result) {
                    (_, Err(refused)) => complete(request, Err(refused)),
                    (Op::Insert { task, .. }, Ok(Outcome::Inserted)) => {
                        discard.push(task.id);
                        refused.push(request);
                    }
                    (Op::Insert { .. }, Ok(_)) => complete(request, Err(e.clone())),
                    (Op::Discard(ids), Ok(_)) => {
                        discard.extend(ids.iter().copied());
                        told_with_discard.extend(request.done.take());
                    }
                    (op, Ok(_)) if op.acknowledged() => {
                        if request.early {
                            if let Some(done) = request.done.take() {
                                done(Err(e.clone()));
                            }
                        }
                        again.push_back(request);
                    }
                    (_, Ok(outcome)) => complete(request, Ok(outcome)),
                }
            }
        }
        tracing::warn!(
            "store: {e}; {} new tasks refused, {} writes will be made again",
            discard.len(),
            again.len()
        );
        if !discard.is_empty() {
            let error = e.clone();
            let waiting: Waiting = Arc::new(Mutex::new(refused));
            // (Groups whose discard completed are dropped here and when recording.)
            self.refused_waiting.retain(|w| Arc::strong_count(w) > 1);
            self.refused_waiting.push(Arc::clone(&waiting));
            again.push_front(Request::new(
                Op::Discard(discard),
                move |_| {
                    for done in told_with_discard {
                        done(Ok(Outcome::Done));
                    }
                    let refused = std::mem::take(&mut *lock(&waiting));
                    for request in refused {
                        complete(request, Err(error.clone()));
                    }
                },
                false,
            ));
        }
        // Ahead of writes that failed since: those were submitted later.
        again.extend(pending.drain(..));
        *pending = again;
        self.repair = Some(e);
    }

    /// Repairs the write-ahead log after a failed sync, if it needs it: every byte
    /// written to it since the last good sync is written again from the writer's
    /// own copy and synced (`walbuf::rewrite_unsynced`), so the log on disk holds
    /// what SQLite counts as committed and later commits follow sound frames.
    /// Nothing is read back from the log: after a failed `fdatasync` the page cache
    /// may hold what the disk holds instead of what was written (a checkpoint
    /// reading those frames would copy stale pages into the store file).
    fn repaired(&mut self) -> Result<(), StoreError> {
        if self.repair.is_none() {
            return Ok(());
        }
        let repaired = self.repair_log();
        if let Err(e) = &repaired {
            self.record_refused(e);
        }
        repaired
    }

    /// The log cannot be repaired yet: rather than wait for that (as long as the
    /// disk fails), the senders of tasks deleted again are told once their ids are
    /// recorded in [`REFUSED_FILE`], which the next open deletes before recovery.
    /// If even that cannot be written, they wait for the repair.
    fn record_refused(&mut self, e: &StoreError) {
        self.refused_waiting.retain(|w| Arc::strong_count(w) > 1);
        for waiting in &self.refused_waiting {
            let mut refused = lock(waiting);
            if refused.is_empty() {
                continue;
            }
            let ids: Vec<Uuid> = refused
                .iter()
                .filter_map(|r| match &r.op {
                    Op::Insert { task, .. } => Some(task.id),
                    _ => None,
                })
                .collect();
            match write_refused(&self.state_dir, &ids) {
                Ok(()) => {
                    for request in refused.drain(..) {
                        complete(request, Err(e.clone()));
                    }
                }
                Err(err) => {
                    tracing::warn!(
                        "store: cannot record {} refused tasks in {REFUSED_FILE} ({err}); \
                         their senders wait for the log to be repaired",
                        ids.len()
                    );
                    return;
                }
            }
        }
    }

    /// [`Writer::repaired`]'s work.
    fn repair_log(&mut self) -> Result<(), StoreError> {
        let Some(_failed) = &self.repair else {
            return Ok(());
        };
        #[cfg(test)]
        if self.shared.sync.repair_fails() {
            return Err(_failed.clone());
        }
        // The sync goes through SQLite's own descriptor, which reports the error
        // the syncer saw once more (Linux reports a write-back error once to every
        // open file): then it is tried once again at once, writing everything
        // again first, so that what a sync that succeeds covers is what was
        // written after the error.
        let done =
            walbuf::rewrite_unsynced(&self.conn).or_else(|_| walbuf::rewrite_unsynced(&self.conn));
        match done {
            Ok(()) => {
                tracing::info!("store: the write-ahead log is written again; writing on");
                self.repair = None;
                Ok(())
            }
            Err(rc) => Err(StoreError::Storage {
                kind: if rc & 0xff == rusqlite::ffi::SQLITE_FULL {
                    StorageKind::Full
                } else {
                    StorageKind::Io
                },
                detail: format!(
                    "cannot write the write-ahead log again after a failed sync (SQLite error {rc})"
                ),
            }),
        }
    }

    fn remove_logs(&self, ids: &[Uuid]) {
        for id in ids {
            if let Err(e) = output::remove_log(&self.state_dir, *id) {
                tracing::warn!(%id, "cannot remove the log of a pruned task: {e}");
            }
        }
    }

    /// One transaction over `batch`. A write the store refuses fails alone; disk
    /// trouble anywhere rolls the whole transaction back.
    fn attempt(&mut self, batch: &[Request]) -> Result<Vec<Result<Outcome, StoreError>>, Failed> {
        let fail = |e: &rusqlite::Error| match classify(e) {
            Some(kind) => Failed(storage(kind, e)),
            None => Failed(StoreError::Storage {
                kind: StorageKind::Io,
                detail: e.to_string(),
            }),
        };
        let seq_before = self.next_seq;
        // Prepared once (execute_batch would parse it for every transaction).
        self.conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut begin| begin.execute([]))
            .map_err(|e| fail(&e))?;
        let mut results = Vec::with_capacity(batch.len());
        let mut stmts = Statements::new(&self.conn);
        for request in batch {
            match self.apply(&mut stmts, self.next_seq, &request.op) {
                Ok(outcome) => {
                    if outcome == Outcome::Inserted {
                        self.next_seq += 1;
                    }
                    results.push(Ok(outcome))
                }
                Err(e) => {
                    // Disk trouble, or any error after which SQLite rolled the
                    // transaction back itself, fails the whole batch.
                    if classify(&e).is_some() || self.conn.is_autocommit() {
                        drop(stmts);
                        self.rollback();
                        self.next_seq = seq_before;
                        return Err(fail(&e));
                    }
                    results.push(Err(StoreError::Rejected(e.to_string())));
                }
            }
        }
        drop(stmts);
        let commit = self
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut commit| commit.execute([]));
        if let Err(e) = commit {
            self.rollback();
            self.next_seq = seq_before;
            return Err(fail(&e));
        }
        // The log's frames are in the file by now (walbuf.rs writes a run out with
        // its commit frame); this checks it, and writes out anything still held.
        match walbuf::flush_after_commit(&self.conn) {
            Ok(false) => {}
            Ok(true) => tracing::error!("store: log frames were still held after a commit"),
            Err(rc) => {
                // Committed as far as SQLite knows, but not in the file: as a failed
                // sync (nothing it or a later commit holds is acknowledged).
                let e = std::io::Error::other(format!(
                    "cannot write the write-ahead log (SQLite error {rc})"
                ));
                tracing::warn!("store: {e}");
                self.shared.sync.fail_next(e);
            }
        }
        Ok(results)
    }

    /// `PRAGMA synchronous` FULL or NORMAL, when it is not that already.
    fn set_synchronous(&mut self, full: bool) -> rusqlite::Result<()> {
        if self.synchronous_full != full {
            self.conn.execute_batch(if full {
                "PRAGMA synchronous=FULL"
            } else {
                "PRAGMA synchronous=NORMAL"
            })?;
            self.synchronous_full = full;
        }
        Ok(())
    }

    fn rollback(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// Applies one op in the open transaction; `seq` is the next task's. Statements
    /// come from `stmts`, which keeps them prepared for the rest of the batch.
    fn apply(&self, stmts: &mut Statements<'_>, seq: i64, op: &Op) -> rusqlite::Result<Outcome> {
        match op {
            Op::Insert { task, front } => {
                let order = if *front { -seq } else { seq };
                let mut id_buf = Uuid::encode_buffer();
                let id = &*task.id.hyphenated().encode_lower(&mut id_buf);
                let attempt_of = task.attempt_of.map(|id| id.to_string());
                let timeout_ms = task.timeout_ms.map(|ms| ms.min(i64::MAX as u64) as i64);
                // What every insert binds, in the statements' column order.
                let new_work: [&dyn rusqlite::ToSql; 14] = [
                    &seq,
                    &id,
                    &task.session,
                    &task.text,
                    &task.state.as_str(),
                    &order,
                    &task.mode,
                    &task.priority,
                    &task.options,
                    &task.message_id,
                    &task.created_at,
                    &attempt_of,
                    &task.checkpoint,
                    &timeout_ms,
                ];
                let inserted = if task.is_new() {
                    // New work (nearly every insert): what the record can hold only
                    // once it ran is NULL, unbound.
                    stmts.get(INSERT_NEW)?.execute(&new_work[..])?
                } else {
                    let process = task.process.as_ref();
                    let (code, signal) = (
                        task.exit.and_then(|e| e.code),
                        task.exit.and_then(|e| e.signal),
                    );
                    let (pid, pid_start, boot_id) = (
                        process.map(|p| p.pid),
                        process.map(|p| p.start_time as i64),
                        process.map(|p| p.boot_id.as_str()),
                    );
                    let ran: [&dyn rusqlite::ToSql; 11] = [
                        &task.started_at,
                        &task.finished_at,
                        &task.progress,
                        &task.result,
                        &task.ending,
                        &task.reason,
                        &code,
                        &signal,
                        &pid,
                        &pid_start,
                        &boot_id,
                    ];
                    let all: Vec<&dyn rusqlite::ToSql> =
                        new_work.iter().chain(ran.iter()).copied().collect();
                    stmts.get(INSERT_ANY)?.execute(&all[..])?
                };
                if inserted == 0 {
                    // Only the (session, message_id) index's conflict does nothing
                    // (any other refuses the insert): the message is stored.
                    let existing: String = stmts
                        .get("SELECT id FROM tasks WHERE session = ?1 AND message_id = ?2")?
                        .query_row(params![task.session, task.message_id], |r| r.get(0))?;
                    let id = Uuid::parse_str(&existing).unwrap_or_default();
                    return Ok(Outcome::Duplicate(id));
                }
                Ok(Outcome::Inserted)
            }
            Op::Start {
                id,
                at,
                process,
                text,
            } => {
                let n = stmts
                    .get(
                        "UPDATE tasks SET state = 'starting', started_at = ?2, pid = ?3, \
                         pid_start = ?4, boot_id = ?5, text = coalesce(?6, text) WHERE id = ?1",
                    )?
                    .execute(params![
                        id.to_string(),
                        at,
                        process.as_ref().map(|p| p.pid),
                        process.as_ref().map(|p| p.start_time as i64),
                        process.as_ref().map(|p| p.boot_id.clone()),
                        text,
                    ])?;
                Ok(Outcome::Updated(n))
            }
            Op::SetProcess { id, process } => {
                let n = stmts
                    .get("UPDATE tasks SET pid = ?2, pid_start = ?3, boot_id = ?4 WHERE id = ?1")?
                    .execute(params![
                        id.to_string(),
                        process.pid,
                        process.start_time as i64,
                        process.boot_id,
                    ])?;
                Ok(Outcome::Updated(n))
            }
            Op::SetState { id, state } => {
                let n = stmts
                    .get("UPDATE tasks SET state = ?2 WHERE id = ?1")?
                    .execute(params![id.to_string(), state.as_str()])?;
                Ok(Outcome::Updated(n))
            }
            Op::Progress { id, text } => {
                let n = stmts
                    .get("UPDATE tasks SET progress = ?2 WHERE id = ?1")?
                    .execute(params![id.to_string(), text])?;
                Ok(Outcome::Updated(n))
            }
            Op::Finish {
                id,
                state,
                at,
                progress,
                result,
                ending,
                reason,
                exit,
            } => {
                let n = stmts
                    .get(
                        "UPDATE tasks SET state = ?2, finished_at = ?3, \
                         progress = coalesce(?4, progress), result = ?5, ending = ?6, \
                         reason = ?7, exit_code = ?8, exit_signal = ?9 WHERE id = ?1",
                    )?
                    .execute(params![
                        id.to_string(),
                        state.as_str(),
                        at,
                        progress,
                        result,
                        ending,
                        reason,
                        exit.and_then(|e| e.code),
                        exit.and_then(|e| e.signal),
                    ])?;
                Ok(Outcome::Updated(n))
            }
            Op::Checkpoint { id, data } => {
                let n = stmts
                    .get("UPDATE tasks SET checkpoint = ?2 WHERE id = ?1")?
                    .execute(params![id.to_string(), data])?;
                Ok(Outcome::Updated(n))
            }
            Op::Settings(s) => {
                let n = stmts
                    .get(
                        "INSERT INTO session_settings (session, mode, debounce_ms, cap, \
                         drop_policy) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(session) DO \
                         UPDATE SET mode = excluded.mode, debounce_ms = excluded.debounce_ms, \
                         cap = excluded.cap, drop_policy = excluded.drop_policy",
                    )?
                    .execute(params![
                        s.session,
                        s.mode,
                        s.debounce_ms as i64,
                        s.cap,
                        s.drop_policy
                    ])?;
                Ok(Outcome::Updated(n))
            }
            Op::ResetSettings { session } => {
                let n = stmts
                    .get("DELETE FROM session_settings WHERE session = ?1")?
                    .execute([session])?;
                Ok(Outcome::Updated(n))
            }
            Op::Prune => Ok(Outcome::Pruned(self.prune_in_tx()?)),
            Op::Flush => Ok(Outcome::Done),
            Op::Discard(ids) => {
                let mut n = 0;
                let delete = stmts.get("DELETE FROM tasks WHERE id = ?1")?;
                for id in ids {
                    n += delete.execute([id.to_string()])?;
                }
                Ok(Outcome::Updated(n))
            }
            Op::LimitPages(pages) => {
                // Normally applied before the batch (see `run`).
                set_max_pages(&self.conn, *pages)?;
                Ok(Outcome::Done)
            }
        }
    }

    /// Deletes finished tasks past the retention; returns their ids.
    fn prune_in_tx(&self) -> rusqlite::Result<Vec<Uuid>> {
        let mut ids = Vec::new();
        let collect = |ids: &mut Vec<Uuid>, stmt: &mut rusqlite::CachedStatement, p: i64| {
            let rows = stmt.query_map([p], |r| uuid_col(r, 0))?;
            for id in rows {
                ids.push(id?);
            }
            Ok::<_, rusqlite::Error>(())
        };
        if let Some(age) = self.options.retention.max_age {
            let cutoff = now_ms().saturating_sub(age.as_millis().min(i64::MAX as u128) as i64);
            let mut stmt = self.conn.prepare_cached(
                "DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?1 \
                 RETURNING id",
            )?;
            collect(&mut ids, &mut stmt, cutoff)?;
        }
        if let Some(keep) = self.options.retention.max_finished {
            let mut stmt = self.conn.prepare_cached(
                "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks \
                 WHERE finished_at IS NOT NULL ORDER BY finished_at DESC, seq DESC \
                 LIMIT -1 OFFSET ?1) RETURNING id",
            )?;
            collect(&mut ids, &mut stmt, keep.min(i64::MAX as u64) as i64)?;
        }
        Ok(ids)
    }

    /// Prunes in a transaction of its own (at open).
    fn prune_now(&mut self) -> rusqlite::Result<Vec<Uuid>> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match self.prune_in_tx() {
            Ok(ids) => {
                if let Err(e) = self.conn.execute_batch("COMMIT") {
                    self.rollback();
                    return Err(e);
                }
                Ok(ids)
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }
}

/// The oldest (finished_at, seq) that `retention` keeps: finished tasks before it
/// are due to be pruned. One walk of the newest `max_finished` index entries.
fn kept_from(conn: &Connection, retention: &Retention) -> rusqlite::Result<(i64, i64)> {
    let mut from = (i64::MIN, i64::MIN);
    if let Some(age) = retention.max_age {
        from.0 = now_ms().saturating_sub(age.as_millis().min(i64::MAX as u128) as i64);
    }
    if let Some(keep) = retention.max_finished {
        if keep == 0 {
            return Ok((i64::MAX, i64::MAX));
        }
        let oldest_kept: Option<(i64, i64)> = conn
            .prepare_cached(
                "SELECT finished_at, seq FROM tasks WHERE finished_at IS NOT NULL \
                 ORDER BY finished_at DESC, seq DESC LIMIT 1 OFFSET ?1",
            )?
            .query_row([keep.min(i64::MAX as u64) as i64 - 1], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some(kept) = oldest_kept {
            from = from.max(kept);
        }
    }
    Ok(from)
}

pub(crate) fn complete(request: Request, result: Result<Outcome, StoreError>) {
    match request.done {
        Some(done) => done(result),
        None => {
            if let Err(e) = result {
                tracing::warn!("store: a write failed: {e}");
            }
        }
    }
}

/// A read-only connection for history queries (`status ID`, `tasks --all`, `log`).
/// It reads committed data only and never blocks the writer (WAL).
pub struct Reader {
    conn: Mutex<Connection>,
}

impl Reader {
    fn open(path: &Path) -> Result<Reader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| corrupt_or_open(path, e))?;
        Ok(Reader {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|e| StoreError::Storage {
            kind: classify(&e).unwrap_or(StorageKind::Io),
            detail: e.to_string(),
        })
    }

    /// One task by id.
    pub fn task(&self, id: Uuid) -> Result<Option<TaskRecord>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"))?
                .query_row([id.to_string()], record)
                .optional()
        })
    }

    /// The task stored for a bridge's message id in `session`.
    pub fn find_message(
        &self,
        session: &str,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT id FROM tasks WHERE session = ?1 AND message_id = ?2")?
                .query_row([session, message_id], |r| uuid_col(r, 0))
                .optional()
        })
    }

    /// Ids of finished tasks whose hyphenated lowercase form starts with `prefix`
    /// (at most `limit`; an index range scan).
    pub fn ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Uuid>, StoreError> {
        let prefix = prefix.to_ascii_lowercase();
        // Every id character sorts below '~', so [prefix, prefix~) is the prefix range.
        let end = format!("{prefix}~");
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT id FROM tasks WHERE id >= ?1 AND id < ?2 AND finished_at IS NOT NULL \
                 LIMIT ?3",
            )?
            .query_map(params![prefix, end, limit as i64], |r| uuid_col(r, 0))?
            .collect()
        })
    }

    /// Finished tasks, newest first, optionally of one session; at most `limit`.
    pub fn finished(
        &self,
        session: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        self.with(|conn| {
            let sql = format!(
                "SELECT {COLUMNS} FROM tasks WHERE finished_at IS NOT NULL \
                 AND (?1 IS NULL OR session = ?1) ORDER BY finished_at DESC, seq DESC LIMIT ?2"
            );
            let rows = conn
                .prepare_cached(&sql)?
                .query_map(params![session, limit as i64], record)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    /// A page of finished tasks in task id order, after `after`, at most `limit`;
    /// only `session`'s if given, and only what `retention` keeps (between two
    /// prunes the file may hold more). An index range scan.
    pub fn finished_by_id(
        &self,
        session: Option<&str>,
        after: Option<Uuid>,
        limit: usize,
        retention: &Retention,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let after = after.map(|id| id.to_string()).unwrap_or_default();
        self.with(|conn| {
            let (from_at, from_seq) = kept_from(conn, retention)?;
            let sql = format!(
                "SELECT {COLUMNS} FROM tasks WHERE finished_at IS NOT NULL AND id > ?1 \
                 AND (?2 IS NULL OR session = ?2) AND (finished_at, seq) >= (?3, ?4) \
                 ORDER BY id LIMIT ?5"
            );
            conn.prepare_cached(&sql)?
                .query_map(
                    params![after, session, from_at, from_seq, limit as i64],
                    record,
                )?
                .collect()
        })
    }

    /// Finished tasks, oldest first (by when they finished), at most `limit`; only
    /// `session`'s if given, and only what `retention` keeps.
    pub fn finished_oldest_first(
        &self,
        session: Option<&str>,
        limit: usize,
        retention: &Retention,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        self.with(|conn| {
            let (from_at, from_seq) = kept_from(conn, retention)?;
            let sql = format!(
                "SELECT {COLUMNS} FROM tasks WHERE finished_at IS NOT NULL \
                 AND (?1 IS NULL OR session = ?1) AND (finished_at, seq) >= (?2, ?3) \
                 ORDER BY finished_at, seq LIMIT ?4"
            );
            conn.prepare_cached(&sql)?
                .query_map(params![session, from_at, from_seq, limit as i64], record)?
                .collect()
        })
    }

    /// A page of queued tasks: at most `limit` after the place `after` (None: from
    /// the first), in queue order (as [`Recovery::queued`]), and the place to ask
    /// for the next page from (None when there are no more). Recovery reads the
    /// queue this way when [`StoreOptions::read_queued`] is off.
    pub fn queued_page(
        &self,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<TaskRecord>, Option<i64>), StoreError> {
        self.with(|conn| queued_page(conn, after, limit))
    }

    /// How many tasks are stored in each state.
    pub fn counts(&self) -> Result<Vec<(State, u64)>, StoreError> {
        self.with(|conn| {
            let mut out = Vec::new();
            let mut stmt =
                conn.prepare_cached("SELECT state, count(*) FROM tasks GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                if let Some(state) = State::parse(&state) {
                    out.push((state, n as u64));
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod ticket_tests {
    use super::*;

    /// An op dropped unwritten (the writer gone with it still queued) answers its
    /// ticket `Closed`, waking the thread waiting on it.
    #[test]
    fn a_ticket_whose_op_is_dropped_unanswered_gets_closed() {
        let shared = Arc::new(Shared::default());
        let slot = Arc::new(OnceLock::new());
        let answer = Answer {
            slot: Arc::clone(&slot),
            shared: Arc::clone(&shared),
        };
        let ticket = Ticket { slot, shared };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(ticket.wait()).unwrap());
        // Whether the thread sleeps already or not, dropping the answer wakes it.
        drop(answer);
        let result = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the waiting thread was not woken");
        assert!(matches!(result, Err(StoreError::Closed)));
    }
}
