//! A thin SQLite VFS over the default one ("unix") that writes a transaction's
//! write-ahead-log frames with one `pwrite` instead of two per frame.
//!
//! SQLite writes each WAL frame with two `xWrite` calls, its 24-byte header and then
//! its page, so a group commit of 50 messages (about 60 frames: the
//! (session, message_id) index touches a leaf per session) costs some 120 `pwrite`s,
//! each paying the kernel's per-call work (the call, ext4's write checks, the
//! file's time, the page cache folios of a misaligned 4,120-byte frame twice).
//! Measured on this machine's disk: about 4 µs per frame written that way against
//! 1 µs as one write.
//!
//! Only the writer's connection opens the store through this VFS, and only its
//! `-wal` file is wrapped; every other file (the store file, its shared memory,
//! temp files) is the default VFS's own, untouched. The wrapped log holds a run of
//! frames appended in order in memory and writes them in one call when:
//! - the page of a commit frame (a frame header whose "database size" field is not
//!   zero) has been appended: so every frame of a transaction is in the file before
//!   `sqlite3WalFrames` goes on to publish the new log end in the wal-index (which
//!   is when other connections may read them) and before `COMMIT` returns (after
//!   which the syncer's `fdatasync` must cover them);
//! - any other call reaches the file: a read (SQLite reads back its own frames,
//!   e.g. to recompute checksums after a spill), a sync, a truncation, its size,
//!   a file control, closing it;
//! - a write does not continue the run (overwriting a frame of the transaction,
//!   the log's header at a reset);
//! - a write would make the run longer than [`MAX_RUN`] (then that write starts
//!   the next run).
//!
//! Only a frame header that is not a commit starts a run, so a write that is not
//! part of an appended frame sequence is never held. A failed write of a run fails
//! the `xWrite` (or other call) that wrote it, with the default VFS's error code
//! (`SQLITE_FULL` on a full disk), and the run is dropped: SQLite then rolls the
//! transaction back as for any failed frame write, and writes its frames again
//! later. Killed with a run in memory, the process loses only frames of a
//! transaction whose commit frame was not written yet: not committed, as without
//! the buffer.
//!
//! [`flush_after_commit`] checks, after every `COMMIT` of the writer, that nothing
//! is held (a test asserts it never is); if something were, it writes it out and
//! says so, and the store treats the transaction as not synced.
//!
//! The wrapped log also keeps a copy of every byte written since the last good sync
//! ([`Unsynced`]: a written run is moved there, not copied), for the store's repair
//! after a failed sync ([`rewrite_unsynced`]), which writes it all again instead of
//! trusting what the page cache holds; while a sync has failed and the log was not
//! written again, SQLite's own syncs of it fail at once, so no checkpoint reads it.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rusqlite::ffi;
use rusqlite::Connection;

/// The VFS's name (`Connection::open_with_flags_and_vfs`).
pub(crate) const VFS_NAME: &CStr = c"agentd-walbuf";

/// Most bytes held in one run before it is written: the default VFS writes at most
/// 128 KiB - 1 in one call (it masks the length), so 31 frames of 4 KiB pages.
const MAX_RUN: usize = 0x1ffff;

/// A WAL frame header's size.
const FRAME_HEADER: usize = 24;

/// Runs found still held after a commit, by [`flush_after_commit`] (never: a test
/// asserts it).
pub(crate) static LEFT_AFTER_COMMIT: AtomicU64 = AtomicU64::new(0);

