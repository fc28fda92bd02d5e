//! Enqueue benchmark driver (run by `scripts/bench-enqueue.sh`, not by the tests).
//!
//! Against a running agentd whose agents never finish, it measures, in one run:
//! - baselines: this machine's Unix-socket round trip (a line echoed by an echo
//!   server process, p50, measured alternating one by one with each latency so that
//!   both see the same load) and the rate of the same echo with as many clients as the bulk
//!   enqueue uses;
//! - `ping` and `status` p50 against the empty queue;
//! - bulk enqueue: N clients, each on its own connection, sending `send` requests
//!   back to back, messages spread round-robin over S sessions; the rate over the
//!   whole run, over the first tenth (queue nearly empty) and over the last tenth
//!   (queue nearly full);
//! - `status` p50 with every message queued;
//! - both `status` p50s also placement-matched (see [`matched`]), and at 100k queued
//!   with agentd and the echo server pinned alike (see [`placed`]);
//!
//! and prints every figure with its ratio to the baselines. It asserts nothing.
//!
//! Usage: bench_enqueue --socket PATH [--clients 64] [--messages 100000]
//!        [--sessions 10000] [--text 'sleep 600'] [--in-process-only]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/socket_bench.rs"]
mod socket_bench;
use socket_bench::{pin, serve_echo, serve_echo_epoll, Conn, EchoServer};

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `n` round trips of `request` to agentd and `n` of the same line to the echo
/// server, alternating one by one, so that each pair sees the same load and the same
/// placement on the CPUs: on a small VM a round trip is bimodal (about 9 µs when
/// client and server share a CPU, 25–35 µs across CPUs), and blocks of requests
/// could land in different modes, which made the ratio swing from 0.5× to 4×. The
/// p50 of each.
fn latency(socket: &Path, echo: &Path, request: &str, n: usize) -> Latency {
    let mut conn = Conn::connect(socket);
    let mut echo = Conn::connect(echo);
    for _ in 0..n / 10 {
        conn.round_trip(request);
        echo.round_trip(request);
    }
    let (mut ours, mut base) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        echo.round_trip(request);
        base.push(t.elapsed());
        let t = Instant::now();
        let reply = conn.round_trip(request);
        ours.push(t.elapsed());
        assert!(!reply.contains("\"ok\":false"), "error reply: {reply}");
    }
    Latency {
        ours: p50(ours),
        rtt: p50(base),
    }
}

struct Latency {
    ours: Duration,
    rtt: Duration,
}

/// The CPU time per request of process `pid` over `n` round trips of `request`
/// (load-independent, unlike a latency on a shared machine, but not independent of
/// where the server runs: on this 2-vCPU VM a `status` answered on the client's CPU
/// cost agentd about half the CPU time of one answered on the other, idle vCPU, e.g.
/// 12 against 23.5 µs), and the share of every 100th reply after which the server's
/// main thread (agentd's loop) had last run on the client's CPU.
fn cpu_per_request(
    socket: &Path,
    pid: Option<u32>,
    request: &str,
    n: usize,
) -> Option<(Duration, f64)> {
    let pid = pid?;
    let mut conn = Conn::connect(socket);
    let (mut checks, mut shared) = (0, 0);
    let answerer = socket_bench::status_thread(pid);
    let before = cpu_time(pid)?;
    for i in 0..n {
        conn.round_trip(request);
        if i % 100 == 0 {
            // SAFETY: sched_getcpu has no preconditions.
            let here = unsafe { libc::sched_getcpu() };
            checks += 1;
            shared += usize::from(last_cpu(pid, answerer).map(|c| c as i32) == Some(here));
        }
    }
    let after = cpu_time(pid)?;
    Some((
        after.saturating_sub(before) / n as u32,
        shared as f64 / checks as f64,
    ))
}

