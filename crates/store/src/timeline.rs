//! A timeline of the durable-enqueue cycle, for measuring it (off unless asked for).
//!
//! With `AGENTD_TIMELINE=FILE` in the environment of the process, [`mark`] records
//! (monotonic ns, stage, argument, thread, CPU) in a preallocated ring of 4 Mi entries,
//! and [`dump`] (called when the store closes) writes them to FILE, one line each:
//! `ns stage arg thread cpu`. Without the variable every [`mark`] is one relaxed load of
//! a flag that is false. `scripts/timeline.py` reads the file.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The stages marked (the names in the dump).
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub enum Stage {
    /// A connection read a request line (arg: 0).
    Read = 0,
    /// The loop took a request (arg: 0).
    Loop,
    /// The loop handed writes to the writer (arg: how many).
    Hand,
    /// The writer woke with ops (arg: how many in the first message).
    WriterWoke,
    /// The writer's wait for the sync in flight ended.
    SyncWaited,
    /// A commit started (arg: ops).
    CommitStart,
    /// A commit ended (arg: ops).
    CommitEnd,
    /// The syncer took transactions (arg: ops).
    SyncTaken,
    /// `fdatasync` started.
    SyncStart,
    /// `fdatasync` ended.
    SyncEnd,
    /// The syncer called every completion of a sync (arg: ops).
    Released,
    /// The relay queued an answer on its connection.
    Relayed,
    /// A connection wrote an answer line.
    Wrote,
}

const NAMES: [&str; 13] = [
    "read", "loop", "hand", "woke", "waited", "c0", "c1", "taken", "s0", "s1", "released",
    "relayed", "wrote",
];

const CAPACITY: usize = 1 << 22;

static ON: AtomicBool = AtomicBool::new(false);

struct Log {
    path: String,
    next: AtomicUsize,
    /// Pairs: ns, then stage | arg << 8 | cpu << 32 | thread << 40.
    entries: Vec<AtomicU64>,
}

static LOG: OnceLock<Option<Log>> = OnceLock::new();

fn log() -> Option<&'static Log> {
    LOG.get_or_init(|| {
        let path = std::env::var("AGENTD_TIMELINE").ok()?;
        let entries = (0..CAPACITY * 2).map(|_| AtomicU64::new(0)).collect();
        ON.store(true, Ordering::Relaxed);
        Some(Log {
            path,
            next: AtomicUsize::new(0),
            entries,
        })
    })
    .as_ref()
}

/// Reads the environment once (call at start).
pub fn init() {
    let _ = log();
}

fn now_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Records `stage` now (a no-op unless `AGENTD_TIMELINE` was set at [`init`]).
#[inline]
pub fn mark(stage: Stage, arg: u32) {
    if ON.load(Ordering::Relaxed) {
        record(stage, arg);
    }
}

#[cold]
fn record(stage: Stage, arg: u32) {
    let Some(log) = log() else { return };
    let i = log.next.fetch_add(1, Ordering::Relaxed);
    if i >= CAPACITY {
        return;
    }
    thread_local! {
        // SAFETY: gettid has no preconditions.
        static TID: u64 = unsafe { libc::syscall(libc::SYS_gettid) } as u64;
    }
    let tid = TID.with(|t| *t);
    // SAFETY: no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    log.entries[2 * i].store(now_ns(), Ordering::Relaxed);
    log.entries[2 * i + 1].store(
        stage as u64
            | (arg as u64 & 0xff_ffff) << 8
            | (cpu as u64 & 0xff) << 32
            | (tid & 0xff_ffff) << 40,
        Ordering::Relaxed,
    );
}

/// Writes what was recorded to the file named by `AGENTD_TIMELINE`.
pub fn dump() {
    let Some(Some(log)) = LOG.get() else { return };
    use std::io::Write;
    let n = log.next.load(Ordering::Relaxed).min(CAPACITY);
    let Ok(file) = std::fs::File::create(&log.path) else {
        return;
    };
    let mut out = std::io::BufWriter::new(file);
    for i in 0..n {
        let ns = log.entries[2 * i].load(Ordering::Relaxed);
        let word = log.entries[2 * i + 1].load(Ordering::Relaxed);
        let stage = NAMES.get((word & 0xff) as usize).unwrap_or(&"?");
        let _ = writeln!(
            out,
            "{ns} {stage} {} {} {}",
            (word >> 8) & 0xff_ffff,
            word >> 40,
            (word >> 32) & 0xff
        );
    }
}
