//! agentd as a service: the default config file, systemd readiness, log levels and
//! formats, private state files.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{wait_for, Daemon, AGENTD, AGENT_EXEC, DEADLINE, TEST_AGENT};

fn write_default_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config").join("agentd").join("config.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn capacity_max(d: &Daemon) -> u64 {
    d.request(json!({"cmd": "status"}))["capacity"]["max"]
        .as_u64()
        .expect("capacity.max")
}

/// Waits (by polling) until agentd has exited; returns its log.
fn wait_exit(d: &mut Daemon) -> String {
    let status = wait_for("agentd exits", DEADLINE, || d.child.try_wait().unwrap());
    assert!(
        status.success(),
        "agentd exited with {status}:\n{}",
        d.log()
    );
    d.log()
}

#[test]
fn the_default_config_file_is_read_and_flags_win_over_it() {
    let dir = tempfile::tempdir().unwrap();
    write_default_config(dir.path(), "max-concurrent = 3\n");
    let d = Daemon::start_in(dir, &[], &[]);
    assert_eq!(capacity_max(&d), 3, "{}", d.log());
    drop(d);

    let dir = tempfile::tempdir().unwrap();
    write_default_config(dir.path(), "max-concurrent = 3\n");
    let d = Daemon::start_in(dir, &["--max-concurrent", "5"], &[]);
    assert_eq!(capacity_max(&d), 5, "{}", d.log());
    drop(d);

    // $XDG_CONFIG_HOME unset: ~/.config/agentd/config.toml.
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = home.join(".config/agentd/config.toml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "max-concurrent = 4\n").unwrap();
    let d = Daemon::start_in(
        dir,
        &[],
        &[
            ("XDG_CONFIG_HOME", None),
            ("HOME", Some(home.to_str().unwrap())),
        ],
    );
    assert_eq!(capacity_max(&d), 4, "{}", d.log());
}

/// `AGENTD_CONFIG` names the config file when `--config` is not given (as for
/// agentd-matrix, so both read one file); `--config` wins over it, and either one
/// wins over the default file.
#[test]
fn agentd_config_names_the_config_file_and_the_flag_wins_over_it() {
    let files = tempfile::tempdir().unwrap();
    let env_file = files.path().join("from-env.toml");
    std::fs::write(&env_file, "max-concurrent = 6\n").unwrap();
    let flag_file = files.path().join("from-flag.toml");
    std::fs::write(&flag_file, "max-concurrent = 7\n").unwrap();
    let env_path = env_file.to_str().unwrap();
    let flag_path = flag_file.to_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    write_default_config(dir.path(), "max-concurrent = 3\n");
    let d = Daemon::start_in(dir, &[], &[("AGENTD_CONFIG", Some(env_path))]);
    assert_eq!(capacity_max(&d), 6, "{}", d.log());
    drop(d);

    let dir = tempfile::tempdir().unwrap();
    write_default_config(dir.path(), "max-concurrent = 3\n");
    let d = Daemon::start_in(
        dir,
        &["--config", flag_path],
        &[("AGENTD_CONFIG", Some(env_path))],
    );
    assert_eq!(capacity_max(&d), 7, "{}", d.log());
}

#[test]
fn sighup_re_reads_the_default_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_default_config(dir.path(), "max-connections = 100\n");
    let d = Daemon::start_in(dir, &[], &[]);
    std::fs::write(&path, "max-connections = 50\n").unwrap();
    crate::support::kill(d.pid(), libc::SIGHUP);
    let expected = format!("SIGHUP: reloaded {}: max-connections 50,", path.display());
    wait_for("agentd reloads its default config file", DEADLINE, || {
        d.log().contains(&expected).then_some(())
    });
    assert_eq!(d.request(json!({"cmd": "ping"}))["pong"], json!(true));
}

#[test]
fn a_missing_default_config_file_means_defaults() {
    // The fixture points XDG_CONFIG_HOME at an empty directory.
    let d = Daemon::start(&[]);
    assert_eq!(capacity_max(&d), 2, "{}", d.log());
}

