//! Task cgroups on a real cgroup v2 hierarchy: every escapee is born inside and killed,
//! a normal exit is seen without a /proc scan, cgroups are removed after, and a later
//! agentd recovers what a crashed one left. Skipped (with a note) where no writable
//! cgroup v2 hierarchy exists.

mod common;

use std::path::Path;

use agentd_proc::{Containment, Killer, KillerOptions, Procs, TreeReport};
use common::*;
use nix::sys::signal::Signal;

#[test]
fn every_escapee_is_born_in_the_task_cgroup_and_killed_with_it() {
    let Some(parent) = TestCgroupParent::new("escapees") else {
        return;
    };
    let procs = Procs::with_cgroups(parent.cgroups("inst"));
    assert!(matches!(procs.containment(), Containment::Cgroup { .. }));
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();

    let spawned = procs.spawn(&command("t-escapees", ESCAPEES)).unwrap();
    guard.child(spawned.pid);
    let cgroup_dir = spawned.procs.cgroup().unwrap().path().to_path_buf();
    let rel = format!(
        "/{}",
        cgroup_dir.strip_prefix(UNIFIED).unwrap().to_str().unwrap()
    );
    killer.track(spawned.procs);
    let pids = read_pids(spawned.channel, &["agent", "setsid", "double", "scrubbed"]);
    for (_, pid) in &pids {
        guard.watch(*pid);
    }
    for (kind, pid) in &pids {
        assert_eq!(
            cgroup_of(*pid),
            rel,
            "{kind} {pid} is not in the task cgroup"
        );
    }

    killer.kill("t-escapees");
    match next_report(&reports) {
        TreeReport::Signalled {
            signal, processes, ..
        } => {
            assert_eq!(signal, Signal::SIGKILL);
            assert!(processes >= 4, "cgroup.kill reached {processes}");
        }
        other => panic!("{other:?}"),
    }
    let agent = spawned.pid;
    wait_until("the agent is reaped", || ProcGuard::try_reap(agent));
    killer.agent_exited("t-escapees");
    match next_empty(&reports) {
        TreeReport::Empty {
            task_id,
            killed,
            survivors,
        } => {
            assert_eq!(task_id, "t-escapees");
            assert!(killed >= 4, "{killed}");
            assert!(survivors.is_empty(), "{survivors:?}");
        }
        other => panic!("{other:?}"),
    }
    for (kind, pid) in &pids {
        assert!(!alive(*pid), "{kind} {pid} survived");
    }
    assert!(!cgroup_dir.exists(), "the task cgroup was not removed");
}

