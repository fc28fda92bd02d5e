//! Once an agent is reaped its pid may belong to someone else: the task's leftover
//! processes are then found by their `AGENTD_TASK_ID` marker only, never through the
//! old pid's descendants or process group.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use agentd_proc::TaskTree;

fn wait_until<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = cond() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live children of `pid`, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let mut fields = stat[stat.rfind(')').unwrap() + 1..].split_whitespace();
        let state = fields.next().unwrap_or("Z");
        if fields.next().and_then(|p| p.parse().ok()) == Some(pid) && state != "Z" {
            out.push(child);
        }
    }
    out
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().unwrap().is_none()
}

#[test]
fn a_reaped_agents_old_pid_group_and_descendants_are_left_alone() {
    // A stranger that got the reaped agent's pid: a group leader with a child.
    let mut stranger = Command::new("sh")
        .args(["-c", "sleep 60 & wait"])
        .process_group(0)
        .spawn()
        .unwrap();
    let grandchild = wait_until("the stranger's child runs", || {
        children_of(stranger.id()).first().copied()
    });
    // What the task left behind: a process carrying the task's marker.
    let mut leftover = Command::new("sleep")
        .arg("60")
        .env("AGENTD_TASK_ID", "task-reaped-1")
        .spawn()
        .unwrap();

    let tree = TaskTree::new(stranger.id(), "task-reaped-1");
    let left = tree.kill_all(false, 10);
    assert!(left.is_empty(), "left: {left:?}");
    let status = leftover.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let stranger_alive = alive(&mut stranger);
    let grandchild_alive = children_of(stranger.id()).contains(&grandchild);
    // Clean up before asserting.
    let _ = nix_kill(grandchild);
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(
        stranger_alive,
        "the process now holding the old pid was killed"
    );
    assert!(
        grandchild_alive,
        "a member of the old pid's group was killed"
    );
}

fn nix_kill(pid: u32) -> i32 {
    // SAFETY: kill(2) on a pid this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) }
}