#[test]
fn a_broken_default_config_file_is_an_error_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_default_config(dir.path(), "max-concurrent = 3\ncancel-grace = \"soon\"\n");
    let out = Command::new(AGENTD)
        .arg("--socket")
        .arg(dir.path().join("agentd.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("invalid config file {}", path.display())),
        "{err}"
    );
    assert!(
        err.contains("line 2: cancel-grace: invalid duration"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!dir.path().join("agentd.sock").exists());
}

/// A value of the wrong type, or one that does not fit with another key of the
/// file, is named by its key and line too, not only by what serde expected.
#[test]
fn a_config_value_of_the_wrong_type_names_its_key_and_line() {
    for (text, want) in [
        (
            "cap = 3\nmax-concurrent = \"3\"\n",
            "line 2: max-concurrent: invalid type",
        ),
        (
            "cap = 3\nmax-concurrent = -1\n",
            "line 2: max-concurrent: invalid value",
        ),
        ("no-cgroup = \"yes\"\n", "line 1: no-cgroup: invalid type"),
        ("\ncancel-grace = 5\n", "line 2: cancel-grace: invalid type"),
        (
            "heartbeat = \"2s\"\nhung-after = \"1s\"\n",
            "line 2: hung-after: the silence limit (1s) must be longer",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_default_config(dir.path(), text);
        let out = Command::new(AGENTD)
            .arg("--socket")
            .arg(dir.path().join("agentd.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: {err}");
        assert_eq!(
            err.trim_end(),
            err.trim_end().lines().next().unwrap_or(""),
            "one line: {err}"
        );
        assert!(
            err.contains(&format!("invalid config file {}: {want}", path.display())),
            "{text}: {err}"
        );
    }
}

#[test]
fn readiness_is_sent_once_the_socket_answers_and_stopping_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify_path).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let socket = dir.path().join("run").join("agentd.sock");
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let child = Command::new(AGENTD)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--agent", &agent])
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The fixture's Drop kills agentd and its agents, should the test fail.
    let mut d = Daemon {
        dir,
        socket: socket.clone(),
        child,
        args: Vec::new(),
        env: Vec::new(),
    };
    let pid = d.pid();
    let child = &mut d.child;
    let mut recv = |what: &str| -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 4096];
        loop {
            match listener.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("agentd exited with {status} before sending {what}");
                    }
                    assert!(Instant::now() < deadline, "no {what} from agentd");
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    };
    let ready = recv("READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.lines().any(|l| l == format!("MAINPID={pid}")),
        "{ready:?}"
    );
    // Ready means ready: the control socket answers now, without retrying.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    use std::io::{BufRead, Write};
    writeln!(stream, "{}", json!({"id": 1, "cmd": "ping"})).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .unwrap();
    let answer: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["result"]["pong"], json!(true), "{line}");

    // Agents do not inherit agentd's channel to the service manager.
    let out = Command::new(crate::support::AGENTCTL)
        .arg("--socket")
        .arg(&socket)
        .args([
            "send",
            "--wait",
            "--session",
            "s",
            "echo notify=${NOTIFY_SOCKET:-unset}",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("notify=unset"), "{printed}");

    crate::support::kill(pid, libc::SIGTERM);
    let stopping = recv("STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = wait_for("agentd exits", DEADLINE, || child.try_wait().unwrap());
    assert!(status.success(), "{status}");
}

/// Runs tasks that end every way, stops, and shuts down; returns agentd's log.
fn run_everything(env: &[(&str, Option<&str>)], extra: &[&str]) -> String {
    let agent = format!("{TEST_AGENT} {{text}}");
    let mut args = vec![
        "--agent",
        agent.as_str(),
        "--max-concurrent",
        "8",
        // The cancelled task must end by its cooperative cancel: a grace a loaded
        // machine cannot outrun by starving the test agent (the TERM-ignoring task
        // waits it out once).
        "--cancel-grace",
        "1s",
        "--term-grace",
        "200ms",
    ];
    args.extend_from_slice(extra);
    let mut d = Daemon::start_in(tempfile::tempdir().unwrap(), &args, env);
    let ok = d.submit("ok", "result:fine");
    let failed = d.submit("failed", "fail");
    let crashed = d.submit("crashed", "crash");
    let garbage = d.submit("garbage", "garbage");
    let cancelled = d.submit("cancelled", "sleep:20000");
    let termed = d.submit("termed", "sleep:20000 ignore-cancel");
    let held = d.send("cancelled", "sleep:20000 second");
    for (task, state) in [
        (&ok, "succeeded"),
        (&failed, "failed"),
        (&crashed, "failed"),
        (&garbage, "failed"),
    ] {
        d.wait_state(task, state);
    }
    d.wait_progress(&cancelled, "tick");
    d.wait_progress(&termed, "tick");
    d.request(json!({"cmd": "stop", "session": "cancelled"}));
    d.request(json!({"cmd": "stop", "task_id": termed}));
    d.wait_state(&cancelled, "cancelled");
    d.wait_state(&termed, "cancelled");
    let _ = held;
    let shutdown = d.submit("shutdown", "sleep:20000");
    d.wait_progress(&shutdown, "tick");
    crate::support::kill(d.pid(), libc::SIGTERM);
    wait_exit(&mut d)
}

const DEFAULT_LOG: &[(&str, Option<&str>)] = &[("AGENTD_LOG", None), ("RUST_LOG", None)];

#[test]
fn default_logs_are_plain_one_line_events_without_debug_formatting() {
    let log = run_everything(DEFAULT_LOG, &[]);
    for pattern in [
        "{",
        "}",
        "Some(",
        "None",
        "Ok(",
        "Err(",
        "Done",
        "Cancelled",
        "Failed",
        "Ending",
        "State",
        "\\\"",
    ] {
        assert!(
            !log.contains(pattern),
            "the default log shows {pattern:?}:\n{log}"
        );
    }
    for line in log.lines() {
        // Each line is one event: a timestamp, a level, the event.
        let mut words = line.split_whitespace();
        let time = words.next().unwrap_or_default();
        let level = words.next().unwrap_or_default();
        assert!(
            time.len() > 20 && time.ends_with('Z') && time.contains('T'),
            "not an event line: {line:?}\n{log}"
        );
        assert!(
            ["INFO", "WARN", "ERROR"].contains(&level),
            "level {level:?} at the default level: {line:?}"
        );
    }
    let finished = |state: &str| {
        log.lines()
            .filter(|l| l.contains("task finished") && l.contains(&format!(" state={state}")))
            .count()
    };
    assert_eq!(finished("succeeded"), 1, "{log}");
    assert_eq!(finished("failed"), 3, "{log}");
    assert!(finished("cancelled") >= 3, "{log}");
    assert!(
        log.lines().any(|l| l.contains("task finished")
            && l.contains(" session=cancelled state=cancelled by=cooperative_cancel after=")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(" session=termed state=cancelled by=sigterm after=")),
        "{log}"
    );
    assert!(log.contains("agentd stopped"), "{log}");
}

/// The log says where agentd listens and keeps its state once it is ready, so a user
/// who started `agentd &` (or reads the journal) knows what to give agentctl.
#[test]
fn the_ready_line_names_the_socket_and_the_state_dir() {
    let d = Daemon::start(&[]);
    // The fast lane answers pings before the loop logs that it is ready.
    let ready = wait_for("the ready line", DEADLINE, || {
        d.log()
            .lines()
            .find(|l| l.contains(" ready "))
            .map(str::to_string)
    });
    let socket = d.socket.display().to_string();
    let state = d.dir.path().join("state").display().to_string();
    assert!(ready.contains(&format!("ready on {socket} ")), "{ready}");
    assert!(ready.contains(&format!("state dir {state},")), "{ready}");
}

#[test]
fn rust_log_debug_logs_more_and_agentd_log_wins_over_it() {
    let quiet = run_everything(DEFAULT_LOG, &[]);
    let debug = run_everything(&[("AGENTD_LOG", None), ("RUST_LOG", Some("debug"))], &[]);
    let debug_lines = debug.lines().filter(|l| l.contains(" DEBUG ")).count();
    assert!(
        debug_lines > 0,
        "RUST_LOG=debug logged no debug event:\n{debug}"
    );
    assert!(
        debug.lines().count() > quiet.lines().count(),
        "RUST_LOG=debug logged no more than the default"
    );
    let warn_only = run_everything(
        &[("AGENTD_LOG", Some("warn")), ("RUST_LOG", Some("debug"))],
        &[],
    );
    assert!(
        !warn_only.contains(" INFO ") && !warn_only.contains(" DEBUG "),
        "AGENTD_LOG=warn did not win over RUST_LOG=debug:\n{warn_only}"
    );
    assert!(warn_only.contains(" WARN "), "{warn_only}");
}

#[test]
fn json_logs_are_one_object_a_line() {
    let log = run_everything(DEFAULT_LOG, &["--log-format", "json"]);
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(events
        .iter()
        .all(|e| e["level"].is_string() && e["timestamp"].is_string()));
    let cancelled = events
        .iter()
        .find(|e| {
            e["message"] == "task finished" && e["session"] == "cancelled" && e["by"].is_string()
        })
        .unwrap_or_else(|| panic!("no task finished event for the cancelled task:\n{log}"));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["by"], "cooperative_cancel", "{cancelled}");
    assert!(
        cancelled["after"].as_str().unwrap().ends_with('s'),
        "{cancelled}"
    );
}

