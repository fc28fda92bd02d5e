//! agentd killed with SIGKILL while a task tree with detached escapees runs: its
//! guardian kills the task cgroups and removes them. The "agentd" is a re-executed
//! copy of this test binary, so that it can really be SIGKILLed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use agentd_proc::{CgroupOptions, Cgroups, Procs};
use common::*;

const CHILD_ENV: &str = "AGENTD_PROC_GUARDIAN_PARENT";

#[test]
fn when_agentd_is_killed_its_guardian_kills_the_task_cgroups() {
    if let Some(parent) = std::env::var_os(CHILD_ENV) {
        // The doomed agentd.
        let cgroups = Cgroups::under(parent.as_ref(), &CgroupOptions::new("inst")).unwrap();
        let mut procs = Procs::with_cgroups(cgroups);
        let guardian = procs.start_guardian().unwrap().unwrap();
        // libtest has written "test <name> ... " without a newline.
        println!();
        println!("guardian {guardian}");
        let spawned = procs.spawn(&command("t-orphaned", ESCAPEES)).unwrap();
        for (kind, pid) in read_pids(spawned.channel, &["agent", "setsid", "double", "scrubbed"]) {
            println!("{kind} {pid}");
        }
        println!("ready 0");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    let Some(parent) = TestCgroupParent::new("guardian") else {
        return;
    };
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "when_agentd_is_killed_its_guardian_kills_the_task_cgroups",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &parent.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut guard = ProcGuard::default();
    let mut agentd = child.spawn().unwrap();
    guard.child(agentd.id());
    let mut pids = Vec::new();
    for line in BufReader::new(agentd.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let Some((kind, pid)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if kind == "ready" {
            break;
        }
        guard.watch(pid);
        pids.push((kind.to_owned(), pid));
    }
    assert_eq!(pids.len(), 5, "{pids:?}");
    let instance = parent.path.join("inst");
    assert!(instance.join("task-t-orphaned").exists());

    agentd.kill().unwrap();
    agentd.wait().unwrap();
    for (kind, pid) in &pids {
        wait_until(&format!("{kind} {pid} is gone"), || !alive(*pid));
    }
    wait_until("the instance cgroup is removed", || !instance.exists());
    let guardian_dir = parent.path.join("inst.guardian");
    wait_until("the guardian removed its own cgroup", || {
        !guardian_dir.exists()
    });

    // The next agentd of this instance starts its own guardian in the old one's
    // cgroup first, then recovers (finding nothing left) without waiting for its
    // own guardian to finish (the wait for the previous one is up to 5 s).
    let mut next = Procs::with_cgroups(parent.cgroups("inst"));
    let guardian = next.start_guardian().unwrap().unwrap();
    guard.child(guardian);
    let recovering = std::time::Instant::now();
    assert!(next.recover().is_empty());
    assert!(
        recovering.elapsed() < std::time::Duration::from_secs(4),
        "recovery waited for its own guardian: {:?}",
        recovering.elapsed()
    );
    let dir = next.cgroups().unwrap().guardian_dir();
    assert_eq!(
        cgroup_of(guardian),
        format!("/{}", dir.strip_prefix(UNIFIED).unwrap().display())
    );
    // A clean exit ends the guardian and removes both cgroups.
    next.shutdown().unwrap();
    wait_until("the guardian has exited", || !alive(guardian));
    assert!(!dir.exists());
    assert!(!parent.path.join("inst").exists());
}

#[test]
fn the_process_tree_fallback_has_no_guardian() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    assert_eq!(Procs::process_tree("test").start_guardian().unwrap(), None);
}

#[test]
fn recovery_waits_for_the_previous_guardian_to_finish() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let Some(parent) = TestCgroupParent::new("guardian-wait") else {
        return;
    };
    let cgroups = parent.cgroups("inst");
    // A stand-in for the old guardian, still at work in its cgroup; it quits on its own.
    let dir = cgroups.guardian_dir();
    std::fs::create_dir(&dir).unwrap();
    let procs_file = dir.join("cgroup.procs");
    let mut old = std::process::Command::new("sh")
        .args(["-c", "echo $$ > \"$1\"; sleep 0.3", "old-guardian"])
        .arg(&procs_file)
        .spawn()
        .unwrap();
    let mut guard = ProcGuard::default();
    guard.child(old.id());
    wait_until("the old guardian is in its cgroup", || {
        std::fs::read_to_string(&procs_file).is_ok_and(|p| !p.trim().is_empty())
    });
    assert!(cgroups
        .recover(std::time::Duration::from_secs(20))
        .is_empty());
    assert!(
        old.try_wait().unwrap().is_some(),
        "recover returned while the old guardian still ran"
    );
}

/// The previous guardian removes the instance directory as its last act, possibly
/// after the next agentd found (or made) it: recovery leaves it in place for the
/// next agentd's tasks.
#[test]
fn after_recovery_tasks_can_be_created_though_the_old_guardian_removed_the_instance() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let Some(parent) = TestCgroupParent::new("guardian-rmdir") else {
        return;
    };
    let cgroups = parent.cgroups("inst");
    let dir = cgroups.guardian_dir();
    std::fs::create_dir(&dir).unwrap();
    let procs_file = dir.join("cgroup.procs");
    // Like the real guardian's end: the instance directory goes, then it quits.
    let mut old = std::process::Command::new("sh")
        .args([
            "-c",
            "echo $$ > \"$1\"; sleep 0.3; rmdir \"$2\"",
            "old-guardian",
        ])
        .arg(&procs_file)
        .arg(cgroups.root())
        .spawn()
        .unwrap();
    let mut guard = ProcGuard::default();
    guard.child(old.id());
    wait_until("the old guardian is in its cgroup", || {
        std::fs::read_to_string(&procs_file).is_ok_and(|p| !p.trim().is_empty())
    });
    assert!(cgroups
        .recover(std::time::Duration::from_secs(20))
        .is_empty());
    let _ = old.wait();
    let task = cgroups
        .create_task("t-after")
        .expect("a task cgroup after recovery");
    task.remove().unwrap();
}