/// `status` against the echo with both servers placed alike: the round trip on an
/// idle 2-core machine is bimodal (about 12 µs when the kernel runs the server on
/// the client's CPU, 40–60 µs when it wakes it on the other, idle one), and which
/// mode a process gets is the scheduler's choice (see [`matched`]). Pinning agentd and
/// the echo server to the same CPUs compares like with like: first both on the
/// client's CPU, then both on the other CPU. Also agentd's CPU per `status` beside the
/// echo server's CPU per line, from the same client, both unpinned again.
fn placed(socket: &Path, echo: &EchoServer, agentd: Option<u32>, probe: &str, n: usize) {
    let Some(agentd) = agentd else { return };
    let cpus: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let echo_path = socket.with_file_name("echo.sock");
    let mut placements = vec![("on the client's CPU", 0)];
    if cpus.len() > 1 {
        placements.push(("on the other CPU", 1));
    }
    for (label, server_cpu) in placements {
        if !(pin(None, &[0])
            && pin(Some(agentd), &[server_cpu])
            && pin(Some(echo.pid()), &[server_cpu]))
        {
            println!("  (cannot pin processes to CPUs: placed figures skipped)");
            break;
        }
        let l = latency(socket, &echo_path, probe, 5_000);
        report(
            &format!("  status p50, {n} queued, both servers {label}"),
            &l,
            "  (target ≤ 2)",
        );
    }
    let _ = pin(None, &cpus) && pin(Some(agentd), &cpus) && pin(Some(echo.pid()), &cpus);
    if let (Some((ours, shared)), Some((base, _))) = (
        cpu_per_request(socket, Some(agentd), probe, 20_000),
        cpu_per_request(&echo_path, Some(echo.pid()), probe, 20_000),
    ) {
        println!(
            "  CPU per request, unpinned: agentd status {:.1} µs (loop on the client's CPU {:.0}%), echo line {:.1} µs ({:.2}× the echo)",
            micros(ours),
            shared * 100.0,
            micros(base),
            micros(ours) / micros(base).max(0.001)
        );
    }
}

/// The CPU thread `tid` of process `pid` last ran on (field 39 of its `stat`).
fn last_cpu(pid: u32, tid: u32) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // Field 39, the 37th after the command name (which may hold spaces).
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(36)?
        .parse()
        .ok()
}

/// `status` with agentd left where the scheduler puts it and the echo server put
/// where agentd's loop thread is: the client (this thread) on CPU 0; after each of
/// agentd's replies, the CPU the thread that answered it last ran on (its
/// connections' thread, or the main thread of a build without one: `status_thread`)
/// is read, and the echo server is pinned to that
/// CPU (when it changed) before the echo's round trip that follows. Each echo sample
/// is thus taken with the echo server on the same CPU, relative to the client, as
/// agentd's loop in the sample before it, so the ratio compares like with like
/// without moving agentd. The unpinned ratio above it also measures where the kernel
/// put the two servers one client alternates between: on this 2-vCPU VM it mostly
/// keeps one of them on the client's CPU and wakes the other on the other vCPU, and
/// the one that costs more CPU per request is mostly the one sent across (two identical
/// echo servers split either way; one spinning 15 µs per line lost to a plain one in
/// 8 of 10 runs; an echo spinning 30 µs per line sent agentd to the client's CPU), so
/// agentd's larger CPU per `status` than the echo's per line turned into a 3–4.6×
/// latency ratio. Also how many of agentd's samples had its loop on the client's CPU,
/// and both servers' p50 by that placement.
fn matched(
    socket: &Path,
    echo: &EchoServer,
    agentd: u32,
    request: &str,
    n: usize,
) -> Option<Matched> {
    let cpus: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    if cpus.len() < 2 || !pin(None, &[0]) {
        return None;
    }
    let echo_path = socket.with_file_name("echo.sock");
    let answerer = socket_bench::status_thread(agentd);
    let mut conn = Conn::connect(socket);
    let mut echo_conn = Conn::connect(&echo_path);
    for _ in 0..n / 10 {
        conn.round_trip(request);
        echo_conn.round_trip(request);
    }
    let mut echo_cpu = None;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let reply = conn.round_trip(request);
        let ours = t.elapsed();
        assert!(!reply.contains("\"ok\":false"), "error reply: {reply}");
        let Some(cpu) = last_cpu(agentd, answerer) else {
            break;
        };
        if echo_cpu != Some(cpu) {
            if !pin(Some(echo.pid()), &[cpu]) {
                break;
            }
            echo_cpu = Some(cpu);
        }
        let t = Instant::now();
        echo_conn.round_trip(request);
        samples.push((ours, t.elapsed(), cpu == 0));
    }
    let _ = pin(Some(echo.pid()), &cpus) && pin(None, &cpus);
    if samples.len() < n {
        return None;
    }
    // The p50s of agentd's and the echo's samples with agentd's loop where `keep` says.
    let latency_of = |keep: &dyn Fn(bool) -> bool| {
        let (ours, echo): (Vec<Duration>, Vec<Duration>) = samples
            .iter()
            .filter(|s| keep(s.2))
            .map(|s| (s.0, s.1))
            .unzip();
        (!ours.is_empty()).then(|| Latency {
            ours: p50(ours),
            rtt: p50(echo),
        })
    };
    Some(Matched {
        all: latency_of(&|_| true)?,
        shared: samples.iter().filter(|s| s.2).count(),
        n,
        by_place: [true, false].map(|shared| latency_of(&|s| s == shared)),
    })
}