/// The log's bytes written since the last sync known to have succeeded: the copy
/// the store writes the log again from after a failed sync, instead of trusting
/// what the page cache still holds (after a failed `fdatasync` Linux may have
/// dropped the pages it could not write, or kept them clean but not on disk).
///
/// Every write that reached the file is kept here, in order, until a sync that
/// started after it succeeded: the syncer's ([`Unsynced::mark`] before its
/// `fdatasync`, [`Unsynced::synced`] after), or SQLite's own (a checkpoint, a FULL
/// commit). A failed sync (the syncer's: [`Unsynced::failed`]; SQLite's: seen
/// here) poisons the log: nothing is dropped any more and SQLite's own syncs fail
/// at once (so no checkpoint reads the log's frames back into the store file)
/// until [`rewrite_unsynced`] has written every kept byte again and synced it.
/// Normally this holds what one sync covers; between syncs at most what a
/// transaction of state changes wrote, or an automatic checkpoint's worth (about
/// 4 MiB: NORMAL syncs the log before each checkpoint).
#[derive(Default)]
pub(crate) struct Unsynced {
    state: Mutex<UnsyncedState>,
}

#[derive(Default)]
struct UnsyncedState {
    /// (sequence number, offset, bytes), in the order they were written.
    writes: VecDeque<(u64, i64, Vec<u8>)>,
    next: u64,
    poisoned: bool,
    /// Buffers of synced runs, for the next runs.
    spare: Vec<Vec<u8>>,
}

/// Most buffers kept for reuse.
const SPARE_BUFFERS: usize = 8;

impl Unsynced {
    fn lock(&self) -> MutexGuard<'_, UnsyncedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before a sync: what it will cover (every write recorded so far; a write is
    /// recorded after it reached the file).
    pub(crate) fn mark(&self) -> u64 {
        self.lock().next
    }

    /// A sync that started after [`Unsynced::mark`] returned `mark` succeeded:
    /// the writes before it are on disk (unless the log is poisoned).
    pub(crate) fn synced(&self, mark: u64) {
        let mut state = self.lock();
        if state.poisoned {
            return;
        }
        while state.writes.front().is_some_and(|(seq, _, _)| *seq < mark) {
            let (_, _, mut buf) = state.writes.pop_front().expect("a write");
            if state.spare.len() < SPARE_BUFFERS && buf.capacity() <= MAX_RUN + FRAME_HEADER {
                buf.clear();
                state.spare.push(buf);
            }
        }
    }

    /// A sync of the log failed: what it covered may be lost.
    pub(crate) fn failed(&self) {
        self.lock().poisoned = true;
    }

    /// Whether a sync failed and the log was not written again since.
    pub(crate) fn poisoned(&self) -> bool {
        self.lock().poisoned
    }

    /// Records a write that reached the file.
    fn record(&self, offset: i64, bytes: Vec<u8>) -> MutexGuard<'_, UnsyncedState> {
        let mut state = self.lock();
        let seq = state.next;
        state.next += 1;
        state.writes.push_back((seq, offset, bytes));
        state
    }

    /// Records a run that reached the file; returns an empty buffer for the next.
    fn record_run(&self, offset: i64, run: Vec<u8>) -> Vec<u8> {
        self.record(offset, run).spare.pop().unwrap_or_default()
    }

    /// The file was truncated to `size`: bytes past it are not to be written again.
    fn truncated(&self, size: i64) {
        let mut state = self.lock();
        state.writes.retain_mut(|(_, offset, bytes)| {
            if *offset >= size {
                return false;
            }
            bytes.truncate((size - *offset) as usize);
            true
        });
    }
}

/// The wrapped `-wal` file. SQLite allocates `szOsFile` bytes for it: this struct,
/// then the default VFS's own file object at `REAL_OFFSET`.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// The run held: bytes for the file range `start..start + run.len()`.
    run: Vec<u8>,
    start: i64,
    /// The run ends with a commit frame's header: its page completes the run.
    commit_next: bool,
    /// Writes taken into runs, and runs written (tests).
    held: u64,
    runs: u64,
    /// What was written since the last good sync.
    unsynced: Arc<Unsynced>,
    /// Test hook: the next run fails with this code instead of being written, as
    /// the default VFS reports a full disk or an I/O error.
    #[cfg(test)]
    fail_next: Option<c_int>,
    /// Test hook: the next sync of SQLite's own fails with this code.
    #[cfg(test)]
    fail_next_sync: Option<c_int>,
    /// The file's name (tests: [`fail_next_sync_under`]).
    #[cfg(test)]
    name: String,
}

