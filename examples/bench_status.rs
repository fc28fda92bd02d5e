//! `status` latency while the store's writer is busy (run by `scripts/bench-store.sh`,
//! not by the tests; issue 7's target: within 2× of idle).
//!
//! Against a running agentd whose tasks never start (one agent slot held), in one run:
//! 1. idle: `status` round trips on a connection of their own, and the same line
//!    echoed by a bare echo server (a process of its own), interleaved;
//! 2. busy: `clients` connections send durable work back to back (each waits for its
//!    acknowledgement, which agentd gives after the commit), while one more
//!    connection measures `status` round trips until they are done;
//! 3. the baseline for the busy figures: the same clients at the same request rate
//!    against the echo server, while the probe measures the echo's round trip. This
//!    is the part of the tail that the machine and this benchmark's own threads
//!    cause (on a 2-core machine, 64 client threads compete with agentd for the
//!    CPU), not agentd.
//!
//! It prints p50/p90/p99 of each, every busy figure as a ratio to its idle figure,
//! and agentd's ratios beside the echo's. It asserts nothing.
//!
//! With `--rate-only` it runs instead the rate phase alone, without a probe: the
//! same `clients` connections sending the same durable work, but all driven from
//! this one thread waiting in `epoll` (each connection with exactly one `send`
//! outstanding, the next sent only once its acknowledgement is read: no pipelining
//! on a connection), so that the clients cost the 2-core machine as little as they
//! can. It prints the rate and the client's own CPU time per message.
//!
//! With `--paced MICROS` it runs instead the paced phase: the writer kept busy by
//! the rate phase's load (the same connections on one `epoll` thread as
//! `--rate-only`), while one more connection sends one `status` every MICROS
//! microseconds, open loop (each at its scheduled time whether or not the earlier
//! ones were answered; its latency from its actual write to its answer, read by a
//! thread of its own), as a user's sporadic `/status` is sent. Its idle reference is
//! the same paced probe with no load (agentd and the echo server in four alternating
//! chunks of `idle / 4` requests each); its baseline the same paced probe against the
//! echo server under the same load, paced to agentd's rate. Printed as the threads'
//! phase prints, with how late the probe's writes were against their schedule.
//!
//! Both latency phases also print, per request, what the thread of agentd that
//! answers `status` (`agentd-fast`) spent (its schedstat and `status`): CPU time,
//! time waiting in a run queue for a CPU, how many times it ran and how many times it
//! went to sleep, idle and busy.
//!
//! `--fsync-baseline DIR` measures, on DIR's disk, the rate both phases are judged
//! against: one fsync'd commit per message (a plain SQLite connection, WAL +
//! synchronous=FULL, one INSERT per transaction, as `bench-store enqueue`'s
//! baseline). `--baseline RATE` prints a phase's rate as a ratio to it.
//!
//! Usage: bench_status --socket PATH [--clients 64] [--per 200] [--idle 5000]
//!        [--probe status|ping] [--rate-only | --paced MICROS] [--baseline RATE]
//!        bench_status --fsync-baseline DIR

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "common/socket_bench.rs"]
mod socket_bench;
use socket_bench::{serve_echo, Conn, EchoServer};

/// A timed round trip that must not be an error reply.
trait Timed {
    fn timed(&mut self, request: &str) -> Duration;
}

impl Timed for Conn {
    fn timed(&mut self, request: &str) -> Duration {
        let t = Instant::now();
        let reply = self.round_trip(request);
        let elapsed = t.elapsed();
        assert!(!reply.contains("\"ok\":false"), "error reply: {reply}");
        elapsed
    }
}

/// p50, p90, p99 of `samples`.
struct Percentiles([Duration; 3]);

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Percentiles {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        Percentiles([at(0.5), at(0.9), at(0.99)])
    }

    fn show(&self) -> String {
        let [a, b, c] = self.0.map(|d| d.as_secs_f64() * 1e3);
        format!("p50 {a:7.3} ms  p90 {b:7.3} ms  p99 {c:7.3} ms")
    }

    fn ratios(&self, idle: &Percentiles) -> [f64; 3] {
        let mut out = [0.0; 3];
        for (i, r) in out.iter_mut().enumerate() {
            *r = self.0[i].as_secs_f64() / idle.0[i].as_secs_f64().max(1e-9);
        }
        out
    }
}

