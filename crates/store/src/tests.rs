//! Tests of the store against real files: recovery, de-duplication across reopen,
//! group commit, a writer killed with SIGKILL, corrupt files, a full disk, retention.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::*;

fn open(dir: &Path) -> (Store, Recovery) {
    Store::open(dir, StoreOptions::default()).expect("open store")
}

fn task(session: &str, text: &str) -> TaskRecord {
    TaskRecord::queued(Uuid::now_v7(), session, text, 1_700_000_000_000)
}

fn insert(w: &StoreWriter, t: &TaskRecord, front: bool) -> Outcome {
    w.submit(Op::Insert {
        task: Box::new(t.clone()),
        front,
    })
    .wait()
    .expect("insert")
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(id: Uuid, state: State, at: i64) -> Op {
    Op::Finish {
        id,
        state,
        at,
        progress: None,
        result: Some("done".into()),
        ending: None,
        reason: None,
        exit: Some(Exit {
            code: Some(0),
            signal: None,
        }),
    }
}

#[test]
fn recovery_brings_back_queue_order_ids_and_settings_and_interrupts_active_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let me = ProcessIdentity::capture(std::process::id()).unwrap();
    let (running, a1, a2, a3, b1, b2);
    {
        let (store, recovery) = open(dir.path());
        assert_eq!(recovery.previous_run, PreviousRun::None);
        assert!(recovery.queued.is_empty());
        let w = store.writer();
        running = task("a", "long job");
        insert(&w, &running, false);
        w.submit(Op::Start {
            id: running.id,
            at: 5,
            process: None,
            text: Some("long job, collected".into()),
        })
        .wait()
        .unwrap();
        w.submit(Op::SetProcess {
            id: running.id,
            process: me.clone(),
        })
        .wait()
        .unwrap();
        w.submit(Op::SetState {
            id: running.id,
            state: State::Running,
        })
        .wait()
        .unwrap();
        a1 = task("a", "a1");
        b1 = task("b", "b1");
        a2 = task("a", "a2");
        b2 = task("b", "b2");
        a3 = task("a", "a3 (interrupt)");
        let mut b1_opts = b1.clone();
        b1_opts.mode = "followup".into();
        b1_opts.priority = "background".into();
        b1_opts.options = Some("{\"debounce_ms\":0}".into());
        for (t, front) in [(&a1, false), (&b1_opts, false), (&a2, false), (&b2, false)] {
            assert_eq!(insert(&w, t, front), Outcome::Inserted);
        }
        assert_eq!(insert(&w, &a3, true), Outcome::Inserted);
        w.submit(Op::Settings(SessionSettings {
            session: "b".into(),
            mode: "steer".into(),
            debounce_ms: 2000,
            cap: 25,
            drop_policy: "old".into(),
        }))
        .wait()
        .unwrap();
        w.submit(Op::Settings(SessionSettings {
            session: "c".into(),
            mode: "steer".into(),
            debounce_ms: 0,
            cap: 1,
            drop_policy: "new".into(),
        }))
        .wait()
        .unwrap();
        w.submit(Op::ResetSettings {
            session: "c".into(),
        })
        .wait()
        .unwrap();
        store.close();
    }
    let (store, recovery) = open(dir.path());
    assert_eq!(recovery.previous_run, PreviousRun::Clean);
    let order = |session: &str| -> Vec<Uuid> {
        recovery
            .queued
            .iter()
            .filter(|t| t.session == session)
            .map(|t| t.id)
            .collect()
    };
    assert_eq!(order("a"), vec![a3.id, a1.id, a2.id]);
    assert_eq!(order("b"), vec![b1.id, b2.id]);
    let b1_back = recovery.queued.iter().find(|t| t.id == b1.id).unwrap();
    assert_eq!(b1_back.mode, "followup");
    assert_eq!(b1_back.priority, "background");
    assert_eq!(b1_back.options.as_deref(), Some("{\"debounce_ms\":0}"));
    assert_eq!(b1_back.text, "b1");
    assert_eq!(recovery.interrupted.len(), 1);
    let int = &recovery.interrupted[0];
    assert_eq!(int.id, running.id);
    assert_eq!(int.state, State::Interrupted);
    assert_eq!(int.reason.as_deref(), Some("daemon crashed"));
    assert_eq!(int.process.as_ref(), Some(&me));
    assert_eq!(int.started_at, Some(5));
    assert_eq!(int.text, "long job, collected");
    assert_eq!(
        recovery.settings,
        vec![SessionSettings {
            session: "b".into(),
            mode: "steer".into(),
            debounce_ms: 2000,
            cap: 25,
            drop_policy: "old".into(),
        }]
    );
    // The interruption itself is durable: a third open finds nothing active.
    let stored = store.reader().unwrap().task(running.id).unwrap().unwrap();
    assert_eq!(stored.state, State::Interrupted);
    drop(store);
    let (_store, again) = open(dir.path());
    assert!(again.interrupted.is_empty());
    assert_eq!(again.queued.len(), 5);
}

