//! End-to-end tests of agent-exec's logic, in process: the test plays agentd on
//! one end of a socketpair and `exec::run_task` runs real `sh -c` commands.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentd_agent::exec::{self, ExecConfig, CUT_MARKER, MAX_LINE_BYTES, MAX_RESULT_BYTES};
use agentd_agent::{
    AgentChannel, AgentFeatures, AgentMsg, Outcome, SupervisorMsg, TaskResult, TaskStart,
    IPC_PROTOCOL_VERSION,
};
use agentd_proto::codec::{read_frame, write_frame};

/// The agentd side of one running agent-exec task.
struct Supervisor {
    stream: UnixStream,
    /// `socket:[inode]` of agent-exec's end, as /proc/PID/fd shows it.
    agent_socket: String,
    agent: Option<JoinHandle<i32>>,
    progress: Vec<String>,
}

fn start_with(text: &str, config: ExecConfig) -> Supervisor {
    start_after(&[], text, config)
}

/// Like [`start_with`], with `before` (Settings, Resume) sent between Welcome and Start.
fn start_after(before: &[SupervisorMsg], text: &str, config: ExecConfig) -> Supervisor {
    start_around(before, &[], text, config)
}

/// Like [`start_after`], with `after` sent right behind Start, before agent-exec
/// even begins its handshake (so that it reads them in the same read as Start).
fn start_around(
    before: &[SupervisorMsg],
    after: &[SupervisorMsg],
    text: &str,
    config: ExecConfig,
) -> Supervisor {
    let (agent, mut stream) = UnixStream::pair().unwrap();
    let agent_socket = format!("socket:[{}]", nix::sys::stat::fstat(&agent).unwrap().st_ino);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write_frame(
        &mut stream,
        &SupervisorMsg::Welcome {
            protocol: IPC_PROTOCOL_VERSION,
        },
    )
    .unwrap();
    for msg in before {
        write_frame(&mut stream, msg).unwrap();
    }
    write_frame(
        &mut stream,
        &SupervisorMsg::Start(TaskStart {
            task_id: "task-1".into(),
            session: "sess-1".into(),
            text: text.into(),
        }),
    )
    .unwrap();
    for msg in after {
        write_frame(&mut stream, msg).unwrap();
    }
    let (steer, features) = (config.steer, exec::features(&config));
    let handle = std::thread::spawn(move || {
        let (channel, task) =
            AgentChannel::handshake_with(agent, exec::hello(&config), exec::features(&config))
                .expect("handshake");
        exec::run_task(channel, task, &config)
    });
    let mut sup = Supervisor {
        stream,
        agent_socket,
        agent: Some(handle),
        progress: Vec::new(),
    };
    match sup.next() {
        Some(AgentMsg::Hello(h)) => {
            assert_eq!(h.protocol, IPC_PROTOCOL_VERSION);
            assert!(h.agent.starts_with("agent-exec "), "{}", h.agent);
            assert_eq!(h.capabilities.steer, steer);
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    assert_eq!(sup.next(), Some(AgentMsg::Features(features)));
    sup
}

fn start(script: &str) -> Supervisor {
    start_with(script, ExecConfig::default())
}

fn steering() -> ExecConfig {
    ExecConfig {
        steer: true,
        ..ExecConfig::default()
    }
}

impl Supervisor {
    /// The next message that is not a heartbeat; `None` at EOF.
    fn next(&mut self) -> Option<AgentMsg> {
        loop {
            match read_frame::<AgentMsg>(&mut self.stream).expect("read from agent") {
                Some(AgentMsg::Heartbeat) => continue,
                other => return other,
            }
        }
    }

    fn send(&mut self, msg: &SupervisorMsg) {
        write_frame(&mut self.stream, msg).unwrap();
    }

    /// Reads until a progress line equal to `line`.
    fn wait_progress(&mut self, line: &str) {
        loop {
            match self.next() {
                Some(AgentMsg::Progress { text }) => {
                    self.progress.push(text.clone());
                    if text == line {
                        return;
                    }
                }
                other => panic!("waiting for progress {line:?}, got {other:?}"),
            }
        }
    }

    /// Reads up to the next steer ack (collecting progress) and returns it.
    fn wait_ack(&mut self) -> bool {
        loop {
            match self.next() {
                Some(AgentMsg::Progress { text }) => self.progress.push(text),
                Some(AgentMsg::SteerAck { accepted }) => return accepted,
                other => panic!("waiting for a steer ack, got {other:?}"),
            }
        }
    }

    /// Reads until a progress line starting with `prefix`, returns the rest.
    fn wait_progress_prefix(&mut self, prefix: &str) -> String {
        loop {
            match self.next() {
                Some(AgentMsg::Progress { text }) => {
                    self.progress.push(text.clone());
                    if let Some(rest) = text.strip_prefix(prefix) {
                        return rest.to_string();
                    }
                }
                other => panic!("waiting for progress {prefix:?}…, got {other:?}"),
            }
        }
    }

    /// Reads up to the result (collecting progress), checks that nothing follows,
    /// and returns it with agent-exec's exit code.
    fn finish(mut self) -> (TaskResult, i32, Vec<String>) {
        let result = loop {
            match self.next() {
                Some(AgentMsg::Progress { text }) => self.progress.push(text),
                Some(AgentMsg::Result(r)) => break r,
                other => panic!("expected progress or result, got {other:?}"),
            }
        };
        assert_eq!(self.next(), None, "nothing after the result");
        let code = self.agent.take().unwrap().join().unwrap();
        (result, code, self.progress)
    }

    /// Closes agentd's end and returns agent-exec's exit code (and how long it took).
    fn hang_up(mut self) -> (i32, Duration) {
        let t = Instant::now();
        let agent = self.agent.take().unwrap();
        drop(self);
        let code = agent.join().unwrap();
        (code, t.elapsed())
    }
}

fn assert_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && !is_zombie(pid);
        if !alive {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn output_lines_become_progress_and_the_tail_the_result() {
    let (result, code, progress) = start("echo one; echo two >&2; echo; echo three").finish();
    assert_eq!(result.outcome, Outcome::Succeeded);
    assert_eq!(code, exec::EXIT_SUCCEEDED);
    let exit = result.command_exit.unwrap();
    assert_eq!((exit.code, exit.signal), (Some(0), None));
    assert_eq!(
        progress,
        ["one", "two", "three"],
        "blank lines are not progress"
    );
    assert_eq!(result.text, "one\ntwo\n\nthree");
}

#[test]
fn stdout_and_stderr_keep_the_order_the_command_wrote_them_in() {
    // Alternating streams, line by line: two pipes read by two threads reorder these.
    let script = "for i in $(seq 1 200); do echo out$i; echo err$i >&2; done";
    let (result, code, progress) = start(script).finish();
    assert_eq!(code, 0);
    let expected: Vec<String> = (1..=200)
        .flat_map(|i| [format!("out{i}"), format!("err{i}")])
        .collect();
    assert_eq!(progress, expected, "progress lost the command's order");
    assert_eq!(
        result.text,
        expected.join("\n"),
        "the result lost the order"
    );
}

#[test]
fn a_failing_command_fails_with_its_exit_code() {
    let (result, code, _) = start("echo oops >&2; exit 3").finish();
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(code, exec::EXIT_FAILED);
    assert_eq!(result.command_exit.unwrap().code, Some(3));
    assert_eq!(result.text, "oops");
}

#[test]
fn cancel_sends_sigint_to_the_group_and_reports_cancelled() {
    // `exec`: a SIGINT that hits dash while it forks a foreground command is
    // lost (the child still has the shell's handler), which would make this flaky.
    let mut sup = start("echo ready; exec sleep 30");
    sup.wait_progress("ready");
    let t = Instant::now();
    sup.send(&SupervisorMsg::Cancel);
    let (result, code, _) = sup.finish();
    // The command sleeps 30 s: well under that, the cancel ended it.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert_eq!(code, exec::EXIT_CANCELLED);
    assert_eq!(result.command_exit.unwrap().signal, Some(libc::SIGINT));
}

#[test]
fn a_cancel_that_came_with_the_start_is_not_lost() {
    // The handshake's read takes the Cancel along with Start: it waits in the
    // channel's buffer, where polling the socket would never find it.
    let sup = start_around(
        &[],
        &[SupervisorMsg::Cancel],
        "echo ready; exec sleep 30",
        ExecConfig::default(),
    );
    let t = Instant::now();
    let (result, code, _) = sup.finish();
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert_eq!(code, exec::EXIT_CANCELLED);
}

/// Where in a run [`a_cancel_ends_the_command_whenever_it_arrives`] sends its Cancel.
#[derive(Debug, Clone, Copy)]
enum CancelAt {
    /// Right after the handshake: while agent-exec spawns the command, or just after.
    Spawn,
    /// After the command's first output line.
    FirstLine,
    /// After the first line, in one write behind a Steer, so that agent-exec reads
    /// both frames at once and the Cancel waits in its buffer, unannounced by poll.
    BehindASteer,
}

#[test]
fn a_cancel_ends_the_command_whenever_it_arrives() {
    // The loop is one thread polling the socket: a Cancel that comes during the
    // spawn, after output, or in one read with another frame must still be acted on
    // at once, by the SIGINT that ends the command well before its 30 s sleep would.
    // `exec`, as above: dash would lose a SIGINT that hits its fork.
    for round in 0..16u32 {
        for at in [CancelAt::Spawn, CancelAt::FirstLine, CancelAt::BehindASteer] {
            // Not a wait for a condition: it moves the cancel across the run.
            let jitter = Duration::from_micros(u64::from(round % 8) * 250);
            let mut sup = start_with("echo ready; exec sleep 30", steering());
            if !matches!(at, CancelAt::Spawn) {
                sup.wait_progress("ready");
            }
            std::thread::sleep(jitter);
            let t = Instant::now();
            match at {
                CancelAt::BehindASteer => {
                    let mut bytes = Vec::new();
                    let steer = SupervisorMsg::Steer { text: "s".into() };
                    write_frame(&mut bytes, &steer).unwrap();
                    write_frame(&mut bytes, &SupervisorMsg::Cancel).unwrap();
                    sup.stream.write_all(&bytes).unwrap();
                }
                CancelAt::Spawn | CancelAt::FirstLine => sup.send(&SupervisorMsg::Cancel),
            }
            let result = loop {
                match sup.next() {
                    Some(AgentMsg::Progress { .. } | AgentMsg::SteerAck { .. }) => {}
                    Some(AgentMsg::Result(r)) => break r,
                    other => panic!("expected progress, an ack or the result, got {other:?}"),
                }
            };
            let code = sup.agent.take().unwrap().join().unwrap();
            let signal = result.command_exit.as_ref().and_then(|e| e.signal);
            // A lost cancel costs the whole sleep: stop at the first.
            assert!(
                result.outcome == Outcome::Cancelled
                    && code == exec::EXIT_CANCELLED
                    && signal == Some(libc::SIGINT)
                    && t.elapsed() < Duration::from_secs(15),
                "cancel {at:?} +{jitter:?} (round {round}) did not end the command: \
                 {:?}, exit code {code}, command {:?}, after {:?}",
                result.outcome,
                result.command_exit,
                t.elapsed()
            );
        }
    }
}

#[test]
fn heartbeats_go_out_while_the_command_runs_and_stop_with_the_result() {
    let settings = SupervisorMsg::Settings(agentd_agent::AgentSettings {
        heartbeat_interval_ms: 20,
    });
    let mut sup = start_after(&[settings], "sleep 0.5; echo done", ExecConfig::default());
    let mut beats = 0;
    let result = loop {
        match read_frame::<AgentMsg>(&mut sup.stream).unwrap() {
            Some(AgentMsg::Heartbeat) => beats += 1,
            Some(AgentMsg::Progress { .. }) => {}
            Some(AgentMsg::Result(r)) => break r,
            other => panic!("expected heartbeats, progress or the result, got {other:?}"),
        }
    };
    assert_eq!(result.outcome, Outcome::Succeeded);
    // 0.5 s at one per 20 ms is 25: a loaded machine may delay a few, not most.
    assert!(beats >= 5, "only {beats} heartbeats in 0.5 s");
    assert_eq!(read_frame::<AgentMsg>(&mut sup.stream).unwrap(), None);
    assert_eq!(
        sup.agent.take().unwrap().join().unwrap(),
        exec::EXIT_SUCCEEDED
    );
}

#[test]
fn a_huge_heartbeat_interval_means_no_heartbeats_not_a_crash() {
    let settings = SupervisorMsg::Settings(agentd_agent::AgentSettings {
        heartbeat_interval_ms: u64::MAX,
    });
    let sup = start_after(&[settings], "echo hi", ExecConfig::default());
    let (result, code, progress) = sup.finish();
    assert_eq!(result.outcome, Outcome::Succeeded);
    assert_eq!(code, exec::EXIT_SUCCEEDED);
    assert_eq!(progress, ["hi"]);
}

#[test]
fn cancel_lets_the_command_finish_its_step() {
    let mut sup =
        start("trap 'echo cleaning up; exit 0' INT; echo ready; while :; do sleep 0.05; done");
    sup.wait_progress("ready");
    sup.send(&SupervisorMsg::Cancel);
    let (result, code, _) = sup.finish();
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert_eq!(code, exec::EXIT_CANCELLED);
    assert_eq!(result.command_exit.unwrap().code, Some(0));
    assert!(result.text.ends_with("cleaning up"), "{:?}", result.text);
}

#[test]
fn steer_text_is_written_to_stdin() {
    let mut sup = start_with("echo ready; read line; echo got:$line", steering());
    sup.wait_progress("ready");
    sup.send(&SupervisorMsg::Steer {
        text: "use python 3.12".into(),
    });
    assert!(sup.wait_ack());
    let (result, code, _) = sup.finish();
    assert_eq!(code, 0);
    assert_eq!(result.text, "ready\ngot:use python 3.12");
}

#[test]
fn a_steer_with_line_breaks_is_one_escaped_line() {
    let script = r#"echo ready; read -r one; read -r two; printf '%s|%s\n' "$one" "$two""#;
    let mut sup = start_with(script, steering());
    sup.wait_progress("ready");
    for text in ["line 1\nline 2\\n", "second"] {
        sup.send(&SupervisorMsg::Steer { text: text.into() });
    }
    for _ in 0..2 {
        assert!(sup.wait_ack());
    }
    let (result, _, _) = sup.finish();
    assert_eq!(
        result.text,
        r"ready
line 1\nline 2\\n|second"
    );
    assert_eq!(
        exec::unescape_line(r"line 1\nline 2\\n"),
        "line 1\nline 2\\n"
    );
    assert_eq!(exec::escape_line("line 1\nline 2\\n"), r"line 1\nline 2\\n");
}

#[test]
fn steering_is_off_by_default_and_stdin_is_empty() {
    let mut sup = start("read line || echo no-input; echo ready; sleep 0.3");
    sup.wait_progress("no-input");
    sup.wait_progress("ready");
    sup.send(&SupervisorMsg::Steer { text: "x".into() });
    assert_eq!(sup.next(), Some(AgentMsg::SteerAck { accepted: false }));
    let (result, _, _) = sup.finish();
    assert_eq!(result.outcome, Outcome::Succeeded);
}

#[test]
fn a_steer_the_command_never_reads_is_not_accepted() {
    // With steering on, a steer counts as delivered only once the command has read
    // it; this one is still in the pipe when the command ends.
    let mut sup = start_with("echo ready; sleep 0.3; echo A", steering());
    sup.wait_progress("ready");
    sup.send(&SupervisorMsg::Steer {
        text: "never read".into(),
    });
    let mut progress = Vec::new();
    loop {
        match sup.next() {
            Some(AgentMsg::Progress { text }) => progress.push(text),
            Some(AgentMsg::SteerAck { accepted }) => {
                assert!(!accepted, "an unread steer was reported as delivered");
                break;
            }
            other => panic!("expected the steer's ack before anything else, got {other:?}"),
        }
    }
    let (result, code, _) = sup.finish();
    assert_eq!((code, result.text.as_str()), (0, "ready\nA"));
}

#[test]
fn steer_after_stdin_is_closed_is_not_accepted() {
    let mut sup = start_with("exec 0<&-; echo ready; sleep 0.5", steering());
    sup.wait_progress("ready");
    sup.send(&SupervisorMsg::Steer { text: "x".into() });
    assert_eq!(sup.next(), Some(AgentMsg::SteerAck { accepted: false }));
    sup.finish();
}

#[test]
fn a_big_steer_into_a_command_that_does_not_read_does_not_block_agent_exec() {
    // More than a pipe holds: the writer must not block, and cancel still works.
    let mut sup = start_with("echo ready; exec sleep 30", steering());
    sup.wait_progress("ready");
    sup.send(&SupervisorMsg::Steer {
        text: "x".repeat(1 << 20),
    });
    sup.send(&SupervisorMsg::Steer {
        text: "second".into(),
    });
    sup.send(&SupervisorMsg::Cancel);
    for _ in 0..2 {
        assert_eq!(sup.next(), Some(AgentMsg::SteerAck { accepted: false }));
    }
    let (result, code, _) = sup.finish();
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert_eq!(code, exec::EXIT_CANCELLED);
}

#[test]
fn checkpoints_written_on_fd_3_are_relayed_in_order() {
    let config = ExecConfig {
        checkpoints: true,
        ..ExecConfig::default()
    };
    let script =
        r#"echo "fd:$AGENTD_CHECKPOINT_FD"; echo one >&3; printf 'two\\nlines\n' >&3; echo done"#;
    let mut sup = start_with(script, config);
    let mut got = Vec::new();
    let result = loop {
        match sup.next() {
            Some(AgentMsg::Progress { text }) => got.push(format!("progress {text}")),
            Some(AgentMsg::Checkpoint { data }) => got.push(format!("checkpoint {data}")),
            Some(AgentMsg::Result(r)) => break r,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(result.outcome, Outcome::Succeeded);
    got.sort(); // two pipes: the checkpoints keep their order among themselves
    assert_eq!(
        got,
        [
            "checkpoint one",
            "checkpoint two\nlines",
            "progress done",
            "progress fd:3"
        ]
    );
}

#[test]
fn collect_is_announced_only_when_asked_for() {
    let config = ExecConfig {
        collect: true,
        ..ExecConfig::default()
    };
    assert_eq!(
        exec::features(&config),
        AgentFeatures {
            collected_prompts: true,
            checkpoints: false
        }
    );
    let (result, _, _) = start_with("echo hi", config).finish();
    assert_eq!(result.text, "hi");
}

#[test]
fn eof_on_the_channel_kills_the_command_even_if_it_ignores_sigterm() {
    let mut sup = start("trap '' TERM; echo pid:$$; while :; do sleep 0.05; done");
    let pid: i32 = sup.wait_progress_prefix("pid:").parse().unwrap();
    let (code, took) = sup.hang_up();
    assert_eq!(code, exec::EXIT_FAILED);
    // It never ends by itself: the kill grace (500 ms) then SIGKILL ended it.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_gone(pid);
}

#[test]
fn eof_on_the_channel_stops_a_cooperative_command_with_sigterm() {
    // SIGKILL would come 60 s after SIGTERM: ending well before is SIGTERM's doing,
    // however slow a loaded machine is.
    let config = ExecConfig {
        kill_grace: Duration::from_secs(60),
        ..ExecConfig::default()
    };
    let mut sup = start_with("echo pid:$$; exec sleep 30", config);
    let pid: i32 = sup.wait_progress_prefix("pid:").parse().unwrap();
    let (code, took) = sup.hang_up();
    assert_eq!(code, exec::EXIT_FAILED);
    assert!(
        took < Duration::from_secs(20),
        "SIGTERM was enough: {took:?}"
    );
    assert_gone(pid);
}

#[test]
fn garbage_from_agentd_is_treated_like_eof() {
    let mut sup = start("echo pid:$$; exec sleep 30");
    let pid: i32 = sup.wait_progress_prefix("pid:").parse().unwrap();
    sup.stream
        .write_all(&[0xff, 0xff, 0xff, 0xf0, 1, 2, 3, 4])
        .unwrap();
    let agent = sup.agent.take().unwrap();
    let code = agent.join().unwrap();
    assert_eq!(code, exec::EXIT_FAILED);
    assert_gone(pid);
    // agent-exec closed its end without sending a result.
    assert_eq!(sup.next(), None);
}

/// agentd reads slowly (it is busy, or the machine is loaded): the command has long
/// exited while its output still waits in the pipe behind a full channel. All of it
/// is relayed, in order, before the result.
#[test]
fn output_still_in_the_pipe_when_the_command_exits_is_all_relayed_before_the_result() {
    // 48894 bytes: all in the pipe at once, so the command exits at once, while
    // agent-exec's channel is full after a few hundred lines.
    let sup = start("seq 1 10000");
    // Read nothing for longer than agent-exec's drain time after the exit.
    std::thread::sleep(Duration::from_secs(2));
    let (result, code, progress) = sup.finish();
    assert_eq!(code, 0);
    let expected: Vec<String> = (1..=10000).map(|n| n.to_string()).collect();
    assert!(
        progress == expected,
        "{} progress lines, the last {:?}",
        progress.len(),
        progress.last()
    );
    assert!(result.text.ends_with("9999\n10000"), "{:?}", result.text);
}

#[test]
fn background_processes_holding_the_pipes_are_killed_after_the_command_exits() {
    let t = Instant::now();
    let mut sup = start("sleep 30 & echo bg:$!; echo hi");
    let bg: i32 = sup.wait_progress_prefix("bg:").parse().unwrap();
    let (result, code, _) = sup.finish();
    // Not after the background sleep's 30 s.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(code, 0);
    assert!(result.text.ends_with("hi"), "{:?}", result.text);
    assert_gone(bg);
}

#[test]
fn a_command_that_cannot_start_fails_with_127() {
    let config = ExecConfig {
        command: vec!["/nonexistent/agentd-no-such-program".into(), "arg".into()],
        ..ExecConfig::default()
    };
    let (result, code, _) = start_with("ignored", config).finish();
    assert_eq!(code, exec::EXIT_CANNOT_RUN);
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(result.command_exit, None);
    assert_eq!(
        result.text,
        "cannot run `/nonexistent/agentd-no-such-program`: No such file or directory"
    );
}

#[test]
fn an_explicit_command_line_is_run_as_given() {
    let config = ExecConfig {
        command: vec![
            "printf".into(),
            "%s|%s\\n".into(),
            "a b".into(),
            "{c}".into(),
        ],
        ..ExecConfig::default()
    };
    let (result, code, _) = start_with("task text", config).finish();
    assert_eq!(code, 0);
    assert_eq!(result.text, "a b|{c}");
}

#[test]
fn the_command_gets_the_task_env_but_no_ipc_socket() {
    let script = r#"echo "env:$AGENTD_TASK_ID/$AGENTD_SESSION/${AGENTD_IPC_FD:-unset}"
        for f in /proc/$$/fd/*; do echo "fd:$(readlink "$f")"; done
        echo "pgid:$(cut -d' ' -f5 /proc/$$/stat) pid:$$"
        echo "sigmask:$(grep SigBlk /proc/$$/status | cut -f2)""#;
    let sup = start(script);
    let agent_socket = sup.agent_socket.clone();
    let (result, code, progress) = sup.finish();
    assert_eq!(code, 0, "{}", result.text);
    assert!(
        progress.contains(&"env:task-1/sess-1/unset".to_string()),
        "{progress:?}"
    );
    let fds: Vec<_> = progress.iter().filter(|p| p.starts_with("fd:")).collect();
    assert!(!fds.is_empty());
    assert!(
        fds.iter().all(|f| !f.contains(&agent_socket)),
        "a socket leaked into the command: {fds:?}"
    );
    let ids = progress.iter().find(|p| p.starts_with("pgid:")).unwrap();
    let (pgid, pid) = ids.split_once(' ').unwrap();
    assert_eq!(
        &pgid[5..],
        &pid[4..],
        "the command leads its own group: {ids}"
    );
    assert!(
        progress.contains(&"sigmask:0000000000000000".to_string()),
        "{progress:?}"
    );
}

#[test]
fn the_result_is_the_bounded_tail_and_long_lines_are_cut() {
    let config = ExecConfig {
        result_bytes: 10,
        ..ExecConfig::default()
    };
    let script = "head -c 10000 /dev/zero | tr '\\0' a; echo; seq 1 1000";
    let (result, code, progress) = start_with(script, config).finish();
    assert_eq!(code, 0);
    assert!(result.text.len() <= 10, "{:?}", result.text);
    assert!(result.text.ends_with("999\n1000"), "{:?}", result.text);
    let long = &progress[0];
    assert_eq!(long.len(), MAX_LINE_BYTES + CUT_MARKER.len());
    assert!(long.ends_with(CUT_MARKER));
    assert_eq!(progress.len(), 1001);
}

/// A tail asked for beyond what one frame holds (`--result-bytes 8000000`) made
/// the Result frame too large to send: the task ended without a result, however
/// well its command did. The tail is kept within [`MAX_RESULT_BYTES`].
#[test]
fn a_result_tail_larger_than_a_frame_is_kept_within_the_limit_and_sent() {
    let config = ExecConfig {
        result_bytes: 8_000_000,
        ..ExecConfig::default()
    };
    let (result, code, _) = start_with("seq 1 800000", config).finish();
    assert_eq!(code, 0);
    assert_eq!(result.outcome, Outcome::Succeeded);
    assert!(
        result.text.len() <= MAX_RESULT_BYTES,
        "{}",
        result.text.len()
    );
    assert!(
        result.text.ends_with("799999\n800000"),
        "{:?}",
        &result.text[result.text.len() - 20..]
    );
}

#[test]
fn a_resumed_command_finds_its_checkpoint_in_the_environment_and_a_file() {
    let script = r#"echo "resuming:${AGENTD_RESUMING:-0} prev:${AGENTD_PREVIOUS_TASK_ID:-}"
        echo "env-bytes:${#AGENTD_CHECKPOINT} file-bytes:$(wc -c < "$AGENTD_CHECKPOINT_FILE")"
        echo "file:$AGENTD_CHECKPOINT_FILE""#;
    let resume = |checkpoint: String| SupervisorMsg::Resume {
        previous_task_id: "task-0".into(),
        checkpoint: Some(checkpoint),
    };
    // Small: in the variable and the file. Large: only in the file.
    for (size, env_bytes) in [(10, 10), (exec::MAX_CHECKPOINT_ENV_BYTES + 1, 0)] {
        let sup = start_after(&[resume("c".repeat(size))], script, ExecConfig::default());
        let (result, code, progress) = sup.finish();
        assert_eq!(code, 0, "{result:?}");
        assert_eq!(progress[0], "resuming:1 prev:task-0");
        assert_eq!(
            progress[1],
            format!("env-bytes:{env_bytes} file-bytes:{size}")
        );
        let file = progress[2].strip_prefix("file:").unwrap();
        assert!(
            !std::path::Path::new(file).exists(),
            "the checkpoint file outlived the command: {file}"
        );
    }
    // Not resumed: none of it.
    let (_, _, progress) =
        start("echo \"resuming:${AGENTD_RESUMING:-0} ${AGENTD_CHECKPOINT_FILE:-nofile}\"").finish();
    assert_eq!(progress, ["resuming:0 nofile"]);
}