fn show_ratios([a, b, c]: [f64; 3]) -> String {
    format!("p50 {a:5.2}×  p90 {b:5.2}×  p99 {c:5.2}×")
}

/// The probe's request line: `status` (or, with `--probe ping`, `ping`, which the
/// connection answers without the loop: what the connections' thread alone costs).
static PROBE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn probe_line() -> &'static str {
    PROBE.get_or_init(|| "{\"id\":1,\"cmd\":\"status\"}\n".to_string())
}

/// `n` round trips of `status` to agentd and `n` to the echo server, alternating one
/// by one so that both see the same load.
fn idle(socket: &Path, echo: &Path, n: usize) -> (Percentiles, Percentiles) {
    let mut ours = Conn::connect(socket);
    let mut base = Conn::connect(echo);
    for _ in 0..n / 10 {
        ours.timed(probe_line());
        base.timed(probe_line());
    }
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        a.push(ours.timed(probe_line()));
        b.push(base.timed(probe_line()));
    }
    (Percentiles::of(a), Percentiles::of(b))
}

/// Client `c`'s `i`th request: durable work (it waits behind the gate, which never
/// opens) with a message id of its own, over ten sessions of the client's own.
fn send_line(c: usize, i: usize) -> String {
    format!(
        "{{\"id\":{i},\"cmd\":\"send\",\"session\":\"chat-{c}-{}\",\"text\":\"while [ ! -e /nonexistent-gate ]; do sleep 1; done # {i}\",\"message_id\":\"m-{c}-{i}\"}}\n",
        i % 10
    )
}

/// CPU time (user + system) of this process so far.
fn process_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The rate phase without a probe: `clients` connections to `path`, all on this
/// thread, waiting in `epoll` for their answers (registered for readability only,
/// so that agentd reading a request, which frees its buffer and signals the
/// client's socket writable, wakes nothing here). Each connection has one `send`
/// outstanding at a time and sends its next only after reading the answer to the
/// last: the same requests and the same acknowledgement after the commit as the
/// threads' phase. With `rate`, no faster than that in all: connection `c`'s `i`th
/// send is due `i * clients / rate` seconds after the start (as the threads'
/// schedule in [`busy`]), and one whose answer came early waits for its time (in
/// `epoll_wait`'s timeout, which has a millisecond's resolution; the schedule is
/// absolute, so the rate holds). Returns the rate, the client's CPU time per
/// message and how many were refused.
fn rate_epoll(
    path: &Path,
    clients: usize,
    per: usize,
    rate: Option<f64>,
) -> (f64, Duration, usize) {
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    struct Client {
        stream: UnixStream,
        sent: usize,
        reply: Vec<u8>,
    }
    let mut poll = Poll::new().expect("an epoll instance");
    let mut conns: Vec<Client> = (0..clients)
        .map(|c| {
            let stream = UnixStream::connect(path)
                .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
            stream.set_nonblocking(true).expect("a non-blocking socket");
            poll.registry()
                .register(
                    &mut SourceFd(&stream.as_raw_fd()),
                    Token(c),
                    Interest::READABLE,
                )
                .expect("register a connection");
            Client {
                stream,
                sent: 0,
                reply: Vec::with_capacity(512),
            }
        })
        .collect();
    // A request goes out whole in one non-blocking write: the socket's buffer holds
    // at most one request and one answer of this connection's at any time, far
    // below its size (a short write would fail the run, not slow it).
    let send = |conn: &mut Client, c: usize| {
        let line = send_line(c, conn.sent);
        (&conn.stream)
            .write_all(line.as_bytes())
            .expect("write a request");
        conn.sent += 1;
    };
    let (mut refused, mut running) = (0, clients);
    let mut events = Events::with_capacity(clients);
    let mut buf = [0u8; 4096];
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    // When a connection's next send is due (None: at once).
    let due =
        |sent: usize| rate.map(|r| t0 + Duration::from_secs_f64(sent as f64 * clients as f64 / r));
    // Connections whose next send waits for its time.
    let mut waiting: Vec<usize> = Vec::new();
    for (c, conn) in conns.iter_mut().enumerate() {
        send(conn, c);
    }
    while running > 0 {
        let timeout = waiting
            .iter()
            .filter_map(|&c| due(conns[c].sent))
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()));
        poll.poll(&mut events, timeout).expect("epoll_wait");
        let now = Instant::now();
        waiting.retain(|&c| {
            if due(conns[c].sent).is_some_and(|at| at > now) {
                return true;
            }
            send(&mut conns[c], c);
            false
        });
        for event in &events {
            let c = event.token().0;
            let conn = &mut conns[c];
            // Edge-triggered: read until the answer's line is complete (it comes in
            // one write) or the socket is drained; the next answer's arrival
            // signals again.
            loop {
                match (&conn.stream).read(&mut buf) {
                    Ok(0) => panic!("agentd closed a connection"),
                    Ok(n) => conn.reply.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => panic!("read an answer: {e}"),
                }
                if conn.reply.last() == Some(&b'\n') {
                    break;
                }
            }
            if conn.reply.last() != Some(&b'\n') {
                continue;
            }
            assert_eq!(
                conn.reply.iter().filter(|&&b| b == b'\n').count(),
                1,
                "one answer per request"
            );
            if conn.reply.windows(11).any(|w| w == b"\"ok\":false") {
                refused += 1;
            }
            conn.reply.clear();
            if conn.sent >= per {
                running -= 1;
            } else if due(conn.sent).is_some_and(|at| at > now) {
                waiting.push(c);
            } else {
                send(conn, c);
            }
        }
    }
    let elapsed = t0.elapsed();
    let cpu = process_cpu() - cpu0;
    let n = (clients * per) as u32;
    (n as f64 / elapsed.as_secs_f64(), cpu / n, refused)
}