#[test]
fn message_id_dedup_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut original = task("chat", "hello");
    original.message_id = Some("evt-1".into());
    {
        let (store, _) = open(dir.path());
        assert_eq!(insert(&store.writer(), &original, false), Outcome::Inserted);
    }
    let (store, recovery) = open(dir.path());
    assert_eq!(
        recovery.recent_messages,
        vec![("chat".to_string(), "evt-1".to_string(), original.id)]
    );
    let w = store.writer();
    let mut again = task("chat", "hello again");
    again.message_id = Some("evt-1".into());
    assert_eq!(insert(&w, &again, false), Outcome::Duplicate(original.id));
    // The same message id in another session is another message.
    let mut other = task("other-chat", "hello");
    other.message_id = Some("evt-1".into());
    assert_eq!(insert(&w, &other, false), Outcome::Inserted);
    let reader = store.reader().unwrap();
    assert_eq!(reader.task(again.id).unwrap(), None);
    assert_eq!(
        reader.find_message("chat", "evt-1").unwrap(),
        Some(original.id)
    );
    // Still a duplicate once the original finished.
    w.submit(finish(original.id, State::Succeeded, 10))
        .wait()
        .unwrap();
    assert_eq!(insert(&w, &again, false), Outcome::Duplicate(original.id));
}

#[test]
fn a_message_id_twice_in_one_transaction_is_one_task() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    let with_id = |session: &str, message_id: Option<&str>| {
        let mut t = task(session, "m");
        t.message_id = message_id.map(str::to_string);
        t
    };
    let (first, again, elsewhere, plain, plain_again) = (
        with_id("chat", Some("evt-7")),
        with_id("chat", Some("evt-7")),
        with_id("other", Some("evt-7")),
        with_id("chat", None),
        with_id("chat", None),
    );
    // A task id stored already, with a new message id: refused, not a duplicate.
    let mut same_task = with_id("chat", Some("evt-8"));
    same_task.id = first.id;
    let release = w.hold();
    let tickets: Vec<Ticket> = [&first, &again, &elsewhere, &plain, &plain_again, &same_task]
        .into_iter()
        .map(|t| {
            w.submit(Op::Insert {
                task: Box::new(t.clone()),
                front: false,
            })
        })
        .collect();
    let before = store.stats();
    drop(release);
    let outcomes: Vec<_> = tickets.into_iter().map(Ticket::wait).collect();
    assert_eq!(store.stats().commits - before.commits, 1, "one transaction");
    assert_eq!(outcomes[0], Ok(Outcome::Inserted));
    assert_eq!(outcomes[1], Ok(Outcome::Duplicate(first.id)));
    assert_eq!(outcomes[2], Ok(Outcome::Inserted));
    assert_eq!(outcomes[3], Ok(Outcome::Inserted));
    assert_eq!(outcomes[4], Ok(Outcome::Inserted));
    assert!(
        matches!(outcomes[5], Err(StoreError::Rejected(_))),
        "{:?}",
        outcomes[5]
    );
    drop(store);
    let (_store, recovery) = open(dir.path());
    let ids: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    assert_eq!(ids, [first.id, elsewhere.id, plain.id, plain_again.id]);
    assert_eq!(recovery.queued[0], first);
}

#[test]
fn a_record_that_ran_is_inserted_with_everything_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let mut t = task("chat", "ran before");
    t.state = State::Failed;
    t.options = Some("{}".into());
    t.message_id = Some("evt-1".into());
    t.started_at = Some(1_700_000_000_100);
    t.finished_at = Some(1_700_000_000_200);
    t.progress = Some("half way".into());
    t.result = Some("no".into());
    t.ending = Some("failed".into());
    t.reason = Some("exit 3".into());
    t.exit = Some(Exit {
        code: Some(3),
        signal: None,
    });
    t.process = Some(crate::ProcessIdentity {
        pid: 4242,
        start_time: 99,
        boot_id: "boot".into(),
    });
    t.attempt_of = Some(Uuid::now_v7());
    t.checkpoint = Some("step 2".into());
    t.timeout_ms = Some(5000);
    assert_eq!(insert(&store.writer(), &t, false), Outcome::Inserted);
    let mut again = task("chat", "the same message");
    again.message_id = t.message_id.clone();
    again.started_at = Some(1);
    assert_eq!(
        insert(&store.writer(), &again, false),
        Outcome::Duplicate(t.id)
    );
    assert_eq!(store.reader().unwrap().task(t.id).unwrap(), Some(t));
}