struct Matched {
    all: Latency,
    /// How many of the `n` samples had agentd's loop on the client's CPU.
    shared: usize,
    n: usize,
    /// The p50s of the samples with agentd's loop on the client's CPU, then the rest.
    by_place: [Option<Latency>; 2],
}

/// Prints [`matched`]'s figures.
fn report_matched(what: &str, m: Option<Matched>) {
    let Some(m) = m else {
        println!(
            "  (cannot pin the client and the echo server: placement-matched figures skipped)"
        );
        return;
    };
    report(
        &format!("  {what}, placement-matched"),
        &m.all,
        "  (target ≤ 2; client on CPU 0, agentd unpinned, the echo on its loop's CPU)",
    );
    let place = |l: &Option<Latency>| match l {
        Some(l) => format!(
            "{:.1} vs {:.1} µs ({:.2}×)",
            micros(l.ours),
            micros(l.rtt),
            micros(l.ours) / micros(l.rtt)
        ),
        None => "no samples".to_string(),
    };
    println!(
        "    agentd's loop on the client's CPU in {} of {} samples: there {}; on the other CPU {}",
        m.shared,
        m.n,
        place(&m.by_place[0]),
        place(&m.by_place[1])
    );
}

/// Prints one latency line with its ratio to the round trip measured beside it.
fn report(what: &str, &Latency { ours, rtt }: &Latency, note: &str) {
    println!(
        "{what:<44}{:8.1} µs  {:5.2}× the round trip ({:.1} µs){note}",
        micros(ours),
        micros(ours) / micros(rtt),
        micros(rtt)
    );
}