/// One fsync'd commit per message on `dir`'s disk: a plain SQLite connection, WAL +
/// synchronous=FULL, one INSERT per transaction (the rows as `bench-store
/// enqueue`'s baseline writes them). Returns commits per second.
fn fsync_baseline(dir: &Path, n: usize) -> f64 {
    std::fs::create_dir_all(dir).expect("the baseline's directory");
    let conn = rusqlite::Connection::open(dir.join("baseline.db")).expect("open");
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .expect("WAL");
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE t (id TEXT PRIMARY KEY, session TEXT, text TEXT, message_id TEXT);
         CREATE UNIQUE INDEX t_m ON t(session, message_id);",
    )
    .expect("the baseline's table");
    let start = Instant::now();
    for i in 0..n {
        let session = format!("chat-{}", i % 100);
        conn.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4)",
            (
                // A UUID's length and shape.
                format!("{i:08x}-0000-7000-8000-{i:012x}"),
                &session,
                format!("message {i} of {session}: please look at the build"),
                format!("evt-{}-{i}", i % 100),
            ),
        )
        .expect("insert");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `clients` threads send `per` requests each to `path` (at most `rate` requests a
/// second in all, if given), while this thread measures `status` round trips to
/// `probe`. Returns the probe's latencies and the clients' rate.
fn busy(
    path: &Path,
    probe: &Path,
    clients: usize,
    per: usize,
    rate: Option<f64>,
) -> (Vec<Duration>, f64, usize) {
    let running = AtomicUsize::new(clients);
    let started = AtomicBool::new(false);
    let refused = AtomicUsize::new(0);
    let mut probe = Conn::connect(probe);
    let t0 = Instant::now();
    let mut samples = Vec::new();
    std::thread::scope(|scope| {
        for c in 0..clients {
            let (running, started, refused) = (&running, &started, &refused);
            scope.spawn(move || {
                let mut conn = Conn::connect(path);
                started.store(true, Ordering::SeqCst);
                let begin = Instant::now();
                for i in 0..per {
                    if let Some(rate) = rate {
                        // This client's share of the rate, on a fixed schedule.
                        let due = begin + Duration::from_secs_f64(i as f64 * clients as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    if conn.round_trip(&send_line(c, i)).contains("\"ok\":false") {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        while running.load(Ordering::SeqCst) > 0 {
            samples.push(probe.timed(probe_line()));
        }
    });
    let rate = (clients * per) as f64 / t0.elapsed().as_secs_f64();
    (samples, rate, refused.into_inner())
}

/// When the paced probe stops: after `n` requests, or once the load says it is done.
enum Until<'a> {
    Count(usize),
    Done(&'a AtomicBool),
}

/// What the paced probe saw: each request's latency (from its actual write to its
/// answer's arrival) and how late each write was against its schedule.
struct Paced {
    latencies: Vec<Duration>,
    late: Vec<Duration>,
}

/// The open-loop probe: on one connection to `path`, one request every `period`,
/// each written at its scheduled time (or at once when this thread was woken past
/// it), whether or not the earlier ones have been answered (a slow answer delays no
/// later request: while one waits, the next ones queue behind it and each counts
/// its own wait). A second thread reads the answers (in order: one line each) and
/// takes each latency from that request's write. After the last request the
/// connection's write side is shut, so the reader ends at the server's EOF, once
/// every answer is in.
fn paced(path: &Path, period: Duration, until: Until) -> Paced {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let mut stream = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
    let reader = stream.try_clone().expect("clone the stream");
    let (sent, written) = std::sync::mpsc::channel::<Instant>();
    std::thread::scope(|scope| {
        let answers = scope.spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut line = String::new();
            let mut latencies = Vec::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).expect("read an answer") == 0 {
                    return latencies;
                }
                let at = Instant::now();
                assert!(!line.contains("\"ok\":false"), "error reply: {line}");
                let t = written.recv().expect("an answer to a request written");
                latencies.push(at - t);
            }
        });
        let mut late = Vec::new();
        let start = Instant::now() + period;
        for k in 0u32.. {
            let done = match until {
                Until::Count(n) => k as usize >= n,
                Until::Done(done) => done.load(Ordering::SeqCst),
            };
            if done {
                break;
            }
            let due = start + period * k;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // The load may have ended during the sleep: no sample without it.
            if let Until::Done(done) = until {
                if done.load(Ordering::SeqCst) {
                    break;
                }
            }
            let t = Instant::now();
            late.push(t - due);
            sent.send(t).expect("the reader waits");
            stream
                .write_all(probe_line().as_bytes())
                .expect("write a request");
        }
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shut the probe's write side");
        Paced {
            latencies: answers.join().expect("the reader"),
            late,
        }
    })
}

/// The paced idle references: `n` requests every `period` to agentd and `n` to
/// the echo server, in four alternating chunks of `n / 4` (a connection each) so
/// that both see the machine of the same minutes.
fn paced_idle(socket: &Path, echo: &Path, period: Duration, n: usize) -> (Paced, Paced) {
    let mut ours = Paced {
        latencies: Vec::new(),
        late: Vec::new(),
    };
    let mut base = Paced {
        latencies: Vec::new(),
        late: Vec::new(),
    };
    for _ in 0..4 {
        for (path, into) in [(socket, &mut ours), (echo, &mut base)] {
            let mut chunk = paced(path, period, Until::Count(n / 4));
            into.latencies.append(&mut chunk.latencies);
            into.late.append(&mut chunk.late);
        }
    }
    (ours, base)
}

/// The load of the rate phase ([`rate_epoll`]: `clients` connections on one thread
/// in `epoll`, `per` sends each, one outstanding per connection) against `path`,
/// at most `rate` sends a second if given, while the paced probe measures `probe`
/// (a connection of its own) until the load is done. Returns the probe's figures
/// and the load's rate and refusals.
fn paced_busy(
    path: &Path,
    probe: &Path,
    clients: usize,
    per: usize,
    rate: Option<f64>,
    period: Duration,
) -> (Paced, f64, usize) {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let out = rate_epoll(path, clients, per, rate);
            done.store(true, Ordering::SeqCst);
            out
        });
        let probed = paced(probe, period, Until::Done(&done));
        let (rate, _, refused) = load.join().expect("the load");
        (probed, rate, refused)
    })
}