#[test]
fn group_commit_puts_everything_that_waited_into_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    insert(&w, &task("s", "warm up"), false);
    let before = store.stats();
    let release = w.hold();
    let tickets: Vec<Ticket> = (0..1000)
        .map(|i| {
            w.submit(Op::Insert {
                task: Box::new(task(&format!("s{}", i % 10), "m")),
                front: false,
            })
        })
        .collect();
    drop(release);
    for t in tickets {
        assert_eq!(t.wait().unwrap(), Outcome::Inserted);
    }
    let after = store.stats();
    assert_eq!(after.ops - before.ops, 1000);
    assert_eq!(
        after.commits - before.commits,
        1,
        "1000 waiting ops, one commit"
    );
}

#[test]
fn a_batch_is_one_hand_over_committed_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    insert(&w, &task("s", "warm up"), false);
    for round in 0..20 {
        let before = store.stats();
        let (tx, rx) = mpsc::channel();
        let mut batch = Batch::default();
        let tasks: Vec<TaskRecord> = (0..30).map(|i| task(&format!("b{i}"), "m")).collect();
        for (i, t) in tasks.iter().enumerate() {
            let op = Op::Insert {
                task: Box::new(t.clone()),
                front: false,
            };
            let tx = tx.clone();
            match i % 3 {
                0 => batch.submit_with(op, move |r| tx.send((i, r)).unwrap()),
                1 => batch.submit_reporting(op, move |r| tx.send((i, r)).unwrap()),
                _ => batch.submit_detached(op),
            }
        }
        // The detached inserts' state changes come after them in the same batch.
        for t in tasks.iter().skip(2).step_by(3) {
            batch.submit_detached(finish(t.id, State::Succeeded, 1_700_000_000_001));
        }
        assert_eq!(batch.len(), 40);
        w.submit_batch(batch);
        drop(tx);
        let done: Vec<usize> = rx
            .iter()
            .map(|(i, r)| {
                assert_eq!(r.unwrap(), Outcome::Inserted, "op {i}");
                i
            })
            .collect();
        let expected: Vec<usize> = (0..30).filter(|i| i % 3 != 2).collect();
        assert_eq!(done, expected, "completions in submission order");
        wait_until("the detached ops", || store.stats().ops - before.ops == 40);
        assert_eq!(
            store.stats().commits - before.commits,
            1,
            "round {round}: one hand-over, one transaction"
        );
    }
    let reader = store.reader().unwrap();
    let finished = reader.finished(None, 1000).unwrap();
    assert_eq!(finished.len(), 20 * 10, "every detached ending was written");
    store.close();
    let (tx, rx) = mpsc::channel();
    let mut batch = Batch::default();
    batch.submit_with(Op::Flush, move |r| tx.send(r).unwrap());
    w.submit_batch(batch);
    assert!(matches!(rx.recv().unwrap(), Err(StoreError::Closed)));
}

#[test]
fn concurrent_submitters_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let before = store.stats();
    std::thread::scope(|scope| {
        for c in 0..64 {
            let w = store.writer();
            scope.spawn(move || {
                for i in 0..20 {
                    let t = task(&format!("client-{c}"), &format!("message {i}"));
                    assert_eq!(insert(&w, &t, false), Outcome::Inserted);
                }
            });
        }
    });
    let after = store.stats();
    assert_eq!(after.ops - before.ops, 64 * 20);
    assert!(
        after.commits - before.commits < 64 * 20,
        "64 submitters never shared a commit ({} commits)",
        after.commits - before.commits
    );
}

