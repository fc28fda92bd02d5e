//! Bounds of the control plane: slow and stopped clients, connection floods,
//! slowloris request lines, long listings, SIGHUP, and a removed socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{kill, rss_kib, wait_for, Daemon, AGENTCTL, DEADLINE};

/// The test process holds many sockets at once: lift its soft descriptor limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
}

/// Reads one response line from `stream` (with a read timeout); `None` once agentd
/// closed the connection.
fn read_line(stream: &UnixStream, timeout: Duration) -> Option<Value> {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(0) => None,
        // Closed with input of ours unread (a slowloris client's last bytes): after
        // the lines written before the close, the kernel says "reset", not EOF.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && line.is_empty() => None,
        Ok(_) => {
            Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}")))
        }
        Err(e) => panic!("no line within {timeout:?}: {e}"),
    }
}

/// Opens `n` connections that each answer a ping, retrying while connections the
/// test closed just before are still being released by agentd.
fn fill_to_cap(daemon: &Daemon, n: usize) -> Vec<UnixStream> {
    wait_for(&format!("{n} connections are admitted"), DEADLINE, || {
        let mut open = Vec::new();
        for _ in 0..n {
            let mut s = UnixStream::connect(&daemon.socket).ok()?;
            writeln!(s, r#"{{"id":9,"cmd":"ping"}}"#).ok()?;
            let answer = read_line(&s, Duration::from_secs(30))?;
            if answer["ok"] != json!(true) {
                return None;
            }
            open.push(s);
        }
        Some(open)
    })
}

/// The number the flood task printed last, from its progress.
fn flood_count(daemon: &Daemon, task: &str) -> u64 {
    daemon.task(task)["progress"]
        .as_str()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0)
}

/// How many progress lines must flow past a stopped watcher: each event line carries
/// the task's view (about 500 bytes), so this is well over 64 MB of output that an
/// unbounded connection would have kept.
const FLOOD_LINES: u64 = 150_000;

#[test]
fn a_stopped_watcher_does_not_grow_the_daemon_and_is_dropped_with_a_notice() {
    let daemon = Daemon::with_agent_exec(&[]);
    let task = daemon.submit("flood", "seq 1 1000000000");
    daemon.wait_state(&task, "running");
    let mut watcher = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["watch", &task])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agentctl watch");
    let mut out = BufReader::new(watcher.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).expect("first watch line");
    kill(watcher.id(), libc::SIGSTOP);
    let start = flood_count(&daemon, &task);
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        peak = peak.max(rss_kib(daemon.pid()));
        assert!(
            peak < 64 * 1024,
            "agentd grew to {peak} KiB behind a stopped watcher"
        );
        // The control plane keeps answering meanwhile.
        let status = daemon.agentctl(&["--json", "status"]);
        assert!(status.status.success(), "status failed during the flood");
        let flowed = flood_count(&daemon, &task).saturating_sub(start);
        // Coalesced progress keeps the stopped watcher's output small, so it is ended
        // by the stall limit (5 s without reading), which a fast flood may outrun:
        // both the volume and the drop must have happened.
        if flowed >= FLOOD_LINES && daemon.log().contains("fell behind its client") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {flowed} progress lines flowed in time, or the stopped watcher was not ended: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        daemon.log().is_empty() || !daemon.log().contains("panicked"),
        "{}",
        daemon.log()
    );
    // Resumed, the watcher reads what was queued for it, then the notice, and exits.
    kill(watcher.id(), libc::SIGCONT);
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = out.read_to_end(&mut rest);
        rest.len()
    });
    let status = wait_for("the dropped watcher exits", DEADLINE, || {
        watcher.try_wait().expect("try_wait")
    });
    let mut stderr = String::new();
    watcher
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let rest = reader.join().unwrap();
    assert!(!status.success(), "watcher exited {status}");
    assert!(
        stderr.contains("fell") && stderr.contains("behind"),
        "no lagged notice: {stderr:?}"
    );
    // What was queued for it is bounded by the connection's output budget (plus
    // what the kernel's socket buffers hold).
    assert!(
        rest < 8 << 20,
        "the watcher got {rest} bytes after resuming"
    );
    let _ = daemon.request(json!({"cmd": "stop", "task_id": task}));
}

