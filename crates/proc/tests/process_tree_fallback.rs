//! The process-tree fallback (forced, as on a host without a writable cgroup): what it
//! catches, the limit it documents, PID-safe signalling, and a 300-process stop done
//! by the Killer thread.

mod common;

use agentd_proc::{spawn_agent_in, Containment, Killer, KillerOptions, Procs, TreeReport};
use common::*;
use nix::sys::signal::Signal;

fn fallback() -> Procs {
    Procs::process_tree("forced by the test")
}

/// The tests of this file one at a time: a tree search also counts every exiting
/// child of this process (agentd here) younger than the agent, which another test's
/// dying process is (so `a_signal_after_the_agent_was_reaped_reaches_nothing` saw
/// processes that were not its own about 1 run in 6).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn fallback_catches_setsid_and_marked_orphans_but_not_scrubbed_double_forks() {
    let _serial = one_at_a_time();
    let procs = fallback();
    assert_eq!(
        procs.containment(),
        Containment::ProcessTree {
            reason: "forced by the test".into()
        }
    );
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();
    let spawned = procs.spawn(&command(tid("t-fallback"), ESCAPEES)).unwrap();
    guard.child(spawned.pid);
    assert!(spawned.procs.cgroup().is_none());
    killer.track(spawned.procs);
    let pids = read_pids(spawned.channel, &["agent", "setsid", "double", "scrubbed"]);
    for (_, pid) in &pids {
        guard.watch(*pid);
    }
    // The double forks have left the tree only once their middle process exited,
    // which a loaded machine may not have run yet: while it lives, the scrubbed
    // one is still found by its parent links.
    for kind in ["double", "scrubbed"] {
        let pid = pid_of(&pids, kind);
        wait_until(&format!("{kind} {pid} has left the agent's tree"), || {
            !descends_from(pid, spawned.pid)
        });
    }

    killer.kill(tid("t-fallback"));
    let agent = spawned.pid;
    wait_until("the agent is reaped", || ProcGuard::try_reap(agent));
    killer.agent_exited(tid("t-fallback"));
    match next_empty(&reports) {
        TreeReport::Empty { survivors, .. } => assert!(survivors.is_empty(), "{survivors:?}"),
        other => panic!("{other:?}"),
    }
    for kind in ["agent", "setsid", "double"] {
        let pid = pid_of(&pids, kind);
        assert!(!alive(pid), "{kind} {pid} survived the fallback");
    }
    // The documented limit: it left the tree and carries no task id. (The guard
    // kills it.) With a cgroup it is killed: see cgroup_containment.rs.
    let scrubbed = pid_of(&pids, "scrubbed");
    assert!(
        alive(scrubbed),
        "the fallback caught the scrubbed double fork: update its documented limit"
    );
}

#[test]
fn a_reaped_agent_is_never_signalled_through_its_pidfd() {
    let _serial = one_at_a_time();
    let mut guard = ProcGuard::default();
    let (agent, pidfd) = spawn_agent_in(&command(tid("t-pidfd"), "exit 3"), None).unwrap();
    guard.child(agent.pid);
    let pidfd = pidfd.expect("pidfd_open works on this kernel");
    let pid = agent.pid;
    wait_until("the agent is a zombie", || state_of(pid) == Some('Z'));
    // Unreaped, its pid is still its own: signalling is allowed (and harmless).
    assert!(pidfd.is_alive());
    assert!(pidfd.signal(Signal::SIGTERM).is_ok());
    wait_until("the agent is reaped", || ProcGuard::try_reap(pid));
    // Reaped: the pidfd refuses, whatever process may get the number next.
    assert!(!pidfd.is_alive());
    let err = pidfd.signal(Signal::SIGTERM).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
}