/// Tickets of a sync are woken together (one futex word for all of them): none is
/// lost, whether answered by the syncer (inserts, flushes) or on the writer (state
/// changes with nothing ahead of them), and a thread woken for another ticket's
/// answer sleeps again until its own. A lost wake-up would hang a client: the
/// watchdog fails the test instead.
#[test]
fn every_waiting_ticket_is_woken_by_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let (done_tx, done_rx) = mpsc::channel();
    let clients = 64;
    for c in 0..clients {
        let w = store.writer();
        let done = done_tx.clone();
        std::thread::spawn(move || {
            for i in 0..60 {
                let t = task(&format!("client-{c}"), &format!("message {i}"));
                assert_eq!(insert(&w, &t, false), Outcome::Inserted);
                let op = match i % 3 {
                    0 => Op::Flush,
                    1 => Op::SetState {
                        id: t.id,
                        state: State::Running,
                    },
                    _ => Op::Progress {
                        id: t.id,
                        text: "half way".into(),
                    },
                };
                assert!(w.submit(op).wait().is_ok());
            }
            done.send(c).unwrap();
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut finished = HashSet::new();
    while finished.len() < clients {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(c) => {
                finished.insert(c);
            }
            Err(_) => panic!(
                "{} of {clients} clients still wait for an answer (a lost wake-up)",
                clients - finished.len()
            ),
        }
    }
    assert_eq!(store.stats().ops, (clients * 60 * 2) as u64);
}

#[test]
fn state_changes_commit_without_a_sync_and_acknowledged_ops_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    let t = task("s", "m");
    let before = store.stats();
    insert(&w, &t, false);
    let inserted = store.stats();
    assert_eq!(
        (
            inserted.commits - before.commits,
            inserted.synced_commits - before.synced_commits
        ),
        (1, 1),
        "an insert is synced before it is acknowledged"
    );
    let start = Op::Start {
        id: t.id,
        at: 1,
        process: None,
        text: None,
    };
    w.submit(start).wait().unwrap();
    w.submit(finish(t.id, State::Succeeded, 2)).wait().unwrap();
    let finished = store.stats();
    assert_eq!(finished.commits - inserted.commits, 2);
    assert_eq!(
        finished.synced_commits, inserted.synced_commits,
        "state changes alone commit without a sync"
    );
    // Settings are acknowledged: synced, and a batch holding one is synced whole.
    let release = w.hold();
    let progress = w.submit(Op::Progress {
        id: t.id,
        text: "p".into(),
    });
    let settings = w.submit(Op::Settings(SessionSettings {
        session: "s".into(),
        mode: "followup".into(),
        debounce_ms: 0,
        cap: 5,
        drop_policy: "old".into(),
    }));
    drop(release);
    progress.wait().unwrap();
    settings.wait().unwrap();
    let after = store.stats();
    assert_eq!(
        (
            after.commits - finished.commits,
            after.synced_commits - finished.synced_commits
        ),
        (1, 1)
    );
    let reader = store.reader().unwrap();
    let record = reader.task(t.id).unwrap().unwrap();
    assert_eq!(
        (record.state, record.progress.as_deref()),
        (State::Succeeded, Some("p"))
    );
}

#[test]
fn a_refused_write_fails_alone_and_its_batch_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    let t = task("s", "first");
    let release = w.hold();
    let first = w.submit(Op::Insert {
        task: Box::new(t.clone()),
        front: false,
    });
    let same_id = w.submit(Op::Insert {
        task: Box::new(t.clone()),
        front: false,
    });
    let other = task("s", "second");
    let second = w.submit(Op::Insert {
        task: Box::new(other.clone()),
        front: false,
    });
    drop(release);
    assert_eq!(first.wait().unwrap(), Outcome::Inserted);
    assert!(matches!(same_id.wait(), Err(StoreError::Rejected(_))));
    assert_eq!(second.wait().unwrap(), Outcome::Inserted);
    let reader = store.reader().unwrap();
    assert!(reader.task(other.id).unwrap().is_some());
}

/// The child half of `acknowledged_writes_survive_sigkill`: writes until killed,
/// printing each task id once its insert is acknowledged.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("AGENTD_STORE_CRASH_CHILD") else {
        return;
    };
    let (store, _) = open(Path::new(&dir));
    std::thread::scope(|scope| {
        for c in 0..8 {
            let w = store.writer();
            scope.spawn(move || loop {
                let mut t = task(&format!("chat-{c}"), "work");
                t.message_id = Some(t.id.to_string());
                if insert(&w, &t, false) == Outcome::Inserted {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {}", t.id).unwrap();
                    out.flush().unwrap();
                }
            });
        }
    });
}

