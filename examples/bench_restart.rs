//! Restart benchmark driver (run by `scripts/bench-restart.sh`, not by the tests).
//!
//! Issue 7: "restart with 100,000 queued over 10,000 sessions: ready to answer in
//! under 2 s; RSS under 100 MB". In one run it measures:
//! - the baseline: an agentd on an empty store, killed with SIGKILL and started
//!   again on it (the same restart with nothing to recover);
//! - the full run: an agentd whose two agent slots hold tasks that never end,
//!   N messages enqueued over S sessions (pipelined clients; with `message_id`s,
//!   as bridges send them), its memory at N queued, SIGKILL, and a start on the
//!   same state dir;
//!
//! and prints, for each restart, the time from exec to the first answered `status`,
//! VmHWM (peak) and VmRSS once it answers, and the recovery line of `status`, beside
//! the baseline and the raw size of the queued data (message text and session
//! bytes; the store's files). It asserts nothing.
//!
//! Usage: bench_restart --bin DIR --work DIR [--messages 100000] [--sessions 10000]
//!        [--clients 8] [--text 'sleep 600'] [--no-message-ids]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Options {
    bin: PathBuf,
    work: PathBuf,
    messages: usize,
    sessions: usize,
    clients: usize,
    text: String,
    message_ids: bool,
}

/// One agentd process, started on a state dir.
struct Daemon {
    child: Child,
    socket: PathBuf,
    /// From exec to the first answered `status`.
    ready_after: Duration,
}