/// agentd's pid, from its `ping` answer.
fn agentd_pid(socket: &Path) -> Option<u32> {
    Conn::connect(socket)
        .round_trip("{\"id\":1,\"cmd\":\"ping\"}\n")
        .split("\"pid\":")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A thread's schedstat (nanoseconds on a CPU, nanoseconds waiting in a run queue:
/// woken or preempted, not yet running again, and how many times it ran) and how
/// many times it went to sleep (`voluntary_ctxt_switches`).
fn schedstat(pid: u32, tid: u32) -> Option<[u64; 4]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let sleeps = status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()?;
    Some([fields.next()??, fields.next()??, fields.next()??, sleeps])
}

/// The answering thread's CPU, run-queue wait, runs and sleeps per request between
/// two readings.
fn per_request(before: Option<[u64; 4]>, after: Option<[u64; 4]>, n: usize) -> String {
    match (before, after) {
        (Some(a), Some(b)) if n > 0 => format!(
            "status thread per request: CPU {:.1} us, waiting for a CPU {:.1} us, {:.2} runs, {:.2} sleeps",
            (b[0] - a[0]) as f64 / n as f64 / 1e3,
            (b[1] - a[1]) as f64 / n as f64 / 1e3,
            (b[2] - a[2]) as f64 / n as f64,
            (b[3] - a[3]) as f64 / n as f64
        ),
        _ => "status thread not found".to_string(),
    }
}

