//! Spawns a real process tree through `spawn_agent` and proves that `TaskTree` finds
//! every member (including one that left the session with `setsid`), that signalling
//! ends them all, that nothing but the IPC channel is inherited, and that the reaper
//! sees the agent's exit. One test function, because `reap_children` waits for any
//! child of this process.

use std::io::Read;
use std::time::{Duration, Instant};

use agentd_proc::{reap_children, spawn_agent, AgentCommand, TaskTree};

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn spawned_tree_is_found_signalled_and_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let script = r#"
        ls /proc/self/fd | tr '\n' ' ' >&3
        echo "pgid=$(cut -d" " -f5 /proc/$$/stat) ipc=$AGENTD_IPC_FD task=$AGENTD_TASK_ID" >&3
        exec 3>&-
        sleep 100 &
        setsid sh -c 'sleep 101' &
        wait
    "#;
    let agent = spawn_agent(&AgentCommand {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        task_id: "test-task-1".into(),
        session: "s".into(),
        log_path: Some(log.clone()),
        capture_output: false,
        env: Vec::new(),
    })
    .unwrap();

    let mut reported = String::new();
    let mut channel = agent.channel;
    channel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    channel.read_to_string(&mut reported).unwrap();
    // Only stdin, stdout, stderr, the IPC channel (and ls's own directory fd 4).
    let fds: Vec<u32> = reported
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        fds.iter().all(|fd| *fd <= 4),
        "leaked descriptors: {reported}"
    );
    assert!(
        reported.contains(&format!("pgid={}", agent.pid)),
        "{reported}"
    );
    assert!(reported.contains("ipc=3 task=test-task-1"), "{reported}");

    let tree = TaskTree::new(agent.pid, "test-task-1");
    // sh, sleep 100, the setsid'd sh and its sleep 101.
    wait_until("4 processes are in the tree", || tree.members().len() >= 4);
    let members = tree.members();
    assert!(members.contains(&agent.pid));

    let left = tree.kill_all(true, 50);
    assert!(left.is_empty(), "survivors: {left:?}");
    let mut reaped = Vec::new();
    wait_until("the agent is reaped", || {
        reaped.extend(reap_children());
        reaped.iter().any(|r| r.pid == agent.pid)
    });
    let agent_exit = reaped.iter().find(|r| r.pid == agent.pid).unwrap();
    assert_eq!(agent_exit.signal, Some(libc::SIGKILL));
    for pid in members {
        assert!(!agentd_proc::process_exists(pid), "process {pid} survived");
    }
}
