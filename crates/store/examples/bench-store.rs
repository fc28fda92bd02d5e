//! Store benchmark, run by `scripts/bench-store.sh`. Not a test: it reports.
//!
//! `bench-store enqueue DIR`: durable enqueue rates on DIR's disk, each against the
//! same baseline measured in the same run: one fsync'd commit per message (a plain
//! SQLite connection, WAL + synchronous=FULL, one INSERT per transaction): 1 client,
//! 64 client threads (each blocked on its answer, so every answer wakes a thread),
//! and 64 clients driven from one thread by completion callbacks (as agentd's loop
//! drives the store), each with the writer's and the whole process's CPU per message.
//! `bench-store reopen DIR`: fills a store with 100,000 queued tasks over 10,000
//! sessions, closes it, and times a fresh process opening and recovering it.

use std::path::Path;
use std::time::{Duration, Instant};

use agentd_store::{Op, Outcome, Store, StoreOptions, TaskRecord};
use uuid::Uuid;

fn task(session: usize, n: usize) -> TaskRecord {
    let mut t = TaskRecord::queued(
        Uuid::now_v7(),
        &format!("chat-{session}"),
        &format!("message {n} of chat {session}: please look at the build"),
        1_700_000_000_000,
    );
    t.message_id = Some(format!("evt-{session}-{n}"));
    t
}

/// One INSERT per transaction on a plain connection: one fsync'd commit per message.
fn baseline(dir: &Path, n: usize) -> f64 {
    let conn = rusqlite::Connection::open(dir.join("baseline.db")).unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .unwrap();
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE t (id TEXT PRIMARY KEY, session TEXT, text TEXT, message_id TEXT);
         CREATE UNIQUE INDEX t_m ON t(session, message_id);",
    )
    .unwrap();
    let start = Instant::now();
    for i in 0..n {
        let t = task(i % 100, i);
        conn.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4)",
            (t.id.to_string(), &t.session, &t.text, &t.message_id),
        )
        .unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// CPU time (utime + stime) in microseconds of this process, or of its thread named
/// `thread` (the store's writer is "agentd-store"), from /proc.
fn cpu_us(thread: Option<&str>) -> u64 {
    let ticks_us = 1_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let fields = |stat: &str| -> u64 {
        // After the ")" that closes the name: state is field 3; utime, stime are 14, 15.
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        (n(11) + n(12)) * ticks_us
    };
    match thread {
        None => fields(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default()),
        Some(name) => std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .map(|t| fields(&std::fs::read_to_string(t.path().join("stat")).unwrap_or_default()))
            .sum(),
    }
}

struct Rate {
    per_s: f64,
    commits: u64,
    /// fdatasyncs of the log by the store's syncer (0 in builds without one).
    syncs: u64,
    ops: u64,
    /// CPU microseconds per op: the writer thread's, the syncer thread's (which
    /// syncs the log and answers; absent in builds without one), and the whole
    /// process's (the clients' submits and wake-ups, and the store's threads).
    writer_us: f64,
    syncer_us: f64,
    process_us: f64,
}

/// The thread that syncs the store's log and completes its ops.
const SYNCER: &str = "agentd-sync";

/// `clients` threads, each submitting and waiting for `per_client` durable inserts.
fn store_rate(dir: &Path, clients: usize, per_client: usize) -> Rate {
    let (store, _) = Store::open(dir, StoreOptions::default()).unwrap();
    let before = store.stats();
    let (writer_before, syncer_before, process_before) = (
        cpu_us(Some("agentd-store")),
        cpu_us(Some(SYNCER)),
        cpu_us(None),
    );
    let start = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..clients {
            let w = store.writer();
            scope.spawn(move || {
                for i in 0..per_client {
                    let op = Op::Insert {
                        task: Box::new(task(c, i)),
                        front: false,
                    };
                    assert_eq!(w.submit(op).wait().unwrap(), Outcome::Inserted);
                }
            });
        }
    });
    let elapsed = start.elapsed();
    let (writer_after, syncer_after, process_after) = (
        cpu_us(Some("agentd-store")),
        cpu_us(Some(SYNCER)),
        cpu_us(None),
    );
    let after = store.stats();
    let total = (clients * per_client) as f64;
    Rate {
        per_s: total / elapsed.as_secs_f64(),
        commits: after.commits - before.commits,
        syncs: after.syncs - before.syncs,
        ops: after.ops - before.ops,
        writer_us: (writer_after - writer_before) as f64 / total,
        syncer_us: (syncer_after - syncer_before) as f64 / total,
        process_us: (process_after - process_before) as f64 / total,
    }
}