const REAL_OFFSET: usize = std::mem::size_of::<WalFile>().next_multiple_of(16);

struct Vfs {
    vfs: ffi::sqlite3_vfs,
    real: *mut ffi::sqlite3_vfs,
}

// The VFS structs are written once before registration and only read after.
unsafe impl Send for Vfs {}
unsafe impl Sync for Vfs {}

static VFS: OnceLock<Result<Box<Vfs>, String>> = OnceLock::new();

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(wal_close),
    xRead: Some(wal_read),
    xWrite: Some(wal_write),
    xTruncate: Some(wal_truncate),
    xSync: Some(wal_sync),
    xFileSize: Some(wal_file_size),
    xLock: Some(wal_lock),
    xUnlock: Some(wal_unlock),
    xCheckReservedLock: Some(wal_check_reserved_lock),
    xFileControl: Some(wal_file_control),
    xSectorSize: Some(wal_sector_size),
    xDeviceCharacteristics: Some(wal_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// Registers the VFS (once; not as the default). Returns its name.
pub(crate) fn register() -> Result<&'static CStr, String> {
    let registered = VFS.get_or_init(|| unsafe {
        let real = ffi::sqlite3_vfs_find(c"unix".as_ptr());
        if real.is_null() {
            return Err("SQLite has no \"unix\" VFS".into());
        }
        // Everything but opening a file is the default VFS's own (its functions do
        // not depend on which VFS struct they are called with).
        let mut vfs = std::ptr::read(real);
        vfs.pNext = std::ptr::null_mut();
        vfs.zName = VFS_NAME.as_ptr();
        vfs.szOsFile = (REAL_OFFSET + (*real).szOsFile as usize) as c_int;
        vfs.xOpen = Some(vfs_open);
        let mut boxed = Box::new(Vfs { vfs, real });
        let rc = ffi::sqlite3_vfs_register(&mut boxed.vfs, 0);
        if rc != ffi::SQLITE_OK {
            return Err(format!("cannot register a VFS (SQLite error {rc})"));
        }
        Ok(boxed)
    });
    registered.as_ref().map(|_| VFS_NAME).map_err(Clone::clone)
}

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    match VFS.get() {
        Some(Ok(v)) => v.real,
        _ => unreachable!("opened through the VFS, so it is registered"),
    }
}

unsafe extern "C" fn vfs_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let real_vfs = real_vfs();
        let open = (*real_vfs).xOpen.expect("the unix VFS opens files");
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            // Not the log: the default VFS's file, in place.
            return open(real_vfs, name, file, flags, out_flags);
        }
        let real = (file as *mut u8).add(REAL_OFFSET) as *mut ffi::sqlite3_file;
        (*real).pMethods = std::ptr::null();
        let rc = open(real_vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if !(*real).pMethods.is_null() {
                if let Some(close) = (*(*real).pMethods).xClose {
                    close(real);
                }
            }
            (*file).pMethods = std::ptr::null();
            return rc;
        }
        std::ptr::write(
            file as *mut WalFile,
            WalFile {
                base: ffi::sqlite3_file {
                    pMethods: &WAL_METHODS,
                },
                real,
                run: Vec::new(),
                start: 0,
                commit_next: false,
                held: 0,
                runs: 0,
                unsynced: Arc::default(),
                #[cfg(test)]
                fail_next: None,
                #[cfg(test)]
                fail_next_sync: None,
                #[cfg(test)]
                name: if name.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(name).to_string_lossy().into_owned()
                },
            },
        );
        ffi::SQLITE_OK
    }
}

unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    unsafe { &mut *(file as *mut WalFile) }
}

unsafe fn methods(real: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    unsafe { &*(*real).pMethods }
}