/// The child half of `state_changes_survive_sigkill`: inserts, starts and finishes
/// tasks until killed, printing each task id once its (unsynced) finish committed.
#[test]
fn crash_child_finishing() {
    let Ok(dir) = std::env::var("AGENTD_STORE_FINISH_CHILD") else {
        return;
    };
    let (store, _) = open(Path::new(&dir));
    let w = store.writer();
    loop {
        let t = task("chat", "work");
        insert(&w, &t, false);
        let start = Op::Start {
            id: t.id,
            at: 1,
            process: None,
            text: None,
        };
        w.submit(start).wait().unwrap();
        // Now, so that the retention keeps it at the next open.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        w.submit(finish(t.id, State::Succeeded, now))
            .wait()
            .unwrap();
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "FINISHED {}", t.id).unwrap();
        out.flush().unwrap();
    }
}

/// Commits of state changes only are not synced (`synchronous=NORMAL`), yet a task
/// whose finish committed is finished after agentd is killed with SIGKILL: the
/// commit is in the WAL, which the kernel holds for the next open.
#[test]
fn state_changes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(&exe)
        .args([
            "tests::crash_child_finishing",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("AGENTD_STORE_FINISH_CHILD", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut finished = Vec::new();
    while finished.len() < 100 {
        let line = lines.next().expect("child ended early").unwrap();
        if let Some(id) = line.strip_prefix("FINISHED ") {
            finished.push(Uuid::parse_str(id).unwrap());
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    for line in lines.map_while(Result::ok) {
        if let Some(id) = line.strip_prefix("FINISHED ") {
            finished.push(Uuid::parse_str(id).unwrap());
        }
    }
    let (store, recovery) = open(dir.path());
    assert_eq!(recovery.previous_run, PreviousRun::Crashed);
    let reader = store.reader().unwrap();
    for id in &finished {
        let record = reader
            .task(*id)
            .unwrap()
            .expect("the finished task is stored");
        assert_eq!(record.state, State::Succeeded, "{id} lost its finish");
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    for round in 0..3 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "tests::crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("AGENTD_STORE_CRASH_CHILD", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = Vec::new();
        let target = 200 + round * 150;
        while acked.len() < target {
            let line = lines.next().expect("child ended early").unwrap();
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.push(Uuid::parse_str(id).unwrap());
            }
        }
        // SIGKILL mid-stream, by pid.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        // Acknowledgements still in the pipe count too.
        for line in lines.map_while(Result::ok) {
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.push(Uuid::parse_str(id).unwrap());
            }
        }
        let (store, recovery) = open(dir.path());
        assert_eq!(recovery.previous_run, PreviousRun::Crashed);
        let queued: HashSet<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
        assert_eq!(queued.len(), recovery.queued.len(), "no task twice");
        let missing: Vec<_> = acked.iter().filter(|id| !queued.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged writes lost",
            missing.len(),
            acked.len()
        );
        // Re-sending any acknowledged message finds the original.
        let w = store.writer();
        for id in acked.iter().take(20) {
            let original = recovery.queued.iter().find(|t| t.id == *id).unwrap();
            let mut again = task(&original.session, "again");
            again.message_id = original.message_id.clone();
            assert_eq!(insert(&w, &again, false), Outcome::Duplicate(*id));
        }
    }
}

#[test]
fn a_file_that_is_not_a_store_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = Store::open(dir.path(), StoreOptions::default())
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("Move it aside"), "{text}");
    // Nothing was written over it.
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
}

#[test]
fn a_damaged_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        let w = store.writer();
        let tickets: Vec<_> = (0..2000)
            .map(|i| {
                w.submit(Op::Insert {
                    task: Box::new(task(&format!("s{i}"), &"x".repeat(200))),
                    front: false,
                })
            })
            .collect();
        for t in tickets {
            t.wait().unwrap();
        }
    }
    let path = dir.path().join(DB_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 40 * 4096);
    // Overwrite pages 3..10 (b-tree pages of the tasks table and its indexes).
    for b in &mut bytes[3 * 4096..10 * 4096] {
        *b = 0xa5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::open(dir.path(), StoreOptions::default())
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn a_store_from_a_newer_agentd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = Store::open(dir.path(), StoreOptions::default())
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::TooNew { .. }), "{err:?}");
}

/// A negative schema version (a corrupt header, a hand edit) is no version agentd
/// wrote: `skip(-1 as usize)` would skip every migration, now and after upgrades.
#[test]
fn a_store_with_a_negative_schema_version_is_refused_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", -1).unwrap();
    drop(conn);
    let err = Store::open(dir.path(), StoreOptions::default())
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("schema version -1"), "{err}");
}