#[test]
fn the_log_format_comes_from_the_config_file_too() {
    let dir = tempfile::tempdir().unwrap();
    write_default_config(dir.path(), "log-format = \"json\"\n");
    let d = Daemon::start_in(dir, &[], &[]);
    let log = d.log();
    let first = log.lines().next().unwrap_or_default();
    let event: Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {log}"));
    assert!(event["message"].is_string(), "{event}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_state_dir_is_private_and_agent_logs_are_owner_only() {
    // An agent that writes to its stdout (its log) and exits without a Hello.
    let d = Daemon::start(&[
        "--agent",
        "/bin/sh -c 'echo some output; exit 3' agent {text}",
    ]);
    let task = d.submit("s", "work");
    d.wait_state(&task, "failed");
    let state = d.dir.path().join("state");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("logs")), 0o700);
    let log = state.join("logs").join(format!("{task}.log"));
    // The task may end a moment before its log's copy thread has written it.
    wait_for("the agent's output is in its log", DEADLINE, || {
        (std::fs::read_to_string(&log).ok()? == "some output\n").then_some(())
    });
    assert_eq!(mode(&log), 0o600);
}

#[test]
fn a_state_dir_open_to_others_is_made_private() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("logs")).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(state.join("logs"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = Daemon::start_in(dir, &[], &[]);
    assert_eq!(mode(&state), 0o700, "{}", d.log());
    assert_eq!(mode(&state.join("logs")), 0o700);
}

/// `systemd-analyze --user verify` on a unit, with a home whose ~/.cargo/bin/agentd is
/// the agentd under test (the unit's ExecStart); returns its diagnostics.
fn verify_unit(unit: &Path) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("home/.cargo/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(AGENTD, bin.join("agentd")).unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["--user", "verify"])
        .arg(unit)
        .env("HOME", dir.path().join("home"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("SYSTEMD_LOG_COLOR", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}): install systemd (apt-get install systemd)")
        });
    let diagnostics = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), diagnostics)
}

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/systemd/agentd.service"
);

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let (ok, diagnostics) = verify_unit(Path::new(UNIT));
    assert!(
        ok && diagnostics.trim().is_empty(),
        "systemd-analyze verify:\n{diagnostics}"
    );

    // The check checks: a misspelt setting, which systemd only warns about, is caught.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("agentd.service");
    let text = std::fs::read_to_string(UNIT).unwrap();
    std::fs::write(&bad, text.replace("KillMode=mixed", "KillMode=mixd")).unwrap();
    let (_, diagnostics) = verify_unit(&bad);
    assert!(diagnostics.contains("mixd"), "{diagnostics}");
}