impl WalFile {
    /// Writes the run held, if any (dropped either way).
    unsafe fn flush(&mut self) -> c_int {
        unsafe {
            self.commit_next = false;
            if self.run.is_empty() {
                return ffi::SQLITE_OK;
            }
            #[cfg(test)]
            if let Some(rc) = self.fail_next.take() {
                self.run.clear();
                return rc;
            }
            let write = methods(self.real).xWrite.expect("files write");
            let rc = write(
                self.real,
                self.run.as_ptr() as *const c_void,
                self.run.len() as c_int,
                self.start,
            );
            self.runs += 1;
            if rc == ffi::SQLITE_OK {
                let run = std::mem::take(&mut self.run);
                self.run = self.unsynced.record_run(self.start, run);
            } else {
                self.run.clear();
            }
            rc
        }
    }
}

unsafe extern "C" fn wal_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        let f = wal(file);
        let bytes = std::slice::from_raw_parts(data as *const u8, amount.max(0) as usize);
        let header = bytes.len() == FRAME_HEADER;
        // A frame header's bytes 4..8: the database size after a commit, else zero.
        let commit = header && bytes[4..8] != [0; 4];
        if !f.run.is_empty() && offset == f.start + f.run.len() as i64 {
            if f.run.len() + bytes.len() > MAX_RUN {
                // Full: written, and this write starts the next run.
                let commit_next = f.commit_next;
                let rc = f.flush();
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                f.start = offset;
                f.commit_next = commit_next;
            }
            f.run.extend_from_slice(bytes);
            f.held += 1;
            if f.commit_next {
                return f.flush();
            }
            f.commit_next = commit;
            return ffi::SQLITE_OK;
        }
        let rc = f.flush();
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if header && !commit {
            f.start = offset;
            f.run.extend_from_slice(bytes);
            f.held += 1;
            return ffi::SQLITE_OK;
        }
        let write = methods(f.real).xWrite.expect("files write");
        let rc = write(f.real, data, amount, offset);
        if rc == ffi::SQLITE_OK {
            drop(f.unsynced.record(offset, bytes.to_vec()));
        }
        rc
    }
}

unsafe extern "C" fn wal_close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let f = wal(file);
        let flushed = f.flush();
        let close = methods(f.real).xClose.expect("files close");
        let closed = close(f.real);
        std::ptr::drop_in_place(&mut f.run);
        std::ptr::drop_in_place(&mut f.unsynced);
        (*file).pMethods = std::ptr::null();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

/// Writes the run held, then passes the call on to the default VFS's file.
macro_rules! flushed_then {
    ($file:expr, $method:ident ( $($arg:expr),* )) => {{
        let f = wal($file);
        let rc = f.flush();
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        methods(f.real).$method.expect("the unix VFS's file method")(f.real $(, $arg)*)
    }};
}

unsafe extern "C" fn wal_read(
    file: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    unsafe { flushed_then!(file, xRead(data, amount, offset)) }
}

unsafe extern "C" fn wal_truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    unsafe {
        let rc = flushed_then!(file, xTruncate(size));
        if rc == ffi::SQLITE_OK {
            wal(file).unsynced.truncated(size);
        }
        rc
    }
}

/// SQLite's own sync of the log (before a checkpoint, at a reset, in a FULL
/// commit). Fails at once while the log is poisoned: a checkpoint would read back
/// frames that may be lost.
unsafe extern "C" fn wal_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        let f = wal(file);
        if f.unsynced.poisoned() {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        let mark = f.unsynced.mark();
        #[cfg(test)]
        if let Some(rc) = f.fail_next_sync.take().or_else(|| failing_under(&f.name)) {
            f.unsynced.failed();
            return rc;
        }
        let rc = flushed_then!(file, xSync(flags));
        let f = wal(file);
        if rc == ffi::SQLITE_OK {
            f.unsynced.synced(mark);
        } else {
            f.unsynced.failed();
        }
        rc
    }
}

unsafe extern "C" fn wal_file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    unsafe { flushed_then!(file, xFileSize(size)) }
}