#[test]
fn an_unopenable_store_path_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(DB_FILE)).unwrap();
    let err = Store::open(dir.path(), StoreOptions::default())
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("agentd.db"));
}

#[test]
fn a_full_disk_fails_new_work_keeps_the_writer_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    let first = task("s", "first");
    insert(&w, &first, false);
    // Cap the file near its current size: the disk is now "full".
    let pages: u64 = {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap()
    };
    w.submit(Op::LimitPages(Some(pages + 2))).wait().unwrap();
    let mut acked = vec![first.id];
    let full_error = loop {
        let t = task("s", &"y".repeat(3000));
        match w
            .submit(Op::Insert {
                task: Box::new(t.clone()),
                front: false,
            })
            .wait()
        {
            Ok(Outcome::Inserted) => acked.push(t.id),
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
        assert!(acked.len() < 1000, "the page cap never filled");
    };
    assert!(
        matches!(
            full_error,
            StoreError::Storage {
                kind: StorageKind::Full,
                ..
            }
        ),
        "{full_error:?}"
    );
    assert!(full_error.to_string().contains("full"), "{full_error}");
    assert!(!store.stats().healthy);
    // A state change that needs room is kept and retried, not dropped.
    let (done_tx, done_rx) = mpsc::channel();
    w.submit_with(
        Op::Checkpoint {
            id: first.id,
            data: "z".repeat(50_000),
        },
        move |r| done_tx.send(r).unwrap(),
    );
    wait_until("the checkpoint to wait for a retry", || {
        store.stats().pending_retries == 1
    });
    assert!(
        done_rx.try_recv().is_err(),
        "completed before it was written"
    );
    // A write whose answer must not wait for the disk hears of the failure at once,
    // and is still kept and retried after the one before it.
    let (early_tx, early_rx) = mpsc::channel();
    w.submit_reporting(
        Op::Checkpoint {
            id: first.id,
            data: "w".repeat(60_000),
        },
        move |r| early_tx.send(r).unwrap(),
    );
    let early = early_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(early.unwrap_err().is_storage());
    wait_until("both checkpoints to wait for a retry", || {
        store.stats().pending_retries == 2
    });
    // New work is still refused while full.
    assert!(w
        .submit(Op::Insert {
            task: Box::new(task("s", &"y".repeat(3000))),
            front: false,
        })
        .wait()
        .unwrap_err()
        .is_storage());
    // Space returns: the retried change commits, new work is accepted again.
    w.submit(Op::LimitPages(None)).wait().unwrap();
    assert_eq!(
        done_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap(),
        Outcome::Updated(1)
    );
    let later = task("s", "after");
    assert_eq!(insert(&w, &later, false), Outcome::Inserted);
    acked.push(later.id);
    assert!(store.stats().healthy);
    drop(store);
    let (store, recovery) = open(dir.path());
    let queued: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    assert_eq!(
        queued, acked,
        "every acknowledged task, nothing else, in order"
    );
    let reader = store.reader().unwrap();
    assert_eq!(
        reader
            .task(first.id)
            .unwrap()
            .unwrap()
            .checkpoint
            .map(|c| c.len()),
        Some(60_000),
        "the reported write committed after the one before it"
    );
}

#[test]
fn retention_prunes_by_count_and_age_and_removes_logs() {
    let dir = tempfile::tempdir().unwrap();
    let day = 24 * 3600 * 1000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let options = StoreOptions {
        retention: Retention {
            max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            max_finished: Some(3),
        },
        ..StoreOptions::default()
    };
    let mut ids = Vec::new();
    {
        let (store, _) = Store::open(dir.path(), options.clone()).unwrap();
        let w = store.writer();
        // Finished 10 days ago (past the age), then five recent ones, then one queued.
        for (i, at) in [now - 10 * day, now - 5, now - 4, now - 3, now - 2, now - 1]
            .into_iter()
            .enumerate()
        {
            let t = task("s", &format!("t{i}"));
            insert(&w, &t, false);
            w.submit(finish(t.id, State::Succeeded, at)).wait().unwrap();
            let mut log = TaskLog::open(dir.path(), t.id, 100).unwrap();
            log.append(b"output").unwrap();
            log.finish().unwrap();
            ids.push(t.id);
        }
        let queued = task("s", "still queued");
        insert(&w, &queued, false);
        let Outcome::Pruned(mut pruned) = w.submit(Op::Prune).wait().unwrap() else {
            panic!()
        };
        pruned.sort();
        let mut expected = ids[..3].to_vec();
        expected.sort();
        assert_eq!(pruned, expected, "the old one, then all but the newest 3");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                output::log_path(dir.path(), *id).exists(),
                i >= 3,
                "log of task {i}"
            );
        }
        let reader = store.reader().unwrap();
        let kept: Vec<Uuid> = reader
            .finished(None, 100)
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(kept, vec![ids[5], ids[4], ids[3]]);
        assert!(
            reader.task(queued.id).unwrap().is_some(),
            "queued work is never pruned"
        );
    }
    // Pruning at open: a tighter retention applies on the next start.
    let tighter = StoreOptions {
        retention: Retention {
            max_age: None,
            max_finished: Some(1),
        },
        ..StoreOptions::default()
    };
    let (store, recovery) = Store::open(dir.path(), tighter).unwrap();
    assert_eq!(recovery.queued.len(), 1);
    let kept: Vec<Uuid> = store
        .reader()
        .unwrap()
        .finished(None, 100)
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(kept, vec![ids[5]]);
}