impl Daemon {
    fn start(opts: &Options, state: &str) -> Daemon {
        let socket = opts.work.join(format!("{state}.sock"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(opts.work.join(format!("{state}.log")))
            .expect("open the agentd log");
        let t = Instant::now();
        let mut child = Command::new(opts.bin.join("agentd"))
            .arg("--config")
            .arg(opts.work.join("agentd.toml"))
            .args(["--max-concurrent", "2", "--state-dir"])
            .arg(opts.work.join(state))
            .env("AGENTD_SOCKET", &socket)
            .env("PATH", path_with(&opts.bin))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agentd");
        let deadline = t + Duration::from_secs(120);
        loop {
            if let Some(reply) = try_status(&socket) {
                if reply.contains("\"ok\":true") {
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("agentd exited before it answered: {status} (see {state}.log)");
            }
            assert!(Instant::now() < deadline, "agentd did not answer in 120 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        Daemon {
            ready_after: t.elapsed(),
            child,
            socket,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status(&self) -> serde_json::Value {
        let reply = try_status(&self.socket).expect("status");
        serde_json::from_str(&reply).expect("a JSON reply")
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_with(bin: &Path) -> String {
    let old = std::env::var("PATH").unwrap_or_default();
    format!("{}:{old}", bin.display())
}

/// One `status` round trip on a fresh connection, or None if agentd does not answer.
fn try_status(socket: &Path) -> Option<String> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.write_all(b"{\"id\":1,\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    (!line.is_empty()).then_some(line)
}

/// Memory of a process, in KiB, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    hwm: u64,
    rss: u64,
    anon: u64,
    file: u64,
}

fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        hwm: field("VmHWM:"),
        rss: field("VmRSS:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    }
}

fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Pipelined enqueue: `clients` connections, each writing its share of the requests
/// back to back while a second thread reads the answers (agentd holds at most 64 in
/// flight per connection, so the writer is paced by the socket). Returns the number
/// of error answers.
fn enqueue(opts: &Options, socket: &Path) -> usize {
    let results: Vec<usize> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..opts.clients)
            .map(|c| {
                scope.spawn(move || {
                    let stream = UnixStream::connect(socket).expect("connect");
                    let reader = stream.try_clone().expect("clone the stream");
                    let mine: Vec<usize> = (c..opts.messages).step_by(opts.clients).collect();
                    let expected = mine.len();
                    let answers = std::thread::spawn(move || {
                        let mut reader = BufReader::new(reader);
                        let (mut line, mut errors) = (String::new(), 0);
                        for _ in 0..expected {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return errors + 1;
                            }
                            if !line.contains("\"ok\":true") {
                                if errors == 0 {
                                    eprintln!("first error answer: {}", line.trim());
                                }
                                errors += 1;
                            }
                        }
                        errors
                    });
                    let mut writer = std::io::BufWriter::with_capacity(64 * 1024, &stream);
                    for i in mine {
                        let message_id = if opts.message_ids {
                            format!(",\"message_id\":\"m{i}\"")
                        } else {
                            String::new()
                        };
                        writeln!(
                            writer,
                            "{{\"id\":{i},\"cmd\":\"send\",\"session\":\"s{}\",\"text\":{:?}{message_id}}}",
                            i % opts.sessions,
                            opts.text
                        )
                        .expect("write a request");
                    }
                    writer.flush().expect("flush");
                    answers.join().expect("reader thread")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    results.into_iter().sum()
}

fn recovery_line(status: &serde_json::Value) -> String {
    let r = &status["result"]["recovery"];
    if r.is_null() {
        return format!(
            "(no recovery; queued {})",
            status["result"]["queued"].as_u64().unwrap_or(0)
        );
    }
    let n = |k: &str| r[k].as_u64().unwrap_or(0) as u32;
    format!(
        "{}; queued now {}",
        agentd_proto::text::recovery_line(
            n("queued"),
            n("over_limits"),
            n("interrupted"),
            n("killed"),
            r["crashed"].as_bool().unwrap_or(false)
        ),
        status["result"]["queued"].as_u64().unwrap_or(0)
    )
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The store's files: agentd.db and its write-ahead log, in bytes.
fn store_size(dir: &Path) -> (u64, u64) {
    (
        file_size(&dir.join("agentd.db")),
        file_size(&dir.join("agentd.db-wal")),
    )
}

struct Restart {
    ready: Duration,
    mem: Memory,
    recovery: String,
}

/// Starts agentd on `state`, measures it once it answers, and kills it.
fn restart(opts: &Options, state: &str) -> Restart {
    let daemon = Daemon::start(opts, state);
    let mem = memory(daemon.pid());
    let recovery = recovery_line(&daemon.status());
    let ready = daemon.ready_after;
    daemon.kill9();
    Restart {
        ready,
        mem,
        recovery,
    }
}

fn main() {
    let mut opts = Options {
        bin: PathBuf::new(),
        work: PathBuf::new(),
        messages: 100_000,
        sessions: 10_000,
        clients: 8,
        text: "sleep 600".to_string(),
        message_ids: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match arg.as_str() {
            "--bin" => opts.bin = PathBuf::from(value()),
            "--work" => opts.work = PathBuf::from(value()),
            "--messages" => opts.messages = value().parse().expect("a number"),
            "--sessions" => opts.sessions = value().parse().expect("a number"),
            "--clients" => opts.clients = value().parse().expect("a number"),
            "--text" => opts.text = value(),
            "--no-message-ids" => opts.message_ids = false,
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !opts.work.as_os_str().is_empty() && !opts.bin.as_os_str().is_empty(),
        "--bin DIR --work DIR"
    );
    std::fs::write(
        opts.work.join("agentd.toml"),
        format!(
            "max-queued = {0}\ncap = {0}\nhistory = 1000\n",
            opts.messages * 2
        ),
    )
    .expect("write the config");

    // Baseline: the same restart with an empty store.
    let first = Daemon::start(&opts, "empty");
    let first_mem = memory(first.pid());
    let first_ready = first.ready_after;
    first.kill9();
    let base = restart(&opts, "empty");

    // The full run.
    let daemon = Daemon::start(&opts, "full");
    let t = Instant::now();
    let errors = enqueue(&opts, &daemon.socket);
    let took = t.elapsed();
    let queued_mem = memory(daemon.pid());
    // And once it has been idle for a while (its timers have run).
    std::thread::sleep(Duration::from_millis(1500));
    let idle_mem = memory(daemon.pid());
    let queued = daemon.status()["result"]["queued"].as_u64().unwrap_or(0);
    daemon.kill9();
    let (db, wal) = store_size(&opts.work.join("full"));
    let text_bytes = opts.text.len() * opts.messages;
    let session_bytes: usize = (0..opts.messages)
        .map(|i| format!("s{}", i % opts.sessions).len())
        .sum();
    let id_bytes: usize = if opts.message_ids {
        (0..opts.messages).map(|i| format!("m{i}").len()).sum()
    } else {
        0
    };
    let raw_kib = ((text_bytes + session_bytes + id_bytes) / 1024) as u64;
    let full = restart(&opts, "full");

    println!(
        "restart benchmark: {} messages over {} sessions ({} text bytes each, message ids: {}), 2 slots held",
        opts.messages,
        opts.sessions,
        opts.text.len(),
        if opts.message_ids { "yes" } else { "no" }
    );
    println!(
        "raw queued data: text + session + message id {:.1} MB (+16 B id each: {:.1} MB); store file {:.1} MB + WAL {:.1} MB",
        mb(raw_kib),
        mb(raw_kib + (opts.messages as u64 * 16) / 1024),
        db as f64 / 1048576.0,
        wal as f64 / 1048576.0
    );
    println!(
        "baseline: first start, empty store            ready {:7.3} s   VmHWM {:6.1} MB  VmRSS {:6.1} MB",
        first_ready.as_secs_f64(),
        mb(first_mem.hwm),
        mb(first_mem.rss)
    );
    println!(
        "baseline: restart after kill -9, empty store  ready {:7.3} s   VmHWM {:6.1} MB  VmRSS {:6.1} MB (anon {:.1}, file {:.1})",
        base.ready.as_secs_f64(),
        mb(base.mem.hwm),
        mb(base.mem.rss),
        mb(base.mem.anon),
        mb(base.mem.file)
    );
    println!("  {}", base.recovery);
    println!(
        "enqueue: {} sent in {:.2} s ({:.0}/s), {errors} refused, agentd says {queued} queued",
        opts.messages,
        took.as_secs_f64(),
        opts.messages as f64 / took.as_secs_f64()
    );
    println!(
        "at {queued} queued, right after the enqueue  VmHWM {:6.1} MB  VmRSS {:6.1} MB (anon {:.1}, file {:.1})  {:.2}× the empty restart's RSS, {:.0} B a queued task above it",
        mb(queued_mem.hwm),
        mb(queued_mem.rss),
        mb(queued_mem.anon),
        mb(queued_mem.file),
        queued_mem.rss as f64 / base.mem.rss.max(1) as f64,
        (queued_mem.rss.saturating_sub(base.mem.rss) * 1024) as f64 / queued.max(1) as f64
    );
    println!(
        "  and after 1.5 s idle                     VmRSS {:6.1} MB (anon {:.1}, file {:.1})",
        mb(idle_mem.rss),
        mb(idle_mem.anon),
        mb(idle_mem.file)
    );
    println!(
        "restart after kill -9, {} queued: ready {:7.3} s ({:5.2}× the empty restart; target < 2 s)",
        opts.messages,
        full.ready.as_secs_f64(),
        full.ready.as_secs_f64() / base.ready.as_secs_f64()
    );
    println!(
        "  VmHWM (peak) {:6.1} MB  {:5.2}× the empty restart, {:5.1}× the raw data, {:5.2}× the store file (target < 100 MB)",
        mb(full.mem.hwm),
        full.mem.hwm as f64 / base.mem.hwm.max(1) as f64,
        full.mem.hwm as f64 / raw_kib.max(1) as f64,
        (full.mem.hwm * 1024) as f64 / (db + wal).max(1) as f64
    );
    println!(
        "  VmRSS ready  {:6.1} MB  {:5.2}× the empty restart, {:5.1}× the raw data (anon {:.1}, file {:.1}; target < 100 MB)",
        mb(full.mem.rss),
        full.mem.rss as f64 / base.mem.rss.max(1) as f64,
        full.mem.rss as f64 / raw_kib.max(1) as f64,
        mb(full.mem.anon),
        mb(full.mem.file)
    );
    println!("  {}", full.recovery);
}