unsafe extern "C" fn wal_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    unsafe { flushed_then!(file, xFileControl(op, arg)) }
}

unsafe extern "C" fn wal_lock(file: *mut ffi::sqlite3_file, lock: c_int) -> c_int {
    unsafe {
        let f = wal(file);
        methods(f.real).xLock.expect("files lock")(f.real, lock)
    }
}

unsafe extern "C" fn wal_unlock(file: *mut ffi::sqlite3_file, lock: c_int) -> c_int {
    unsafe {
        let f = wal(file);
        methods(f.real).xUnlock.expect("files unlock")(f.real, lock)
    }
}

unsafe extern "C" fn wal_check_reserved_lock(
    file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    unsafe {
        let f = wal(file);
        methods(f.real).xCheckReservedLock.expect("files lock")(f.real, out)
    }
}

unsafe extern "C" fn wal_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let f = wal(file);
        methods(f.real).xSectorSize.expect("files have sectors")(f.real)
    }
}

unsafe extern "C" fn wal_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let f = wal(file);
        methods(f.real)
            .xDeviceCharacteristics
            .expect("files have a device")(f.real)
    }
}

/// The log file of `conn` if it is this VFS's: valid while the connection is open,
/// to be used on the connection's own thread, between its statements.
fn log_of(conn: &Connection) -> Option<*mut WalFile> {
    let mut log: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: the handle is the open connection's; the journal pointer is its log's
    // file object (null before the log is opened).
    unsafe {
        let rc = ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            &mut log as *mut *mut ffi::sqlite3_file as *mut c_void,
        );
        if rc != ffi::SQLITE_OK || log.is_null() || !std::ptr::eq((*log).pMethods, &WAL_METHODS) {
            return None;
        }
        Some(log as *mut WalFile)
    }
}

/// After a `COMMIT` on a connection opened through this VFS: writes out anything
/// its log still holds (nothing, by the rules above) and returns whether there was
/// anything (`Err` with SQLite's code if writing it failed). `Ok(false)` for other
/// connections.
pub(crate) fn flush_after_commit(conn: &Connection) -> Result<bool, c_int> {
    let Some(f) = log_of(conn) else {
        return Ok(false);
    };
    // SAFETY: called by the connection's owner between statements.
    let f = unsafe { &mut *f };
    if f.run.is_empty() {
        return Ok(false);
    }
    LEFT_AFTER_COMMIT.fetch_add(1, Ordering::Relaxed);
    let (start, run) = (f.start, f.run.clone());
    // SAFETY: as above.
    match unsafe { f.flush() } {
        ffi::SQLITE_OK => Ok(true),
        rc => {
            // Committed as far as SQLite knows: the repair after the failed sync
            // this leads to writes it (a failed run is otherwise not kept, since
            // SQLite rolls its transaction back).
            drop(f.unsynced.record(start, run));
            Err(rc)
        }
    }
}

/// What `conn`'s log wrote since its last good sync (the syncer shares it), if the
/// log is this VFS's and open.
pub(crate) fn unsynced_of(conn: &Connection) -> Option<Arc<Unsynced>> {
    // SAFETY: the connection's own log, read between statements on its thread.
    log_of(conn).map(|f| unsafe { Arc::clone(&(*f).unsynced) })
}