/// A retention age longer than an i64 of milliseconds holds (`retention-age =
/// "500000000y"` in the config file) keeps everything: it is no cutoff in the future
/// that prunes every finished task, neither when pruning nor at open.
#[test]
fn a_retention_age_past_what_milliseconds_hold_keeps_every_task() {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let options = StoreOptions {
        retention: Retention {
            max_age: Some(Duration::from_secs(500_000_000 * 366 * 24 * 3600)),
            max_finished: None,
        },
        ..StoreOptions::default()
    };
    let t = task("s", "done long ago");
    {
        let (store, _) = Store::open(dir.path(), options.clone()).unwrap();
        let w = store.writer();
        insert(&w, &t, false);
        w.submit(finish(t.id, State::Succeeded, now - 1))
            .wait()
            .unwrap();
        let Outcome::Pruned(pruned) = w.submit(Op::Prune).wait().unwrap() else {
            panic!()
        };
        assert_eq!(pruned, Vec::<Uuid>::new());
    }
    let (store, _) = Store::open(dir.path(), options).unwrap();
    assert!(store.reader().unwrap().task(t.id).unwrap().is_some());
}

#[test]
fn finished_tasks_stay_queryable_with_everything_they_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut t = task("s", "build it");
    t.message_id = Some("m".into());
    {
        let (store, _) = open(dir.path());
        let w = store.writer();
        insert(&w, &t, false);
        let me = ProcessIdentity::capture(std::process::id()).unwrap();
        w.submit(Op::Start {
            id: t.id,
            at: now - 2,
            process: Some(me),
            text: None,
        })
        .wait()
        .unwrap();
        w.submit(Op::Progress {
            id: t.id,
            text: "50%".into(),
        })
        .wait()
        .unwrap();
        w.submit(Op::Checkpoint {
            id: t.id,
            data: "step 2".into(),
        })
        .wait()
        .unwrap();
        w.submit(Op::Finish {
            id: t.id,
            state: State::Failed,
            at: now - 1,
            progress: None,
            result: Some("it broke".into()),
            ending: Some("{\"failed\":\"exit 2\"}".into()),
            reason: Some("agent failed".into()),
            exit: Some(Exit {
                code: Some(2),
                signal: None,
            }),
        })
        .wait()
        .unwrap();
        let mut retry = task("s", "build it");
        retry.attempt_of = Some(t.id);
        insert(&w, &retry, false);
    }
    let (store, recovery) = open(dir.path());
    assert_eq!(recovery.finished, 1);
    assert_eq!(recovery.queued[0].attempt_of, Some(t.id));
    let back = store.reader().unwrap().task(t.id).unwrap().unwrap();
    assert_eq!(back.state, State::Failed);
    assert_eq!(back.progress.as_deref(), Some("50%"));
    assert_eq!(back.result.as_deref(), Some("it broke"));
    assert_eq!(back.checkpoint.as_deref(), Some("step 2"));
    assert_eq!(
        back.exit,
        Some(Exit {
            code: Some(2),
            signal: None
        })
    );
    assert_eq!(
        (back.started_at, back.finished_at),
        (Some(now - 2), Some(now - 1))
    );
    assert_eq!(back.reason.as_deref(), Some("agent failed"));
    let reader = store.reader().unwrap();
    assert_eq!(
        reader.ids_with_prefix(&t.id.to_string()[..8], 10).unwrap(),
        vec![t.id]
    );
    assert!(reader.ids_with_prefix("ffffffff-f", 10).unwrap().is_empty());
    let counts = store.reader().unwrap().counts().unwrap();
    assert!(counts.contains(&(State::Failed, 1)) && counts.contains(&(State::Queued, 1)));
}