#[test]
fn a_normal_exit_is_empty_at_once_and_leftovers_are_killed() {
    let Some(parent) = TestCgroupParent::new("exit") else {
        return;
    };
    let mut procs = Procs::with_cgroups(parent.cgroups("inst"));
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();

    // An agent that exits cleanly.
    let clean = procs.spawn(&command("t-clean", "exit 0")).unwrap();
    guard.child(clean.pid);
    let clean_dir = clean.procs.cgroup().unwrap().path().to_path_buf();
    killer.track(clean.procs);
    let pid = clean.pid;
    wait_until("the clean agent is reaped", || ProcGuard::try_reap(pid));
    killer.agent_exited("t-clean");
    assert_eq!(
        next_empty(&reports),
        TreeReport::Empty {
            task_id: "t-clean".into(),
            killed: 0,
            survivors: vec![]
        }
    );
    assert!(!clean_dir.exists());

    // An agent that exits leaving a nohup'd, setsid'd child behind.
    let messy = procs
        .spawn(&command(
            "t-messy",
            r#"setsid nohup sh -c 'echo "left $$" >&3; exec sleep 300' >/dev/null 2>&1 &
               echo "agent $$" >&3"#,
        ))
        .unwrap();
    guard.child(messy.pid);
    let messy_dir = messy.procs.cgroup().unwrap().path().to_path_buf();
    killer.track(messy.procs);
    let pids = read_pids(messy.channel, &["agent", "left"]);
    let left = pid_of(&pids, "left");
    guard.watch(left);
    let pid = messy.pid;
    wait_until("the messy agent is reaped", || ProcGuard::try_reap(pid));
    assert!(
        alive(left),
        "the leftover should still run before agent_exited"
    );
    killer.agent_exited("t-messy");
    match next_empty(&reports) {
        TreeReport::Empty {
            task_id,
            killed,
            survivors,
        } => {
            assert_eq!(task_id, "t-messy");
            assert_eq!(killed, 1);
            assert!(survivors.is_empty(), "{survivors:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!alive(left), "the leftover {left} survived");
    assert!(!messy_dir.exists());

    // A task the killer never heard of is empty at once.
    killer.agent_exited("t-unknown");
    assert!(matches!(
        next_empty(&reports),
        TreeReport::Empty { task_id, .. } if task_id == "t-unknown"
    ));

    // A spawn that fails leaves no cgroup behind; a name that cannot be a cgroup
    // fails before anything runs.
    let mut missing = command("t-missing", "");
    missing.program = "/nonexistent/agent".into();
    assert!(procs.spawn(&missing).is_err());
    assert!(!procs
        .cgroups()
        .unwrap()
        .root()
        .join("task-t-missing")
        .exists());
    assert!(procs.spawn(&command("../escape", "exit 0")).is_err());

    // A clean shutdown removes the instance directory.
    procs.shutdown().unwrap();
    assert!(!parent.path.join("inst").exists());
}

#[test]
fn an_untracked_normal_exit_is_empty_on_the_spot_and_leftovers_go_to_the_killer() {
    let Some(parent) = TestCgroupParent::new("untracked") else {
        return;
    };
    let procs = Procs::with_cgroups(parent.cgroups("inst"));
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();

    // A clean exit: empty at once, the cgroup removed by the caller, no report sent.
    let clean = procs.spawn(&command("t-clean", "exit 0")).unwrap();
    guard.child(clean.pid);
    let clean_dir = clean.procs.cgroup().unwrap().path().to_path_buf();
    let pid = clean.pid;
    wait_until("the clean agent is reaped", || ProcGuard::try_reap(pid));
    assert_eq!(
        killer.untracked_exited(clean.procs),
        Some(TreeReport::Empty {
            task_id: "t-clean".into(),
            killed: 0,
            survivors: vec![]
        })
    );
    assert!(!clean_dir.exists(), "the empty cgroup was not removed");
    assert!(reports
        .recv_timeout(std::time::Duration::from_millis(200))
        .is_err());

    // An agent that leaves a setsid'd child: the Killer takes the task over, kills
    // the leftover and reports the tree empty.
    let messy = procs
        .spawn(&command(
            "t-messy",
            r#"setsid nohup sh -c 'echo "left $$" >&3; exec sleep 300' >/dev/null 2>&1 &
               echo "agent $$" >&3"#,
        ))
        .unwrap();
    guard.child(messy.pid);
    let messy_dir = messy.procs.cgroup().unwrap().path().to_path_buf();
    let pids = read_pids(messy.channel, &["agent", "left"]);
    let left = pid_of(&pids, "left");
    guard.watch(left);
    let pid = messy.pid;
    wait_until("the messy agent is reaped", || ProcGuard::try_reap(pid));
    assert!(alive(left));
    assert_eq!(killer.untracked_exited(messy.procs), None);
    match next_empty(&reports) {
        TreeReport::Empty {
            task_id,
            killed,
            survivors,
        } => {
            assert_eq!(task_id, "t-messy");
            assert_eq!(killed, 1);
            assert!(survivors.is_empty(), "{survivors:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!alive(left), "the leftover {left} survived");
    assert!(!messy_dir.exists());

    // An empty cgroup with a sub-cgroup the agent made cannot go in one rmdir: the
    // Killer removes the tree.
    let script = format!(
        r#"d={UNIFIED}$(grep '^0::' /proc/self/cgroup | cut -d: -f3)
           mkdir "$d/sub" && echo "made 0" >&3"#
    );
    let nested = procs.spawn(&command("t-nested", &script)).unwrap();
    guard.child(nested.pid);
    let nested_dir = nested.procs.cgroup().unwrap().path().to_path_buf();
    read_pids(nested.channel, &["made"]);
    let pid = nested.pid;
    wait_until("the nesting agent is reaped", || ProcGuard::try_reap(pid));
    assert_eq!(killer.untracked_exited(nested.procs), None);
    assert!(matches!(
        next_empty(&reports),
        TreeReport::Empty { task_id, survivors, .. } if task_id == "t-nested" && survivors.is_empty()
    ));
    assert!(
        !nested_dir.exists(),
        "{} was left behind",
        nested_dir.display()
    );
}

#[test]
fn sigterm_reaches_every_process_of_the_cgroup_and_wakes_stopped_ones() {
    let Some(parent) = TestCgroupParent::new("term") else {
        return;
    };
    let procs = Procs::with_cgroups(parent.cgroups("inst"));
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();
    // The scrubbed grandchild stops itself: only a SIGCONT after the SIGTERM ends it.
    let script = r#"
        echo "agent $$" >&3
        (setsid env -i sh -c 'echo "scrubbed $$" >&3; kill -STOP $$; exec sleep 300' &)
        exec sleep 300
    "#;
    let spawned = procs.spawn(&command("t-term", script)).unwrap();
    guard.child(spawned.pid);
    let members = spawned.procs.cgroup().unwrap().path().join("cgroup.procs");
    killer.track(spawned.procs);
    let pids = read_pids(spawned.channel, &["agent", "scrubbed"]);
    let scrubbed = pid_of(&pids, "scrubbed");
    guard.watch(scrubbed);
    wait_until("the grandchild is stopped", || {
        state_of(scrubbed) == Some('T')
    });
    // The `( … &)` subshell that started it may still be exiting: wait until the
    // cgroup holds only the agent and the grandchild.
    wait_until("the subshell has exited", || {
        std::fs::read_to_string(&members).is_ok_and(|m| m.lines().count() == 2)
    });
    killer.signal("t-term", Signal::SIGTERM);
    match next_report(&reports) {
        TreeReport::Signalled { processes, .. } => assert_eq!(processes, 2),
        other => panic!("{other:?}"),
    }
    let agent = spawned.pid;
    wait_until("the agent is reaped", || ProcGuard::try_reap(agent));
    wait_until("the stopped grandchild ended on SIGTERM", || {
        !alive(scrubbed)
    });
    killer.agent_exited("t-term");
    assert!(matches!(
        next_empty(&reports),
        TreeReport::Empty { killed: 0, .. }
    ));
}

#[test]
fn a_later_instance_recovers_what_a_crashed_one_left() {
    let Some(parent) = TestCgroupParent::new("recover") else {
        return;
    };
    let mut guard = ProcGuard::default();
    let (agent, pids, task_dir) = {
        // The "crashed" agentd: it spawns, then vanishes without stopping anything.
        let procs = Procs::with_cgroups(parent.cgroups("inst"));
        let spawned = procs.spawn(&command("t-old", ESCAPEES)).unwrap();
        guard.child(spawned.pid);
        let dir = spawned.procs.cgroup().unwrap().path().to_path_buf();
        let pids = read_pids(spawned.channel, &["agent", "setsid", "double", "scrubbed"]);
        for (_, pid) in &pids {
            guard.watch(*pid);
        }
        (spawned.pid, pids, dir)
    };
    assert!(task_dir.exists());

    let procs = Procs::with_cgroups(parent.cgroups("inst"));
    let other = Procs::with_cgroups(parent.cgroups("other-instance"));
    let left = procs.recover();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].cgroup, task_dir);
    assert!(left[0].removed);
    let mut found = left[0].pids.clone();
    found.sort_unstable();
    let mut expected: Vec<u32> = pids.iter().map(|(_, p)| *p).collect();
    expected.sort_unstable();
    assert_eq!(found, expected);
    for (kind, pid) in &pids {
        assert!(!alive(*pid), "{kind} {pid} survived the recovery");
    }
    assert!(!task_dir.exists());
    assert!(other.recover().is_empty());
    wait_until("the old agent is reaped", || ProcGuard::try_reap(agent));
    assert!(Path::new(&parent.path).join("inst").exists());
}

#[test]
fn a_fork_storm_is_killed_whole_while_it_forks() {
    let Some(parent) = TestCgroupParent::new("storm") else {
        return;
    };
    let procs = Procs::with_cgroups(parent.cgroups("inst"));
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();
    // Double-forked, so nothing waits for them; bounded to a few hundred processes.
    let script = r#"
        echo "agent $$" >&3
        i=0
        while [ $i -lt 400 ]; do (sleep 300 &); i=$((i+1)); done
        exec sleep 300
    "#;
    let spawned = procs.spawn(&command("t-storm", script)).unwrap();
    guard.child(spawned.pid);
    let cgroup = spawned.procs.cgroup().unwrap().path().to_path_buf();
    killer.track(spawned.procs);
    read_pids(spawned.channel, &["agent"]);
    let count = || {
        std::fs::read_to_string(cgroup.join("cgroup.procs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    wait_until("the storm has begun", || count() >= 20);
    killer.kill("t-storm");
    let agent = spawned.pid;
    wait_until("the agent is reaped", || ProcGuard::try_reap(agent));
    killer.agent_exited("t-storm");
    match next_empty(&reports) {
        TreeReport::Empty { survivors, .. } => assert!(survivors.is_empty(), "{survivors:?}"),
        other => panic!("{other:?}"),
    }
    assert!(!cgroup.exists(), "the storm's cgroup is still there");
}

#[test]
fn an_agent_that_cannot_enter_its_cgroup_never_runs() {
    let Some(parent) = TestCgroupParent::new("enter") else {
        return;
    };
    let cgroups = parent.cgroups("inst");
    let task = cgroups.create_task("t-gone").unwrap();
    // The cgroup goes away after its cgroup.procs was opened: the child's write into
    // it fails, before anything else happens in the child.
    task.remove().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let script = format!("touch {}", marker.display());
    let err = agentd_proc::spawn_agent_in(&command("t-gone", &script), Some(&task)).unwrap_err();
    assert!(err.to_string().contains("cannot enter the cgroup"), "{err}");
    assert!(!marker.exists(), "the agent ran outside its cgroup");
}

#[test]
fn sub_cgroups_an_agent_made_are_removed_with_its_cgroup() {
    let Some(parent) = TestCgroupParent::new("nested") else {
        return;
    };
    let procs = Procs::with_cgroups(parent.cgroups("inst"));
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let mut guard = ProcGuard::default();
    let script = format!(
        r#"d={UNIFIED}$(grep '^0::' /proc/self/cgroup | cut -d: -f3)
           mkdir "$d/sub" && mkdir "$d/sub/deeper" && echo "made 0" >&3"#
    );
    let agent = procs.spawn(&command("t-nested", &script)).unwrap();
    guard.child(agent.pid);
    let dir = agent.procs.cgroup().unwrap().path().to_path_buf();
    killer.track(agent.procs);
    read_pids(agent.channel, &["made"]);
    assert!(dir.join("sub/deeper").is_dir());
    let pid = agent.pid;
    wait_until("the agent is reaped", || ProcGuard::try_reap(pid));
    killer.agent_exited("t-nested");
    assert!(matches!(
        next_empty(&reports),
        TreeReport::Empty { task_id, .. } if task_id == "t-nested"
    ));
    assert!(!dir.exists(), "{} was left behind", dir.display());
}