/// After a failed sync: writes every byte `conn`'s log wrote since its last good
/// sync again, from memory, in the order first written, then syncs the log. The
/// pages rewritten are dirty again with what SQLite wrote, so a sync that succeeds
/// now has put them on disk (whatever the failed one left in the page cache).
/// Then the log is sound again, and the kept bytes are dropped. `Err` with SQLite's
/// code; the log stays poisoned then (try again: a descriptor that had not reported
/// the failed sync's error yet reports it once, to its next sync).
pub(crate) fn rewrite_unsynced(conn: &Connection) -> Result<(), c_int> {
    let Some(f) = log_of(conn) else {
        return Err(ffi::SQLITE_IOERR);
    };
    // SAFETY: called by the connection's owner between statements.
    let f = unsafe { &mut *f };
    unsafe {
        let rc = f.flush();
        if rc != ffi::SQLITE_OK {
            return Err(rc);
        }
        let mut state = f.unsynced.lock();
        let write = methods(f.real).xWrite.expect("files write");
        for (_, offset, bytes) in &state.writes {
            let rc = write(
                f.real,
                bytes.as_ptr() as *const c_void,
                bytes.len() as c_int,
                *offset,
            );
            if rc != ffi::SQLITE_OK {
                return Err(rc);
            }
        }
        let sync = methods(f.real).xSync.expect("files sync");
        let rc = sync(f.real, ffi::SQLITE_SYNC_NORMAL);
        if rc != ffi::SQLITE_OK {
            return Err(rc);
        }
        state.poisoned = false;
        let synced = state.next;
        drop(state);
        f.unsynced.synced(synced);
    }
    Ok(())
}

/// The next run `conn`'s log writes fails with `rc` instead (tests).
#[cfg(test)]
pub(crate) fn fail_next_run(conn: &Connection, rc: c_int) {
    let f = log_of(conn).expect("a log of this VFS");
    // SAFETY: the test's own connection, between statements.
    unsafe { (*f).fail_next = Some(rc) };
}

/// The next sync of `conn`'s log by SQLite fails with `rc` instead (tests).
#[cfg(test)]
pub(crate) fn fail_next_sync(conn: &Connection, rc: c_int) {
    let f = log_of(conn).expect("a log of this VFS");
    // SAFETY: the test's own connection, between statements.
    unsafe { (*f).fail_next_sync = Some(rc) };
}

/// Test hook: the next sync by SQLite of a log whose name starts with the path
/// given fails with its code (for a connection the test cannot reach).
#[cfg(test)]
static FAIL_SYNC_UNDER: std::sync::Mutex<Vec<(String, c_int)>> = std::sync::Mutex::new(Vec::new());

/// The next sync by SQLite of a log under `dir` fails with `rc` instead (tests).
#[cfg(test)]
pub(crate) fn fail_next_sync_under(dir: &std::path::Path, rc: c_int) {
    let mut list = FAIL_SYNC_UNDER.lock().unwrap_or_else(|p| p.into_inner());
    list.push((dir.to_string_lossy().into_owned(), rc));
}

#[cfg(test)]
fn failing_under(name: &str) -> Option<c_int> {
    let mut list = FAIL_SYNC_UNDER.lock().unwrap_or_else(|p| p.into_inner());
    let i = list
        .iter()
        .position(|(dir, _)| name.starts_with(dir.as_str()))?;
    Some(list.remove(i).1)
}

/// Whether a hook of [`fail_next_sync_under`] is still waiting for its sync (tests).
#[cfg(test)]
pub(crate) fn sync_failing_under(dir: &std::path::Path) -> bool {
    let dir = dir.to_string_lossy();
    let list = FAIL_SYNC_UNDER.lock().unwrap_or_else(|p| p.into_inner());
    list.iter().any(|(d, _)| *d == dir)
}