/// `clients` connections sharing `n` round trips of `request(i)`; returns the
/// completion instant of every request, sorted, and the number of error replies.
fn flood(
    path: &Path,
    clients: usize,
    n: usize,
    request: impl Fn(usize) -> String + Sync,
) -> (Vec<Instant>, usize) {
    let request = &request;
    let results: Vec<(Vec<Instant>, usize, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                scope.spawn(move || {
                    let mut conn = Conn::connect(path);
                    let mut done = Vec::with_capacity(n / clients + 1);
                    let (mut errors, mut first_error) = (0, None);
                    for i in (c..n).step_by(clients) {
                        let reply = conn.round_trip(&request(i));
                        if reply.contains("\"ok\":false") || reply.is_empty() {
                            errors += 1;
                            first_error.get_or_insert_with(|| reply.trim().to_string());
                        }
                        done.push(Instant::now());
                    }
                    (done, errors, first_error)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let mut all = Vec::with_capacity(n);
    let mut errors = 0;
    for (done, e, first) in results {
        all.extend(done);
        errors += e;
        if let Some(first) = first {
            eprintln!("first error reply: {first}");
        }
    }
    all.sort();
    (all, errors)
}

/// Requests per second between the `from`-th and the `to`-th completion (from the
/// first completion on, so connecting the clients does not count).
fn rate(done: &[Instant], from: usize, to: usize) -> f64 {
    let from = from.max(1);
    (to - from) as f64 / (done[to - 1] - done[from - 1]).as_secs_f64()
}

/// The dispatcher alone, in this process: `messages` accepted over `sessions` with
/// two slots held, then what `status` and a send's reply read from it.
fn in_process(messages: usize, sessions: usize, text: &str) {
    use agentd_core::{Config, Dispatcher, Message, Millis, TaskId};
    // As scripts/bench-enqueue.sh configures agentd.
    let mut d = Dispatcher::new(Config {
        max_queued: (messages * 2) as u32,
        queue: agentd_core::QueueSettings {
            cap: (messages * 2) as u32,
            ..agentd_core::QueueSettings::default()
        },
        ..Config::default()
    });
    let now = Millis(1);
    let mut ids = Vec::with_capacity(messages);
    let mut done = Vec::with_capacity(messages);
    for i in 0..messages {
        let task_id = TaskId::from_u128(i as u128 + 1);
        let msg = Message::new(task_id, format!("s{}", i % sessions), text);
        let (outcome, _actions) = d.accept(msg, now);
        assert!(outcome.is_ok());
        std::hint::black_box(d.position(&task_id));
        ids.push(task_id);
        done.push(Instant::now());
    }
    let tenth = messages / 10;
    println!(
        "in-process accept + position: first tenth {:10.0} msgs/s, last tenth {:10.0} msgs/s  {:5.2}× the first",
        rate(&done, 0, tenth),
        rate(&done, messages - tenth, messages),
        rate(&done, messages - tenth, messages) / rate(&done, 0, tenth)
    );
    let samples = (0..20_000)
        .map(|i| {
            let t = Instant::now();
            let active: Vec<_> = d.active_tasks().map(|t| t.id).collect();
            std::hint::black_box((d.capacity(), d.n_queued(), d.n_sessions(), active));
            std::hint::black_box(d.position(&ids[(i * 7919) % ids.len()]));
            t.elapsed()
        })
        .collect();
    println!(
        "in-process status + one position, {} queued:  {:8.3} µs p50",
        d.n_queued(),
        micros(p50(samples))
    );
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("--serve-echo") => {
            serve_echo(Path::new(&std::env::args().nth(2).expect("a socket path")));
            return;
        }
        Some("--serve-echo-epoll") => {
            serve_echo_epoll(Path::new(&std::env::args().nth(2).expect("a socket path")));
            return;
        }
        _ => {}
    }
    let mut socket = None;
    let (mut clients, mut messages, mut sessions) = (64usize, 100_000usize, 10_000usize);
    let mut text = "sleep 600".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match arg.as_str() {
            "--socket" => socket = Some(PathBuf::from(value())),
            "--clients" => clients = value().parse().expect("a number"),
            "--messages" => messages = value().parse().expect("a number"),
            "--sessions" => sessions = value().parse().expect("a number"),
            "--text" => text = value(),
            "--in-process-only" => {
                in_process(messages, sessions, &text);
                return;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let socket = socket.expect("--socket PATH");
    let echo_path = socket.with_file_name("echo.sock");
    let _ = std::fs::remove_file(&echo_path);
    let echo_server = EchoServer::start(&echo_path);

    // Baselines: the socket round trip is measured beside every latency below.
    let probe = "{\"id\":1,\"cmd\":\"status\"}\n";
    let (done, _) = flood(&echo_path, clients, messages, |i| {
        format!(
            "{{\"id\":{i},\"cmd\":\"send\",\"session\":\"s{}\",\"text\":{text:?}}}\n",
            i % sessions
        )
    });
    let echo_rate = rate(&done, 0, done.len());
    println!("baseline: {clients}-client echo over unix sockets    {echo_rate:10.0} lines/s");
    println!("baseline: unix-socket round trip p50, measured beside each line below");
    let ping = latency(&socket, &echo_path, "{\"id\":1,\"cmd\":\"ping\"}\n", 5_000);
    let agentd_pid = Conn::connect(&socket)
        .round_trip("{\"id\":1,\"cmd\":\"ping\"}\n")
        .split("\"pid\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse::<u32>().ok());
    report("agentd ping p50 (answered by the connection)", &ping, "");
    let status_empty = latency(&socket, &echo_path, probe, 5_000);
    report(
        "agentd status p50, empty queue, unpinned",
        &status_empty,
        "",
    );
    if let Some(pid) = agentd_pid {
        report_matched(
            "status p50, empty queue",
            matched(&socket, &echo_server, pid, probe, 5_000),
        );
    }
    let status_cpu_empty = cpu_per_request(&socket, agentd_pid, probe, 20_000);

    // Bulk enqueue.
    let cpu_before = agentd_pid.and_then(cpu_time);
    let (done, errors) = flood(&socket, clients, messages, |i| {
        format!(
            "{{\"id\":{i},\"cmd\":\"send\",\"session\":\"s{}\",\"text\":{text:?}}}\n",
            i % sessions
        )
    });
    let n = done.len();
    let cpu = agentd_pid
        .and_then(cpu_time)
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let tenth = n / 10;
    let overall = rate(&done, 0, n);
    let first = rate(&done, 0, tenth);
    let last = rate(&done, n - tenth, n);
    println!(
        "bulk enqueue: {clients} clients, {messages} messages over {sessions} sessions, {errors} refused"
    );
    println!(
        "  overall                                   {overall:10.0} msgs/s  {:5.2}× target 20,000  {:5.3}× the echo",
        overall / 20_000.0,
        overall / echo_rate
    );
    if let Some(cpu) = cpu {
        println!(
            "  agentd CPU per message (load-independent)  {:8.1} µs",
            micros(cpu) / n as f64
        );
    }
    println!("  first tenth (queue 0 → {tenth:>6})          {first:10.0} msgs/s");
    println!(
        "  last tenth  (queue {:>6} → {n:>6})     {last:10.0} msgs/s  {:5.2}× the first tenth (target ≥ 0.5)",
        n - tenth,
        last / first
    );

    let status_full = latency(&socket, &echo_path, probe, 5_000);
    report(
        &format!("agentd status p50, {n} queued, unpinned"),
        &status_full,
        &format!(
            "  (target ≤ 2 placement-matched, below); {:.2}× empty, {:.2}× ping",
            micros(status_full.ours) / micros(status_empty.ours),
            micros(status_full.ours) / micros(ping.ours)
        ),
    );
    if let Some(pid) = agentd_pid {
        report_matched(
            &format!("status p50, {n} queued"),
            matched(&socket, &echo_server, pid, probe, 5_000),
        );
    }
    // The same against an echo server that waits in epoll, as agentd does (unpinned
    // too): the blocking echo above is woken on the client's CPU more readily.
    let epoll_path = socket.with_file_name("echo-epoll.sock");
    let _ = std::fs::remove_file(&epoll_path);
    let epoll_echo = EchoServer::start_epoll(&epoll_path);
    let status_full_epoll = latency(&socket, &epoll_path, probe, 5_000);
    report(
        "  unpinned, against an epoll echo server",
        &status_full_epoll,
        "",
    );
    drop(epoll_echo);
    let _ = std::fs::remove_file(&epoll_path);
    let status_cpu_full = cpu_per_request(&socket, agentd_pid, probe, 20_000);
    if let (Some((empty, shared_empty)), Some((full, shared_full))) =
        (status_cpu_empty, status_cpu_full)
    {
        println!(
            "agentd CPU per status: empty {:.1} µs, {n} queued {:.1} µs ({:.2}×; load-independent); loop on the client's CPU {:.0}% / {:.0}%",
            micros(empty),
            micros(full),
            micros(full) / micros(empty).max(0.001),
            shared_empty * 100.0,
            shared_full * 100.0
        );
    }
    placed(&socket, &echo_server, agentd_pid, probe, n);
    let reply = Conn::connect(&socket).round_trip(probe).to_string();
    let queued = reply
        .split("\"queued\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap_or("?")
        .to_string();
    println!("agentd says {queued} tasks are queued");
    in_process(messages, sessions, &text);
    drop(echo_server);
    let _ = std::fs::remove_file(&echo_path);
}