#[test]
fn a_slow_watcher_gets_coalesced_progress_with_a_count_and_stays() {
    let daemon = Daemon::with_agent_exec(&[]);
    let task = daemon.submit("flood", "seq 1 300000; sleep 0.5");
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    writeln!(stream, r#"{{"id":1,"cmd":"watch","task_id":"{task}"}}"#).unwrap();
    // Read slowly at first: let output pile up behind this client.
    std::thread::sleep(Duration::from_millis(300));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut skipped = 0u64;
    let mut last = 0u64;
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "watch ended early"
        );
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["ok"], json!(true), "watch failed: {value}");
        let Some(event) = value.get("event") else {
            continue;
        };
        if event["kind"] == "progress" {
            let n: u64 = event["text"].as_str().unwrap().parse().unwrap();
            assert!(n > last, "progress went backwards: {n} after {last}");
            skipped += value["skipped"].as_u64().unwrap_or(0);
            last = n;
            // A slow reader.
            std::thread::sleep(Duration::from_micros(200));
        }
        if event["kind"] == "finished" {
            break;
        }
    }
    assert_eq!(last, 300_000, "the latest progress line always arrives");
    assert!(skipped > 0, "nothing was coalesced");
}

#[test]
fn idle_connections_and_slowloris_clients_are_bounded() {
    raise_fd_limit();
    let daemon = Daemon::with_echo_agent(&["--max-connections", "1100", "--request-timeout", "1s"]);
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&daemon.socket).expect("idle connection"))
        .collect();
    // 50 clients that begin a request line and never finish it, at one byte per 100 ms.
    let mut slow: Vec<UnixStream> = (0..50)
        .map(|_| {
            let mut s = UnixStream::connect(&daemon.socket).unwrap();
            s.write_all(br#"{"id": 1, "cmd": "ping""#).unwrap();
            s
        })
        .collect();
    let began = Instant::now();
    let mut closed = vec![false; slow.len()];
    while closed.iter().any(|c| !c) {
        for (s, closed) in slow.iter_mut().zip(closed.iter_mut()) {
            if !*closed && s.write_all(b" ").is_err() {
                *closed = true;
            }
        }
        // The control plane answers meanwhile.
        let out = daemon.agentctl(&["--json", "status"]);
        assert!(out.status.success(), "status failed: {out:?}");
        assert!(
            began.elapsed() < DEADLINE,
            "slowloris connections still open after {:?}",
            began.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(began.elapsed() >= Duration::from_millis(900));
    for s in &slow {
        let answer = read_line(s, Duration::from_secs(30)).expect("a last word");
        assert_eq!(answer["error"]["code"], "request_timeout", "{answer}");
        assert_eq!(read_line(s, Duration::from_secs(30)), None);
    }
    drop(slow);
    // Fill up to the cap with more connections, then one more is refused.
    let more = fill_to_cap(&daemon, 100);
    let refused = UnixStream::connect(&daemon.socket).unwrap();
    let answer = read_line(&refused, Duration::from_secs(30)).expect("a refusal");
    assert_eq!(answer["ok"], json!(false));
    assert_eq!(answer["error"]["code"], "too_many_connections", "{answer}");
    assert_eq!(read_line(&refused, Duration::from_secs(30)), None);
    // agentctl says so too, clearly.
    let out = daemon.agentctl(&["status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("maximum of 1100 connections"),
        "{out:?}"
    );
    // The idle connections still work.
    let mut first = &idle[0];
    writeln!(first, r#"{{"id":4,"cmd":"ping"}}"#).unwrap();
    assert_eq!(
        read_line(&idle[0], Duration::from_secs(30)).unwrap()["ok"],
        json!(true)
    );
    drop(more);
    wait_for("a closed connection frees its place", DEADLINE, || {
        daemon.agentctl(&["status"]).status.success().then_some(())
    });
}

#[test]
fn pipelined_requests_beyond_the_in_flight_cap_are_all_answered() {
    let daemon = Daemon::with_echo_agent(&[]);
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    let mut batch = String::new();
    for id in 0..500 {
        batch.push_str(&format!("{{\"id\":{id},\"cmd\":\"status\"}}\n"));
    }
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || stream.write_all(batch.as_bytes()).unwrap())
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(&mut stream);
    let mut seen = vec![false; 500];
    for _ in 0..500 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["ok"], json!(true), "{value}");
        seen[value["id"].as_u64().unwrap() as usize] = true;
    }
    writer.join().unwrap();
    assert!(seen.iter().all(|s| *s));
}

/// A client that pipelines `status` lines (answered on the fast lane, without the
/// loop) and reads none of the answers is not read further once its answers fill
/// the socket: agentd neither reads on nor piles the answers up in memory.
#[test]
fn a_client_pipelining_statuses_without_reading_is_not_read_further() {
    const LINE: &[u8] = b"{\"id\":1,\"cmd\":\"status\"}\n";
    const LIMIT: usize = 8 << 20;
    let daemon = Daemon::with_echo_agent(&[]);
    let rss_before = rss_kib(daemon.pid());
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // One endless run of lines, written in pieces that mostly end inside a line, so
    // that what agentd has read ends inside one too.
    let lines = LINE.repeat(3000);
    let mut sent = 0;
    let blocked = loop {
        if sent >= LIMIT {
            break false;
        }
        let at = sent % LINE.len();
        match stream.write(&lines[at..at + 65_537]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
            Err(e) => panic!("write: {e}"),
        }
    };
    let rss_after = rss_kib(daemon.pid());
    assert!(
        blocked,
        "agentd read {sent} bytes of statuses whose answers nobody read (RSS {rss_before} -> {rss_after} KiB)"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS {rss_before} -> {rss_after} KiB after {sent} bytes of unread statuses"
    );
    // The answers are there, in order, once the client reads.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(&stream);
    for _ in 0..100 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["ok"], json!(true), "{value}");
    }
}