/// The paced phase (`--paced MICROS`): see the header.
fn paced_phase(
    socket: &Path,
    clients: usize,
    per: usize,
    period: Duration,
    n_idle: usize,
    against: impl Fn(f64) -> String,
) {
    let echo_path = socket.with_file_name("echo.sock");
    let _ = std::fs::remove_file(&echo_path);
    let echo_server = EchoServer::start(&echo_path);
    let pid = agentd_pid(socket);
    let answerer = pid.map(|pid| (pid, socket_bench::status_thread(pid)));
    let stat = || answerer.and_then(|(pid, tid)| schedstat(pid, tid));

    let s0 = stat();
    let (idle_ours, idle_echo) = paced_idle(socket, &echo_path, period, n_idle);
    let s1 = stat();
    let (busy_ours, rate, refused) = paced_busy(socket, socket, clients, per, None, period);
    let s2 = stat();
    // The baseline: the same load, at agentd's rate, against the echo server.
    let (busy_echo, echo_rate, _) =
        paced_busy(&echo_path, &echo_path, clients, per, Some(rate), period);
    drop(echo_server);
    let _ = std::fs::remove_file(&echo_path);

    let us = period.as_secs_f64() * 1e6;
    println!(
        "agentd end to end, {clients} clients on one epoll thread and a status every {us:.0} us: {rate:8.0} acknowledged (durable) msgs/s{}  ({} of {} accepted)",
        against(rate),
        clients * per - refused,
        clients * per
    );
    let late = |p: &Paced| Percentiles::of(p.late.clone()).0[2].as_secs_f64() * 1e3;
    let (n_idle_ours, n_busy_ours) = (idle_ours.latencies.len(), busy_ours.latencies.len());
    let idle_o = Percentiles::of(idle_ours.latencies.clone());
    let busy_o = Percentiles::of(busy_ours.latencies.clone());
    println!(
        "status latency, idle, paced:              {}  ({n_idle_ours} requests; sent late p99 {:.3} ms)",
        idle_o.show(),
        late(&idle_ours)
    );
    println!(
        "status latency, writer busy, paced:       {}  ({n_busy_ours} requests; sent late p99 {:.3} ms)",
        busy_o.show(),
        late(&busy_ours)
    );
    let ours = busy_o.ratios(&idle_o);
    println!(
        "  busy/idle:                              {}  (the issue asks within 2×)",
        show_ratios(ours)
    );
    println!("  idle: {}", per_request(s0, s1, n_idle_ours));
    println!("  busy: {}", per_request(s1, s2, n_busy_ours));
    println!("baseline: a bare echo server process, the same paced probe and the same load:");
    let idle_e = Percentiles::of(idle_echo.latencies.clone());
    let busy_e = Percentiles::of(busy_echo.latencies.clone());
    println!(
        "echo round trip, idle, paced:             {}  ({} requests)",
        idle_e.show(),
        idle_echo.latencies.len()
    );
    println!(
        "echo round trip, load busy, paced:        {}  ({} requests; load at {echo_rate:.0}/s, as agentd's; sent late p99 {:.3} ms)",
        busy_e.show(),
        busy_echo.latencies.len(),
        late(&busy_echo)
    );
    let echo = busy_e.ratios(&idle_e);
    println!(
        "  busy/idle:                              {}  (the machine's and the load's share)",
        show_ratios(echo)
    );
    let mut own = [0.0; 3];
    for i in 0..3 {
        own[i] = ours[i] / echo[i].max(1e-9);
    }
    println!(
        "agentd's own share (its busy/idle over the echo's): {}",
        show_ratios(own)
    );
}

