//! The fallback's cheap emptiness check: as a subreaper whose only children are
//! tracked agents, an exited task is empty without a search; an orphan that came
//! back to us must still be found and killed. Its own test binary, because being a
//! subreaper is a property of the whole process.

mod common;

use agentd_proc::{become_subreaper, reap_children, Killer, KillerOptions, Procs, TreeReport};
use common::*;

#[test]
fn orphans_that_came_back_are_found_and_a_clean_exit_is_empty() {
    become_subreaper().unwrap();
    let procs = Procs::process_tree("forced by the test");
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();

    let clean = procs.spawn(&command(tid("t-sub-clean"), "exit 0")).unwrap();
    guard.child(clean.pid);
    killer.track(clean.procs);
    let pid = clean.pid;
    wait_until("the clean agent is reaped", || ProcGuard::try_reap(pid));
    killer.agent_exited(tid("t-sub-clean"));
    assert_eq!(
        next_empty(&reports),
        TreeReport::Empty {
            task_id: tid("t-sub-clean").into(),
            killed: 0,
            survivors: vec![]
        }
    );

    // The agent exits; its double-forked child is re-parented to us.
    let messy = procs
        .spawn(&command(
            tid("t-sub-messy"),
            r#"(sh -c 'echo "orphan $$" >&3; exec sleep 300' &); echo "agent $$" >&3"#,
        ))
        .unwrap();
    guard.child(messy.pid);
    killer.track(messy.procs);
    let pids = read_pids(messy.channel, &["agent", "orphan"]);
    let orphan = pid_of(&pids, "orphan");
    guard.child(orphan);
    let pid = messy.pid;
    wait_until("the messy agent is reaped", || ProcGuard::try_reap(pid));
    wait_until("the orphan is our child", || {
        parent_of(orphan) == Some(std::process::id())
    });
    killer.agent_exited(tid("t-sub-messy"));
    match next_empty(&reports) {
        TreeReport::Empty {
            task_id,
            killed,
            survivors,
        } => {
            assert_eq!(task_id, tid("t-sub-messy"));
            assert_eq!(killed, 1);
            assert!(survivors.is_empty(), "{survivors:?}");
        }
        other => panic!("{other:?}"),
    }
    wait_until("the orphan is reaped", || {
        reap_children().iter().any(|r| r.pid == orphan) || !alive(orphan)
    });
}