/// Statuses answered on the fast lane just before a shutdown reach their client in
/// full, though it reads them only once agentd has stopped accepting connections:
/// at exit the fast lane's connections, like the loop's, write what they owe (for up
/// to a second) before they close, rather than being cut inside an answer.
#[test]
fn statuses_answered_as_agentd_stops_reach_a_client_that_reads_them_late() {
    const LINE: &[u8] = b"{\"id\":1,\"cmd\":\"status\"}\n";
    let mut daemon = Daemon::start(&[]);
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // Whole lines until agentd stops reading: its answers fill the socket, and one
    // is being written when it stops.
    let lines = LINE.repeat(3000);
    let mut sent = 0;
    loop {
        assert!(
            sent < 8 << 20,
            "agentd read {sent} bytes of unanswered statuses"
        );
        match stream.write(&lines) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    kill(daemon.pid(), libc::SIGTERM);
    // Not read until agentd no longer accepts connections: it is closing them.
    wait_for("agentd to stop accepting connections", DEADLINE, || {
        UnixStream::connect(&daemon.socket).is_err().then_some(())
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut received = Vec::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            // Closed with our unread requests: after the answers, "reset".
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read after {} bytes: {e}", received.len()),
        }
    }
    let status = daemon.child.wait().unwrap();
    assert!(status.success(), "{status}\n{}", daemon.log());
    assert!(!received.is_empty());
    let tail = received.len()
        - received
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
    assert_eq!(
        tail,
        0,
        "an answer was cut: {} of its bytes came, after {} whole lines",
        tail,
        received.iter().filter(|b| **b == b'\n').count()
    );
    for line in received.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let value: Value = serde_json::from_slice(line).unwrap();
        assert_eq!(value["ok"], json!(true), "{value}");
    }
}

#[test]
fn long_listings_are_paged_and_agentctl_joins_the_pages() {
    let daemon = Daemon::with_echo_agent(&["--max-concurrent", "1"]);
    let gate = daemon.gate("g");
    daemon.submit("s-run", &format!("hold {gate}"));
    // One connection, pipelined: 700 queued tasks in 700 sessions.
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    let mut batch = String::new();
    for i in 0..700 {
        batch.push_str(&format!(
            "{{\"id\":{i},\"cmd\":\"send\",\"session\":\"s{i}\",\"text\":\"job {i}\"}}\n"
        ));
    }
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || stream.write_all(batch.as_bytes()).unwrap())
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(&mut stream);
    for _ in 0..700 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["result"]["accepted"], json!(true), "{value}");
    }
    writer.join().unwrap();

    // Unpaged, the listing is too long for one answer: a clear error.
    let whole = daemon.try_request(json!({"cmd": "tasks"})).unwrap();
    assert_eq!(whole["error"]["code"], "too_large", "{whole}");

    // Paged: every task exactly once, in id order, no page over the limit.
    let mut ids = Vec::new();
    let mut cursor = Value::Null;
    let mut pages = 0;
    loop {
        let mut request = json!({"cmd": "tasks", "limit": 150});
        if !cursor.is_null() {
            request["cursor"] = cursor.clone();
        }
        let page = daemon.request(request);
        let tasks = page["tasks"].as_array().unwrap();
        assert!(tasks.len() <= 150);
        ids.extend(
            tasks
                .iter()
                .map(|t| t["task_id"].as_str().unwrap().to_string()),
        );
        pages += 1;
        cursor = page.get("next_cursor").cloned().unwrap_or(Value::Null);
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(ids.len(), 701);
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, ids, "pages are in id order without repeats");

    let bad = daemon
        .try_request(json!({"cmd": "tasks", "limit": 10, "cursor": "nonsense"}))
        .unwrap();
    assert_eq!(bad["error"]["code"], "bad_request", "{bad}");

    // agentctl fetches every page and prints one array, running task first.
    let all = daemon.agentctl_json(&["tasks", "--all"]);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 701);
    assert_eq!(all[0]["session"], "s-run");
    assert_eq!(all[1]["position"], 1);
    assert_eq!(all[700]["position"], 700);
    daemon.release(&gate);
}

