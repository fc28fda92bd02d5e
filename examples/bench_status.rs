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
//! Usage: bench_status --socket PATH [--clients 64] [--per 200] [--idle 5000]
//!        [--probe status|ping]

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
                    let request = format!(
                        "{{\"id\":{i},\"cmd\":\"send\",\"session\":\"chat-{c}-{}\",\"text\":\"while [ ! -e /nonexistent-gate ]; do sleep 1; done # {i}\",\"message_id\":\"m-{c}-{i}\"}}\n",
                        i % 10
                    );
                    if conn.round_trip(&request).contains("\"ok\":false") {
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

fn main() {
    if let Some("--serve-echo") = std::env::args().nth(1).as_deref() {
        serve_echo(Path::new(&std::env::args().nth(2).expect("a socket path")));
        return;
    }
    let mut socket = None;
    let (mut clients, mut per, mut n_idle) = (64usize, 200usize, 5000usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match arg.as_str() {
            "--socket" => socket = Some(PathBuf::from(value())),
            "--clients" => clients = value().parse().expect("a number"),
            "--per" => per = value().parse().expect("a number"),
            "--idle" => n_idle = value().parse().expect("a number"),
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
    let echo_path = socket.with_file_name("echo.sock");
    let _ = std::fs::remove_file(&echo_path);
    let echo_server = EchoServer::start(&echo_path);

    let (idle_ours, idle_echo) = idle(&socket, &echo_path, n_idle);
    let (busy_ours, rate, refused) = busy(&socket, &socket, clients, per, None);
    let n_busy = busy_ours.len();
    let busy_ours = Percentiles::of(busy_ours);
    // The baseline: the same clients, at agentd's rate, against the echo server.
    let (busy_echo, echo_rate, _) = busy(&echo_path, &echo_path, clients, per, Some(rate));
    let n_echo = busy_echo.len();
    let busy_echo = Percentiles::of(busy_echo);

    println!(
        "agentd end to end, {clients} clients over the socket: {rate:8.0} acknowledged (durable) msgs/s ({} of {} accepted)",
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