#[test]
fn the_systemd_unit_waits_for_readiness_and_lets_agentd_stop_its_tasks() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    let settings: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |key: &str| {
        settings
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("the unit sets no {key}"))
    };
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("ExecReload"), "kill -HUP $MAINPID");
    assert_eq!(get("KillMode"), "mixed");
    assert_eq!(get("KillSignal"), "SIGTERM");
    assert_eq!(get("Delegate"), "yes");
    assert_eq!(get("ExecStart"), "%h/.cargo/bin/agentd");
    let stop = seconds(get("TimeoutStopSec"));
    // Longer than agentd's default stop sequence (cancel-grace 5 s + term-grace 5 s).
    assert!(stop > 10, "TimeoutStopSec {stop}");
}

fn seconds(text: &str) -> u64 {
    text.trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds")
}

#[test]
fn an_idle_agentd_has_written_every_log_line_of_what_it_did() {
    // Log lines must not be held across a wait (were they buffered, say, to write
    // a step's lines at once): nothing else logs while agentd idles, so a line still
    // held would never show (at the info level no thread but the loop's logs here).
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &["--agent", &agent],
        &[("AGENTD_LOG", Some("info"))],
    );
    for i in 0..3 {
        let id = d.submit(&format!("logged-{i}"), "true");
        d.wait_state(&id, "succeeded");
        let log = wait_for("the task's lines in the log", DEADLINE, || {
            let log = d.log();
            log.lines()
                .any(|l| l.contains("task finished") && l.contains(&format!("task_id={id}")))
                .then_some(log)
        });
        let line_of = |what: &str| {
            log.lines()
                .position(|l| l.contains(what) && l.contains(&format!("task_id={id}")))
                .unwrap_or_else(|| panic!("no {what:?} line of {id}:\n{log}"))
        };
        assert!(
            line_of("agent started") < line_of("task finished"),
            "lines out of order:\n{log}"
        );
        assert!(log.ends_with('\n'), "a line is cut:\n{log}");
    }
}