#[test]
fn sighup_keeps_agentd_and_its_tasks_and_reloads_the_connection_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    std::fs::write(&config, "max-connections = 50\n").unwrap();
    let config_arg = config.display().to_string();
    let daemon = Daemon::with_echo_agent(&["--config", &config_arg]);
    let gate = daemon.gate("g");
    let task = daemon.submit("s", &format!("hold {gate}"));
    daemon.wait_state(&task, "running");

    std::fs::write(&config, "max-connections = 3\n").unwrap();
    kill(daemon.pid(), libc::SIGHUP);
    wait_for("agentd logs the reload", DEADLINE, || {
        daemon.log().contains("SIGHUP: reloaded").then_some(())
    });
    assert!(crate::support::alive(daemon.pid()));
    assert_eq!(daemon.task(&task)["state"], "running");
    // The new cap is in force: three connections fill it.
    let held = fill_to_cap(&daemon, 3);
    let refused = UnixStream::connect(&daemon.socket).unwrap();
    let answer = read_line(&refused, Duration::from_secs(30)).unwrap();
    assert_eq!(answer["error"]["code"], "too_many_connections");
    drop(held);

    // A broken file keeps the settings in force.
    std::fs::write(&config, "max-connections = 'many'\n").unwrap();
    kill(daemon.pid(), libc::SIGHUP);
    wait_for("agentd logs the failed reload", DEADLINE, || {
        daemon
            .log()
            .contains("SIGHUP: kept the settings")
            .then_some(())
    });
    daemon.release(&gate);
    daemon.wait_state(&task, "succeeded");
}

#[test]
fn sighup_without_a_config_file_is_ignored_and_logged() {
    let daemon = Daemon::with_echo_agent(&[]);
    let gate = daemon.gate("g");
    let task = daemon.submit("s", &format!("hold {gate}"));
    daemon.wait_state(&task, "running");
    kill(daemon.pid(), libc::SIGHUP);
    wait_for("agentd logs the SIGHUP", DEADLINE, || {
        daemon.log().contains("SIGHUP").then_some(())
    });
    daemon.request(json!({"cmd": "ping"}));
    daemon.release(&gate);
    daemon.wait_state(&task, "succeeded");
}

#[test]
fn a_removed_socket_and_directory_are_re_created() {
    let daemon = Daemon::with_echo_agent(&[]);
    let dir = daemon.socket.parent().unwrap().to_path_buf();
    // The socket file alone.
    std::fs::remove_file(&daemon.socket).unwrap();
    wait_for("agentd is reachable again", DEADLINE, || {
        daemon.try_request(json!({"cmd": "ping"})).ok()
    });
    // Its whole directory.
    std::fs::remove_dir_all(&dir).unwrap();
    wait_for("agentd is reachable again", DEADLINE, || {
        daemon.try_request(json!({"cmd": "ping"})).ok()
    });
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(daemon.log().contains("re-created"), "{}", daemon.log());
    let task = daemon.submit("s", "after");
    daemon.wait_state(&task, "succeeded");
}

#[test]
fn a_socket_taken_over_by_another_agentd_is_left_alone() {
    let first = Daemon::with_echo_agent(&[]);
    std::fs::remove_file(&first.socket).unwrap();
    // A second agentd binds the path before the first notices.
    let log = std::fs::File::create(first.dir.path().join("second.log")).unwrap();
    let mut second = Command::new(crate::support::AGENTD)
        .arg("--socket")
        .arg(&first.socket)
        .arg("--state-dir")
        .arg(first.dir.path().join("state2"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let second_pid = second.id();
    let pid = wait_for("the second agentd answers", DEADLINE, || {
        first.try_request(json!({"cmd": "ping"})).ok()
    })["result"]["pid"]
        .as_u64();
    if pid == Some(u64::from(first.pid())) {
        // The first agentd re-created its socket before the second started: the
        // second must then have refused to start.
        let status = wait_for("the second agentd gives up", DEADLINE, || {
            second.try_wait().unwrap()
        });
        assert!(!status.success());
    } else {
        assert_eq!(pid, Some(u64::from(second_pid)));
        wait_for("the first agentd notices", DEADLINE, || {
            first
                .log()
                .contains("replaced by another file")
                .then_some(())
        });
        let again = first.request(json!({"cmd": "ping"}));
        assert_eq!(again["pid"], json!(second_pid));
        kill(second_pid, libc::SIGKILL);
        let _ = second.wait();
    }
}