fn main() {
    if let Some("--serve-echo") = std::env::args().nth(1).as_deref() {
        serve_echo(Path::new(&std::env::args().nth(2).expect("a socket path")));
        return;
    }
    let mut socket = None;
    let (mut clients, mut per, mut n_idle) = (64usize, 200usize, 5000usize);
    let (mut rate_only, mut baseline) = (false, None::<f64>);
    let mut paced_us = None::<u64>;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match arg.as_str() {
            "--socket" => socket = Some(PathBuf::from(value())),
            "--clients" => clients = value().parse().expect("a number"),
            "--per" => per = value().parse().expect("a number"),
            "--idle" => n_idle = value().parse().expect("a number"),
            "--rate-only" => rate_only = true,
            "--paced" => paced_us = Some(value().parse().expect("microseconds")),
            "--baseline" => baseline = Some(value().parse().expect("a number")),
            "--fsync-baseline" => {
                let rate = fsync_baseline(Path::new(&value()), 2000);
                println!("baseline: one fsync'd commit per message (plain SQLite, WAL+FULL, this disk): {rate:8.0} commits/s");
                return;
            }
            "--probe" => {
                let cmd = value();
                PROBE
                    .set(format!("{{\"id\":1,\"cmd\":\"{cmd}\"}}\n"))
                    .expect("one --probe");
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let socket = socket.expect("--socket PATH");
    let against = |rate: f64| match baseline {
        Some(base) => format!(
            "  {:5.2}× the fsync'd-commit baseline (target 10×)",
            rate / base
        ),
        None => String::new(),
    };
    if let Some(us) = paced_us {
        paced_phase(
            &socket,
            clients,
            per,
            Duration::from_micros(us),
            n_idle,
            against,
        );
        return;
    }
    if rate_only {
        let (rate, client_cpu, refused) = rate_epoll(&socket, clients, per, None);
        println!(
            "agentd end to end, {clients} clients on one epoll thread, no probe: {rate:8.0} acknowledged (durable) msgs/s{}  ({} of {} accepted)",
            against(rate),
            clients * per - refused,
            clients * per
        );
        println!(
            "  the client's own CPU per message: {:.1} us",
            client_cpu.as_secs_f64() * 1e6
        );
        return;
    }
    let echo_path = socket.with_file_name("echo.sock");
    let _ = std::fs::remove_file(&echo_path);
    let echo_server = EchoServer::start(&echo_path);

    let answerer = agentd_pid(&socket).map(|pid| (pid, socket_bench::status_thread(pid)));
    let stat = || answerer.and_then(|(pid, tid)| schedstat(pid, tid));
    let s0 = stat();
    let (idle_ours, idle_echo) = idle(&socket, &echo_path, n_idle);
    let s1 = stat();
    let (busy_ours, rate, refused) = busy(&socket, &socket, clients, per, None);
    let s2 = stat();
    let n_busy = busy_ours.len();
    let busy_ours = Percentiles::of(busy_ours);
    // The baseline: the same clients, at agentd's rate, against the echo server.
    let (busy_echo, echo_rate, _) = busy(&echo_path, &echo_path, clients, per, Some(rate));
    let n_echo = busy_echo.len();
    let busy_echo = Percentiles::of(busy_echo);

    println!(
        "agentd end to end, {clients} client threads and a status probe: {rate:8.0} acknowledged (durable) msgs/s{}  ({} of {} accepted)",
        against(rate),
        clients * per - refused,
        clients * per
    );
    println!(
        "status latency, idle:                     {}  ({n_idle} requests)",
        idle_ours.show()
    );
    println!(
        "status latency, writer busy:              {}  ({n_busy} requests, {clients} clients sending)",
        busy_ours.show()
    );
    let ours = busy_ours.ratios(&idle_ours);
    println!(
        "  busy/idle:                              {}  (the issue asks within 2×)",
        show_ratios(ours)
    );
    println!("  idle: {}", per_request(s0, s1, n_idle + n_idle / 10));
    println!("  busy: {}", per_request(s1, s2, n_busy));
    println!("baseline: a bare echo server process, the same probe and the same clients:");
    println!(
        "echo round trip, idle:                    {}",
        idle_echo.show()
    );
    println!(
        "echo round trip, clients busy:            {}  ({n_echo} requests; clients at {echo_rate:.0}/s, as agentd's)",
        busy_echo.show()
    );
    let echo = busy_echo.ratios(&idle_echo);
    println!(
        "  busy/idle:                              {}  (the machine's and the clients' share)",
        show_ratios(echo)
    );
    let mut own = [0.0; 3];
    for i in 0..3 {
        own[i] = ours[i] / echo[i].max(1e-9);
    }
    println!(
        "agentd's own share (its busy/idle over the echo's): {}",
        show_ratios(own)
    );
    drop(echo_server);
    let _ = std::fs::remove_file(&echo_path);
}