/// agentd's exit code for a configuration error (a bad flag value, config file or
/// agent program): `EX_CONFIG` of sysexits.h.
const EXIT_CONFIG: i32 = 78;

/// Runs agentd (socket and state dir in `dir`, its config dir `dir/config`) with
/// `args` and `path` as its `PATH`, expecting it to refuse to start: its exit code
/// and stderr. Killed, and the test failed, if it starts after all.
fn refused_start(dir: &Path, args: &[&str], path: Option<&str>) -> (Option<i32>, String) {
    let mut command = Command::new(AGENTD);
    command
        .arg("--socket")
        .arg(dir.join("run").join("agentd.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env_remove("AGENTD_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(path) = path {
        command.env("PATH", path);
    }
    let mut child = command.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agentd {args:?} started instead of refusing to");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !dir.join("run").join("agentd.sock").exists(),
        "a socket was bound: {err}"
    );
    (status.code(), err)
}

/// A misspelt agent program stops agentd at once, before it binds its socket, with
/// one line naming the program and where it was looked for (next to agentd, and
/// agentd's PATH), and the configuration error's exit code; so does a path that is
/// no program. A config file's `agent` key is named with its line.
#[test]
fn a_misspelt_agent_program_refuses_to_start_naming_it_and_where_it_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let agentd_dir = Path::new(AGENTD).parent().unwrap().display().to_string();
    let path = "/nonexistent/bin:/usr/bin:/bin";
    let (code, err) = refused_start(dir.path(), &["--agent", "nosuchprog {text}"], Some(path));
    assert_eq!(code, Some(EXIT_CONFIG), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("agentd: invalid --agent: the agent program \"nosuchprog\" is not found"),
        "{err}"
    );
    assert!(err.contains(&agentd_dir), "{err}");
    assert!(err.contains(&format!("PATH ({path})")), "{err}");

    let config = write_default_config(
        dir.path(),
        "cap = 3\nagent = \"nosuchprog --flag {text}\"\n",
    );
    let (code, err) = refused_start(dir.path(), &[], Some(path));
    assert_eq!(code, Some(EXIT_CONFIG), "{err}");
    assert!(
        err.contains(&format!(
            "invalid config file {}: line 2: agent: the agent program \"nosuchprog\" is not found",
            config.display()
        )),
        "{err}"
    );
    std::fs::remove_file(&config).unwrap();

    let plain = dir.path().join("plain-file");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let plain = format!("{} {{text}}", plain.display());
    for (agent, says) in [
        ("/nonexistent/agent {text}", "does not exist"),
        (plain.as_str(), "is not executable"),
        ("/tmp {text}", "is a directory"),
    ] {
        let (code, err) = refused_start(dir.path(), &["--agent", agent], None);
        assert_eq!(code, Some(EXIT_CONFIG), "{agent}: {err}");
        let program = agent.split(' ').next().unwrap();
        assert!(
            err.contains(&format!("the agent program \"{program}\" {says}")),
            "{agent}: {err}"
        );
    }
}

/// What may run is still accepted: an absolute path, a wrapper found on PATH (`sh
/// -c`, `env`) whose own command is only looked up when it runs, a program on a PATH
/// of the user's, and a program word that a task's text completes.
#[test]
fn an_agent_program_by_path_on_path_or_behind_a_wrapper_starts() {
    let bin = tempfile::tempdir().unwrap();
    let mine = bin.path().join("my-agent");
    std::fs::write(
        &mine,
        format!("#!/bin/sh\nexec {AGENT_EXEC} -- sh -c \"$1\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.path().display());
    let wrapped = format!("sh -c 'exec \"$0\" -- sh -c \"$1\"' {AGENT_EXEC} {{text}}");
    let env = format!("env AGENTD_TEST_WRAPPED=1 {AGENT_EXEC} -- sh -c {{text}}");
    let absolute = format!("{AGENT_EXEC} -- sh -c {{text}}");
    for (agent, text) in [
        (absolute.as_str(), "echo hello"),
        (wrapped.as_str(), "echo hello"),
        (env.as_str(), "echo hello"),
        ("my-agent {text}", "echo hello"),
        ("{text} -- sh -c 'echo hello'", AGENT_EXEC),
    ] {
        let d = Daemon::start_in(
            tempfile::tempdir().unwrap(),
            &["--agent", agent],
            &[("PATH", Some(path.as_str()))],
        );
        let task = d.submit("s", text);
        d.wait_state(&task, "succeeded");
    }
}