/// `clients` clients, each with one durable insert in flight at a time (the next is
/// sent once the previous one's commit is told), driven from one thread by
/// completion callbacks, as agentd's loop drives the store: what the store costs
/// without a thread per client to wake for every answer.
fn store_rate_one_thread(dir: &Path, clients: usize, per_client: usize) -> Rate {
    let (store, _) = Store::open(dir, StoreOptions::default()).unwrap();
    let before = store.stats();
    let (writer_before, syncer_before, process_before) = (
        cpu_us(Some("agentd-store")),
        cpu_us(Some(SYNCER)),
        cpu_us(None),
    );
    let start = Instant::now();
    let w = store.writer();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let submit = |c: usize, i: usize| {
        let done = done_tx.clone();
        let op = Op::Insert {
            task: Box::new(task(c, i)),
            front: false,
        };
        w.submit_with(op, move |result| {
            let _ = done.send((c, result));
        });
    };
    let mut sent = vec![1; clients];
    for c in 0..clients {
        submit(c, 0);
    }
    for _ in 0..clients * per_client {
        let (c, result) = done_rx.recv().unwrap();
        assert_eq!(result.unwrap(), Outcome::Inserted);
        if sent[c] < per_client {
            submit(c, sent[c]);
            sent[c] += 1;
        }
    }
    let elapsed = start.elapsed();
    let (writer_after, syncer_after, process_after) = (
        cpu_us(Some("agentd-store")),
        cpu_us(Some(SYNCER)),
        cpu_us(None),
    );
    let after = store.stats();
    let total = (clients * per_client) as f64;
    Rate {
        per_s: total / elapsed.as_secs_f64(),
        commits: after.commits - before.commits,
        syncs: after.syncs - before.syncs,
        ops: after.ops - before.ops,
        writer_us: (writer_after - writer_before) as f64 / total,
        syncer_us: (syncer_after - syncer_before) as f64 / total,
        process_us: (process_after - process_before) as f64 / total,
    }
}

fn enqueue(dir: &Path) {
    let n_base = 2000;
    let base = baseline(dir, n_base);
    println!(
        "baseline: one fsync'd commit per message (plain SQLite, WAL+FULL): {base:8.0} msgs/s"
    );
    let d1 = dir.join("one");
    std::fs::create_dir_all(&d1).unwrap();
    let one = store_rate(&d1, 1, n_base);
    println!(
        "store, 1 client:                 {:8.0} msgs/s  {:5.1}x baseline  ({} ops in {} commits)",
        one.per_s,
        one.per_s / base,
        one.ops,
        one.commits
    );
    let d64 = dir.join("many");
    std::fs::create_dir_all(&d64).unwrap();
    let many = store_rate(&d64, 64, 1000);
    println!(
        "store, 64 concurrent clients:    {:8.0} msgs/s  {:5.1}x baseline  ({} ops in {} commits and {} syncs, {:.0} per commit)   target >= 10x",
        many.per_s,
        many.per_s / base,
        many.ops,
        many.commits,
        many.syncs,
        many.ops as f64 / many.commits.max(1) as f64
    );
    println!(
        "  CPU per message: writer thread {:.1} us, syncer thread {:.1} us, whole process {:.1} us (writer {:.0} us per commit)",
        many.writer_us,
        many.syncer_us,
        many.process_us,
        many.writer_us * many.ops as f64 / many.commits.max(1) as f64
    );
    let d1t = dir.join("one-thread");
    std::fs::create_dir_all(&d1t).unwrap();
    let loop_ = store_rate_one_thread(&d1t, 64, 1000);
    println!(
        "store, 64 clients on one thread: {:8.0} msgs/s  {:5.1}x baseline  ({} ops in {} commits and {} syncs, {:.0} per commit; answered by callback, as agentd's loop)",
        loop_.per_s,
        loop_.per_s / base,
        loop_.ops,
        loop_.commits,
        loop_.syncs,
        loop_.ops as f64 / loop_.commits.max(1) as f64
    );
    println!(
        "  CPU per message: writer thread {:.1} us, syncer thread {:.1} us, whole process {:.1} us (writer {:.0} us per commit)",
        loop_.writer_us,
        loop_.syncer_us,
        loop_.process_us,
        loop_.writer_us * loop_.ops as f64 / loop_.commits.max(1) as f64
    );
}

fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn reopen(dir: &Path) {
    let (sessions, per_session) = (10_000, 10);
    {
        let (store, _) = Store::open(dir, StoreOptions::default()).unwrap();
        let w = store.writer();
        let start = Instant::now();
        let mut tickets = Vec::new();
        for i in 0..per_session {
            for s in 0..sessions {
                tickets.push(w.submit(Op::Insert {
                    task: Box::new(task(s, i)),
                    front: false,
                }));
            }
            for t in tickets.drain(..) {
                t.wait().unwrap();
            }
        }
        println!(
            "filled {} queued over {sessions} sessions in {:.2} s",
            sessions * per_session,
            start.elapsed().as_secs_f64()
        );
        // A fresh process opens it, as agentd does after a restart.
        let exe = std::env::current_exe().unwrap();
        drop(w);
        store.close();
        let out = std::process::Command::new(exe)
            .arg("reopen-child")
            .arg(dir)
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

fn reopen_child(dir: &Path) {
    let start = Instant::now();
    let (store, recovery) = Store::open(dir, StoreOptions::default()).unwrap();
    let elapsed = start.elapsed();
    let sessions: std::collections::HashSet<&str> =
        recovery.queued.iter().map(|t| t.session.as_str()).collect();
    println!(
        "reopen: {} queued over {} sessions recovered in {:.3} s (target < 2 s; {:.2}x of the target), peak RSS {} MB (target < 100 MB)",
        recovery.queued.len(),
        sessions.len(),
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() / Duration::from_secs(2).as_secs_f64(),
        vm_hwm_kb() / 1024
    );
    drop(recovery);
    drop(store);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("enqueue"), Some(dir)) => enqueue(Path::new(dir)),
        (Some("reopen"), Some(dir)) => reopen(Path::new(dir)),
        // The 64-client parts alone, without a baseline: to profile the writer.
        (Some(mode @ ("clients" | "clients-one-thread")), Some(dir)) => {
            let per = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1000);
            let r = if mode == "clients" {
                store_rate(Path::new(dir), 64, per)
            } else {
                store_rate_one_thread(Path::new(dir), 64, per)
            };
            println!(
                "64 clients: {:.0} msgs/s, {} ops in {} commits and {} syncs, CPU per message: writer {:.1} us, syncer {:.1} us, process {:.1} us",
                r.per_s, r.ops, r.commits, r.syncs, r.writer_us, r.syncer_us, r.process_us
            );
        }
        (Some("reopen-child"), Some(dir)) => reopen_child(Path::new(dir)),
        _ => {
            eprintln!(
                "usage: bench-store enqueue|reopen DIR, or clients|clients-one-thread DIR [PER_CLIENT]"
            );
            std::process::exit(2);
        }
    }
}