#[test]
fn the_state_dir_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a/b/agentd");
    prepare_state_dir(&state).unwrap();
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    prepare_state_dir(&state).unwrap();
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn schema_is_at_the_current_version_after_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_store_of_schema_version_1_is_upgraded_and_keeps_its_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let queued = task("chat", "from an older agentd");
    {
        // The file as the first schema left it, with one queued task.
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(crate::schema::MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO tasks (seq, id, session, text, state, queue_order, mode, priority, \
             created_at) VALUES (1, ?1, 'chat', 'from an older agentd', 'queued', 1, \
             'collect', 'interactive', 1700000000000)",
            [queued.id.to_string()],
        )
        .unwrap();
    }
    let (store, recovery) = open(dir.path());
    assert_eq!(recovery.queued, vec![queued.clone()]);
    assert_eq!(recovery.queued[0].timeout_ms, None);
    // The new column is written and read back.
    let mut limited = task("chat", "limited");
    limited.timeout_ms = Some(1500);
    insert(&store.writer(), &limited, false);
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    const { assert!(SCHEMA_VERSION >= 2) };
    drop(conn);
    let (_store, recovery) = open(dir.path());
    let back: Vec<Option<u64>> = recovery.queued.iter().map(|t| t.timeout_ms).collect();
    assert_eq!(back, vec![None, Some(1500)]);
    // The indexes are those of the current schema: tasks_session is gone (version 3).
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let indexes: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        indexes,
        [
            "tasks_finished",
            "tasks_finished_id",
            "tasks_live",
            "tasks_message"
        ]
    );
}

#[test]
fn the_queue_is_read_on_the_live_task_index_without_a_sort() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!(
            "EXPLAIN QUERY PLAN {}",
            crate::store::queued_page_sql()
        ))
        .unwrap()
        .query_map([0, 10], |r| r.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        plan,
        ["SEARCH tasks USING INDEX tasks_live (queue_order>?)"],
        "{plan:?}"
    );
}

#[test]
fn finished_tasks_are_listed_by_id_and_oldest_first_as_the_retention_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut ids = Vec::new();
    for i in 0..6 {
        let t = task(if i % 2 == 0 { "a" } else { "b" }, "x");
        insert(&w, &t, false);
        // Finished in reverse order of creation, the first one a day ago.
        let at = if i == 0 { now - 86_400_000 } else { now - i };
        w.submit(finish(t.id, State::Succeeded, at)).wait().unwrap();
        ids.push(t.id);
    }
    let live = task("a", "still queued");
    insert(&w, &live, false);
    let reader = store.reader().unwrap();
    let keep_all = Retention::default();
    let got = |r: Vec<TaskRecord>| r.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(
        got(reader.finished_by_id(None, None, 10, &keep_all).unwrap()),
        ids
    );
    assert_eq!(
        got(reader
            .finished_by_id(None, Some(ids[1]), 2, &keep_all)
            .unwrap()),
        ids[2..4].to_vec()
    );
    assert_eq!(
        got(reader
            .finished_by_id(Some("b"), None, 10, &keep_all)
            .unwrap()),
        vec![ids[1], ids[3], ids[5]]
    );
    let oldest_first: Vec<Uuid> = vec![ids[0], ids[5], ids[4], ids[3], ids[2], ids[1]];
    assert_eq!(
        got(reader.finished_oldest_first(None, 10, &keep_all).unwrap()),
        oldest_first
    );
    // The newest 3 by finish, and nothing older than an hour.
    let three = Retention {
        max_age: None,
        max_finished: Some(3),
    };
    assert_eq!(
        got(reader.finished_oldest_first(None, 10, &three).unwrap()),
        vec![ids[3], ids[2], ids[1]]
    );
    assert_eq!(
        got(reader.finished_by_id(None, None, 10, &three).unwrap()),
        vec![ids[1], ids[2], ids[3]]
    );
    let hour = Retention {
        max_age: Some(Duration::from_secs(3600)),
        max_finished: None,
    };
    assert_eq!(
        got(reader.finished_by_id(None, None, 10, &hour).unwrap()),
        ids[1..].to_vec()
    );
    let none = Retention {
        max_age: None,
        max_finished: Some(0),
    };
    assert!(reader
        .finished_by_id(None, None, 10, &none)
        .unwrap()
        .is_empty());
}