#[test]
fn a_signal_after_the_agent_was_reaped_reaches_nothing() {
    let _serial = one_at_a_time();
    let procs = fallback();
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();
    let spawned = procs.spawn(&command(tid("t-late"), "exit 0")).unwrap();
    guard.child(spawned.pid);
    killer.track(spawned.procs);
    let pid = spawned.pid;
    wait_until("the agent is reaped", || ProcGuard::try_reap(pid));
    killer.signal(tid("t-late"), Signal::SIGTERM);
    assert_eq!(
        next_report(&reports),
        TreeReport::Signalled {
            task_id: tid("t-late").into(),
            signal: Signal::SIGTERM,
            processes: 0
        }
    );
    killer.kill(tid("t-late"));
    assert_eq!(
        next_report(&reports),
        TreeReport::Signalled {
            task_id: tid("t-late").into(),
            signal: Signal::SIGKILL,
            processes: 0
        }
    );
    killer.kill(tid("t-never-tracked"));
    assert!(matches!(
        next_report(&reports),
        TreeReport::Signalled { processes: 0, ref task_id, .. } if task_id == tid("t-never-tracked")
    ));
    killer.agent_exited(tid("t-late"));
    assert!(matches!(
        next_empty(&reports),
        TreeReport::Empty { killed: 0, ref survivors, .. } if survivors.is_empty()
    ));
}

#[test]
fn the_killer_empties_a_300_process_tree_in_rounds() {
    let _serial = one_at_a_time();
    let procs = fallback();
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();
    let script = r#"
        i=0
        while [ $i -lt 300 ]; do sleep 300 & echo "sleep $!" >&3; i=$((i+1)); done
        echo "ready $$" >&3
        wait
    "#;
    let spawned = procs.spawn(&command(tid("t-big"), script)).unwrap();
    guard.child(spawned.pid);
    killer.track(spawned.procs);
    let pids = read_pids(spawned.channel, &["ready"]);
    let sleeps: Vec<u32> = pids
        .iter()
        .filter(|(k, _)| k == "sleep")
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(sleeps.len(), 300);
    for &pid in &sleeps {
        guard.watch(pid);
    }
    killer.kill(tid("t-big"));
    match next_report(&reports) {
        TreeReport::Signalled { processes, .. } => assert!(processes >= 301, "{processes}"),
        other => panic!("{other:?}"),
    }
    let agent = spawned.pid;
    wait_until("the agent is reaped", || ProcGuard::try_reap(agent));
    killer.agent_exited(tid("t-big"));
    match next_empty(&reports) {
        TreeReport::Empty { survivors, .. } => assert!(survivors.is_empty(), "{survivors:?}"),
        other => panic!("{other:?}"),
    }
    let left: Vec<u32> = sleeps.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "survivors: {left:?}");
}

#[test]
fn fallback_sigterm_is_followed_by_sigcont_for_stopped_members() {
    let _serial = one_at_a_time();
    let procs = fallback();
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();
    // A double-forked member (found by its AGENTD_TASK_ID) that stops itself.
    let script = r#"
        echo "agent $$" >&3
        (sh -c 'echo "stopped $$" >&3; kill -STOP $$; exec sleep 300' &)
        exec sleep 300
    "#;
    let spawned = procs.spawn(&command(tid("t-fb-term"), script)).unwrap();
    guard.child(spawned.pid);
    killer.track(spawned.procs);
    let pids = read_pids(spawned.channel, &["agent", "stopped"]);
    let stopped = pid_of(&pids, "stopped");
    guard.watch(stopped);
    wait_until("the member is stopped", || state_of(stopped) == Some('T'));
    // The `( … &)` subshell that started it may still be exiting: wait until the
    // member has left the agent's tree, so the tree is the agent and the member.
    let agent = spawned.pid;
    wait_until("the subshell has exited", || !descends_from(stopped, agent));
    killer.signal(tid("t-fb-term"), Signal::SIGTERM);
    match next_report(&reports) {
        TreeReport::Signalled { processes, .. } => assert_eq!(processes, 2),
        other => panic!("{other:?}"),
    }
    wait_until("the agent is reaped", || ProcGuard::try_reap(agent));
    wait_until("the stopped member ended on SIGTERM", || !alive(stopped));
    killer.agent_exited(tid("t-fb-term"));
    assert!(matches!(
        next_empty(&reports),
        TreeReport::Empty { killed: 0, .. }
    ));
}