/// Writes taken into runs and runs written so far by `conn`'s log (tests).
#[cfg(test)]
pub(crate) fn counts(conn: &Connection) -> Option<(u64, u64)> {
    // SAFETY: the test's own connection, between statements.
    log_of(conn).map(|f| unsafe { ((*f).held, (*f).runs) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::OpenFlags;

    fn open(path: &std::path::Path) -> Connection {
        let conn = Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            register().unwrap(),
        )
        .unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, s TEXT NOT NULL, v TEXT NOT NULL);
             CREATE UNIQUE INDEX IF NOT EXISTS t_s ON t(s, k);",
        )
        .unwrap();
        conn
    }

    /// A plain connection (the default VFS) on a copy of the store file and its log
    /// taken while the writer's connection is still open, as a crash leaves them:
    /// what a restart would recover.
    fn recovered(dir: &std::path::Path, path: &std::path::Path) -> (i64, String) {
        let copy = dir.join(format!("copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir(&copy).unwrap();
        std::fs::copy(path, copy.join("db")).unwrap();
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::copy(&wal, copy.join("db-wal")).unwrap();
        let conn = Connection::open(copy.join("db")).unwrap();
        let n = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let check = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        drop(conn);
        std::fs::remove_dir_all(&copy).unwrap();
        (n, check)
    }

    fn insert(conn: &Connection, from: i64, n: i64) {
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut stmt = conn
            .prepare_cached("INSERT INTO t (k, s, v) VALUES (?1, ?2, ?3)")
            .unwrap();
        for k in from..from + n {
            // 64 "sessions": each transaction touches a leaf of the index per session.
            stmt.execute(rusqlite::params![
                k,
                format!("s{}", k % 64),
                "x".repeat(100)
            ])
            .unwrap();
        }
        drop(stmt);
        conn.execute_batch("COMMIT").unwrap();
    }

    #[test]
    fn every_committed_frame_is_in_the_file_when_commit_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        let other = Connection::open(&path).unwrap();
        let mut total = 0;
        // Past several checkpoints (every 1,000 pages) and log resets.
        for round in 0..120 {
            insert(&conn, total, 50);
            total += 50;
            assert_eq!(
                flush_after_commit(&conn),
                Ok(false),
                "held after commit {round}"
            );
            let seen: i64 = other
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(seen, total, "another connection reads the log's frames");
            if round % 40 == 39 {
                assert_eq!(recovered(dir.path(), &path), (total, "ok".to_string()));
            }
        }
        // Held and written in runs: far fewer writes than the frames' two each.
        let (held, runs) = counts(&conn).unwrap();
        assert!(held > 20 * runs, "{held} writes held in {runs} runs");
        assert_eq!(LEFT_AFTER_COMMIT.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_transaction_larger_than_the_page_cache_spills_and_commits_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        // A page cache of 20 pages: the transaction's pages are written to the log
        // before its commit, some of them again (overwritten in place, checksums
        // recomputed at the commit, which reads the frames back).
        conn.execute_batch("PRAGMA cache_size=20").unwrap();
        insert(&conn, 0, 100);
        insert(&conn, 100, 20_000);
        assert_eq!(flush_after_commit(&conn), Ok(false));
        let other = Connection::open(&path).unwrap();
        let seen: i64 = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 20_100);
        assert_eq!(recovered(dir.path(), &path), (20_100, "ok".to_string()));
        // A rolled-back transaction after a spill leaves the committed ones intact.
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        for k in 0..5_000 {
            conn.execute(
                "INSERT INTO t (k, s, v) VALUES (?1, 'r', ?2)",
                rusqlite::params![100_000 + k, "y".repeat(200)],
            )
            .unwrap();
        }
        conn.execute_batch("ROLLBACK").unwrap();
        insert(&conn, 20_100, 10);
        assert_eq!(recovered(dir.path(), &path), (20_110, "ok".to_string()));
        drop(conn);
        let reopened = Connection::open(&path).unwrap();
        let n: i64 = reopened
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 20_110);
    }

    /// A run that cannot be written fails the commit whose frame completes it, as
    /// a failed frame write did before: SQLite rolls the transaction back, keeps
    /// every earlier one, and the next commit writes its frames over the failed
    /// ones; a restart recovers exactly the committed transactions.
    #[test]
    fn a_run_that_cannot_be_written_fails_its_commit_and_loses_nothing_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        insert(&conn, 0, 50);
        for (round, rc) in [ffi::SQLITE_FULL, ffi::SQLITE_IOERR_WRITE]
            .into_iter()
            .enumerate()
        {
            fail_next_run(&conn, rc);
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            for k in 0..50 {
                conn.execute(
                    "INSERT INTO t (k, s, v) VALUES (?1, ?2, 'lost')",
                    rusqlite::params![1_000 * (round as i64 + 1) + k, format!("s{}", k % 64)],
                )
                .unwrap();
            }
            let err = conn.execute_batch("COMMIT").unwrap_err();
            assert_eq!(
                err.sqlite_error().map(|e| e.extended_code),
                Some(rc),
                "{err}"
            );
            if !conn.is_autocommit() {
                conn.execute_batch("ROLLBACK").unwrap();
            }
            assert_eq!(flush_after_commit(&conn), Ok(false));
            let n: i64 = conn
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 50 + 10 * round as i64, "the failed transaction is gone");
            insert(&conn, 50 + 10 * round as i64, 10);
        }
        let lost: i64 = conn
            .query_row("SELECT count(*) FROM t WHERE v = 'lost'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(lost, 0);
        let other = Connection::open(&path).unwrap();
        let seen: i64 = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 70);
        assert_eq!(recovered(dir.path(), &path), (70, "ok".to_string()));
    }

    /// What a failed sync was to write, lost from the page cache (zeros read back):
    /// while the log is poisoned SQLite's own checkpoint copies none of it into the
    /// store file, and once the log is written again from memory it is whole again.
    #[test]
    fn a_poisoned_log_is_not_checkpointed_and_is_written_again_from_memory() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        insert(&conn, 0, 50);
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap();
        let unsynced = unsynced_of(&conn).unwrap();
        // Synced (as the syncer would): nothing kept.
        insert(&conn, 50, 50);
        let mark = unsynced.mark();
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::File::open(&wal).unwrap().sync_data().unwrap();
        unsynced.synced(mark);
        assert!(unsynced.lock().writes.is_empty());
        let synced_len = std::fs::metadata(&wal).unwrap().len();
        // Written, its sync fails, and the page cache loses it.
        insert(&conn, 100, 50);
        assert!(!unsynced.lock().writes.is_empty());
        unsynced.failed();
        let len = std::fs::metadata(&wal).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
        file.write_all_at(&vec![0; (len - synced_len) as usize], synced_len)
            .unwrap();
        let err = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_err();
        assert!(err.to_string().contains("I/O"), "{err}");
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), len, "checkpointed");
        // A restart now would keep the first 100 rows only (the zeros fail the
        // checksums), and the store file is sound.
        assert_eq!(recovered(dir.path(), &path), (100, "ok".to_string()));
        rewrite_unsynced(&conn).unwrap();
        assert!(!unsynced.poisoned() && unsynced.lock().writes.is_empty());
        assert_eq!(recovered(dir.path(), &path), (150, "ok".to_string()));
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap();
        drop(conn);
        let reopened = Connection::open(&path).unwrap();
        let n: i64 = reopened
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 150);
        let check: String = reopened
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    /// A sync of SQLite's own that fails (a checkpoint's) poisons the log as the
    /// syncer's does: no checkpoint reads it until it is written again.
    #[test]
    fn a_failed_sync_of_sqlites_own_poisons_the_log_until_it_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open(&path);
        insert(&conn, 0, 50);
        let unsynced = unsynced_of(&conn).unwrap();
        let checkpoint = |conn: &Connection| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
        };
        fail_next_sync(&conn, ffi::SQLITE_IOERR_FSYNC);
        checkpoint(&conn).unwrap_err();
        assert!(unsynced.poisoned());
        // Poisoned: refused without a sync, and what the log holds is kept.
        insert(&conn, 50, 10);
        checkpoint(&conn).unwrap_err();
        assert!(unsynced.poisoned() && !unsynced.lock().writes.is_empty());
        rewrite_unsynced(&conn).unwrap();
        assert!(!unsynced.poisoned());
        assert_eq!(checkpoint(&conn).unwrap(), 0);
        assert_eq!(recovered(dir.path(), &path), (60, "ok".to_string()));
    }
}
