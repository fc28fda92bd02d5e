//! Tests of the syncer: an op is completed only after an `fdatasync` of the
//! write-ahead log that started after its transaction committed; a failed sync
//! acknowledges nothing it covered, and the store recovers from it; the syncer's
//! descriptor is the log SQLite writes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::*;

fn open(dir: &Path) -> (Store, Recovery) {
    let options = StoreOptions {
        retry_interval: Duration::from_millis(20),
        ..StoreOptions::default()
    };
    Store::open(dir, options).expect("open store")
}

fn task(session: &str, text: &str, message_id: Option<&str>) -> TaskRecord {
    let mut t = TaskRecord::queued(Uuid::now_v7(), session, text, 1_700_000_000_000);
    t.message_id = message_id.map(str::to_string);
    t
}

fn insert_op(t: &TaskRecord) -> Op {
    Op::Insert {
        task: Box::new(t.clone()),
        front: false,
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

type Done = mpsc::Receiver<(&'static str, Result<Outcome, StoreError>)>;

/// Submits `op` with a completion that reports `name` and its outcome on `tx`.
fn submit(
    w: &StoreWriter,
    tx: &mpsc::Sender<(&'static str, Result<Outcome, StoreError>)>,
    name: &'static str,
    op: Op,
) {
    let tx = tx.clone();
    w.submit_with(op, move |r| {
        let _ = tx.send((name, r));
    });
}

fn next(rx: &Done) -> (&'static str, Result<Outcome, StoreError>) {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("a completion in time")
}

fn settings(session: &str, cap: u32) -> SessionSettings {
    SessionSettings {
        session: session.into(),
        mode: "followup".into(),
        debounce_ms: 0,
        cap,
        drop_policy: "old".into(),
    }
}

#[test]
fn an_acknowledgement_waits_for_a_sync_that_started_after_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let reader = store.reader().unwrap();
    let w = store.writer();
    let (tx, rx) = mpsc::channel();
    let first = task("s", "first", Some("m1"));
    let hold = w.sync_queue().hold();
    let before = store.stats();
    submit(&w, &tx, "first", insert_op(&first));
    // Committed (a reader sees it) and the syncer is about to sync it: its
    // completion is not called, and cannot be, until that sync is let through.
    wait_until("the insert to commit and its sync to be held", || {
        reader.task(first.id).unwrap().is_some() && w.sync_queue().held()
    });
    assert!(
        rx.try_recv().is_err(),
        "an insert was acknowledged before its sync"
    );
    // What comes in meanwhile (a state change, more new work) is completed after
    // it, in order, the insert after a sync of its own.
    submit(
        &w,
        &tx,
        "progress",
        Op::Progress {
            id: first.id,
            text: "p".into(),
        },
    );
    let second = task("s", "second", Some("m2"));
    submit(&w, &tx, "second", insert_op(&second));
    assert!(
        rx.try_recv().is_err(),
        "a completion overtook the held sync"
    );
    assert_eq!(store.stats().syncs, before.syncs, "synced while held");
    drop(hold);
    let order: Vec<(&str, Result<Outcome, StoreError>)> = (0..3).map(|_| next(&rx)).collect();
    assert_eq!(
        order,
        vec![
            ("first", Ok(Outcome::Inserted)),
            ("progress", Ok(Outcome::Updated(1))),
            ("second", Ok(Outcome::Inserted)),
        ],
        "completions in commit order"
    );
    let after = store.stats();
    assert!(after.syncs - before.syncs >= 2, "{before:?} → {after:?}");
    assert_eq!(
        reader.task(first.id).unwrap().unwrap().progress.as_deref(),
        Some("p")
    );
}

#[test]
fn a_failed_sync_acknowledges_nothing_it_covered_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let reader = store.reader().unwrap();
    let w = store.writer();
    let (tx, rx) = mpsc::channel();
    let kept = task("s", "kept", Some("m0"));
    submit(&w, &tx, "kept", insert_op(&kept));
    assert_eq!(next(&rx), ("kept", Ok(Outcome::Inserted)));
    let before = store.stats();

    // One transaction, whose sync fails: new work, settings (answered at once on
    // failure) and a state change of the kept task.
    let sync_hold = w.sync_queue().hold();
    w.sync_queue()
        .fail_next(std::io::Error::from_raw_os_error(libc::EIO));
    let writer_hold = w.hold();
    let lost = task("s", "lost", Some("m1"));
    submit(&w, &tx, "lost", insert_op(&lost));
    let (early_tx, early_rx) = mpsc::channel();
    w.submit_reporting(Op::Settings(settings("s", 7)), move |r| {
        let _ = early_tx.send(r);
    });
    submit(
        &w,
        &tx,
        "progress",
        Op::Progress {
            id: kept.id,
            text: "p".into(),
        },
    );
    drop(writer_hold);
    wait_until("it to commit and its sync to be held", || {
        reader.task(lost.id).unwrap().is_some() && w.sync_queue().held()
    });
    // Submitted while that sync is in flight: written after it.
    let later = task("s", "later", Some("m2"));
    submit(&w, &tx, "later", insert_op(&later));
    assert!(rx.try_recv().is_err() && early_rx.try_recv().is_err());
    drop(sync_hold);

    // Nothing it covered is acknowledged: the insert fails as storage trouble, the
    // settings are told at once; the state change keeps what it did.
    let mut got: Vec<(&str, Result<Outcome, StoreError>)> = (0..2).map(|_| next(&rx)).collect();
    got.sort_by_key(|(name, _)| *name);
    assert!(
        matches!(&got[0], ("lost", Err(e)) if e.is_storage() && e.to_string().contains("sync")),
        "{got:?}"
    );
    assert_eq!(got[1], ("progress", Ok(Outcome::Updated(1))));
    assert!(early_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap_err()
        .is_storage());
    // The log is repaired, then what came later is written and acknowledged.
    assert_eq!(next(&rx), ("later", Ok(Outcome::Inserted)));

    // The refused task is gone from the store (its message id is free again), the
    // settings are written again, new work is accepted.
    w.submit(Op::Flush).wait().unwrap();
    assert_eq!(reader.task(lost.id).unwrap(), None);
    assert_eq!(reader.find_message("s", "m1").unwrap(), None);
    let again = task("s", "lost, sent again", Some("m1"));
    submit(&w, &tx, "again", insert_op(&again));
    assert_eq!(next(&rx), ("again", Ok(Outcome::Inserted)));
    let after = store.stats();
    assert!(after.failed_commits > before.failed_commits);
    assert!(after.healthy);
    drop(reader);
    drop(store);
    let (_store, recovery) = open(dir.path());
    let queued: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    assert_eq!(queued, vec![kept.id, later.id, again.id]);
    assert_eq!(recovery.queued[0].progress.as_deref(), Some("p"));
    assert_eq!(recovery.settings, vec![settings("s", 7)]);
}

#[test]
fn after_a_failed_sync_new_work_is_refused_until_the_log_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    let (tx, rx) = mpsc::channel();
    let kept = task("s", "kept", None);
    submit(&w, &tx, "kept", insert_op(&kept));
    assert_eq!(next(&rx), ("kept", Ok(Outcome::Inserted)));
    w.sync_queue().fail_repairs(u32::MAX);
    w.sync_queue()
        .fail_next(std::io::Error::from_raw_os_error(libc::EIO));
    let lost = task("s", "lost", None);
    submit(&w, &tx, "lost", insert_op(&lost));
    // The log cannot be repaired: the task whose sync failed (its row still in the
    // log) is told once its id is recorded for the next open to delete; new work
    // is refused at once, state changes wait.
    assert!(matches!(next(&rx), ("lost", Err(e)) if e.is_storage()));
    let refused_file = dir.path().join(REFUSED_FILE);
    assert_eq!(
        std::fs::read_to_string(&refused_file).unwrap(),
        format!("{}\n", lost.id)
    );
    submit(&w, &tx, "refused", insert_op(&task("s", "refused", None)));
    assert!(matches!(next(&rx), ("refused", Err(e)) if e.is_storage()));
    submit(
        &w,
        &tx,
        "progress",
        Op::Progress {
            id: kept.id,
            text: "p".into(),
        },
    );
    wait_until("the state change to wait for a retry", || {
        store.stats().pending_retries >= 2
    });
    assert!(!store.stats().healthy);
    assert!(rx.try_recv().is_err(), "completed before it was written");
    // Repairable again: the deletion and the state change commit, new work is
    // accepted.
    w.sync_queue().fail_repairs(0);
    assert_eq!(next(&rx), ("progress", Ok(Outcome::Updated(1))));
    let later = task("s", "later", None);
    submit(&w, &tx, "later", insert_op(&later));
    assert_eq!(next(&rx), ("later", Ok(Outcome::Inserted)));
    drop(store);
    let (_store, recovery) = open(dir.path());
    let queued: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    assert_eq!(queued, vec![kept.id, later.id]);
    assert!(!refused_file.exists());
}

/// (dev, inode) of every descriptor of this process open on `path`, and whether
/// one of them is open on a deleted file of that name.
fn open_on(path: &Path) -> (Vec<(u64, u64)>, bool) {
    let mut found = Vec::new();
    let mut deleted = false;
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let name = path.to_string_lossy();
        if target == name {
            if let Ok(meta) = std::fs::metadata(fd.path()) {
                found.push((meta.dev(), meta.ino()));
            }
        } else if target.starts_with(&*name) && target.ends_with("(deleted)") {
            deleted = true;
        }
    }
    (found, deleted)
}

#[test]
fn the_syncer_syncs_the_log_sqlite_writes_through_checkpoints_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let wal: PathBuf = dir.path().join(format!("{DB_FILE}-wal"));
    let inode = || {
        let meta = std::fs::metadata(&wal).unwrap();
        (meta.dev(), meta.ino())
    };
    let first = inode();
    let check = |when: &str| {
        let (fds, deleted) = open_on(&wal);
        // SQLite's writer connection and the syncer, at least.
        assert!(fds.len() >= 2, "{when}: {fds:?}");
        assert!(
            fds.iter().all(|f| *f == first),
            "{when}: {fds:?} vs {first:?}"
        );
        assert!(!deleted, "{when}: a descriptor on a deleted log");
        assert_eq!(inode(), first, "{when}: the log was replaced");
    };
    check("after open");
    let w = store.writer();
    let big = "x".repeat(3000);
    // Enough pages for automatic checkpoints, each followed by a reset of the log.
    for round in 0..3 {
        let tickets: Vec<Ticket> = (0..600)
            .map(|i| w.submit(insert_op(&task("s", &format!("{round} {i} {big}"), None))))
            .collect();
        for t in tickets {
            assert_eq!(t.wait().unwrap(), Outcome::Inserted);
        }
        check("after checkpoints and resets");
    }
    // Truncated in place by another connection's checkpoint, then written again.
    let other = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let _: i64 = other
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap();
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0, "not truncated");
    drop(other);
    check("after a truncating checkpoint");
    let before = store.stats();
    assert_eq!(
        w.submit(insert_op(&task("s", "after", None)))
            .wait()
            .unwrap(),
        Outcome::Inserted
    );
    assert!(store.stats().syncs > before.syncs);
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    check("after writing the truncated log again");
}

/// After a failed `fdatasync` Linux may drop (or mark clean) the pages it could
/// not write ("fsyncgate"): reading the log back then returns what the disk holds,
/// not what SQLite wrote. The repair must not copy such frames into the store file
/// (zeros over the page that holds the acknowledged tasks): it writes the log
/// again from the writer's own copy, so every acknowledged task and every state
/// change is kept, and the refused task is gone.
#[test]
fn a_repair_after_a_failed_sync_never_trusts_the_frames_it_may_have_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let reader = store.reader().unwrap();
    let w = store.writer();
    let (tx, rx) = mpsc::channel();
    // Spread over many pages: the state change below writes the first task's page,
    // which nothing after the failure writes again.
    let kept: Vec<TaskRecord> = (0..20)
        .map(|i| {
            task(
                "s",
                &format!("kept {i} {}", "x".repeat(1500)),
                Some(&format!("k{i}")),
            )
        })
        .collect();
    for t in &kept {
        submit(&w, &tx, "kept", insert_op(t));
    }
    for _ in &kept {
        assert_eq!(next(&rx), ("kept", Ok(Outcome::Inserted)));
    }
    // An empty log (so the hook knows where the last good sync ended), then one
    // more acknowledged task in it.
    let other = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let _: i64 = other
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap();
    drop(other);
    let mut kept = kept;
    kept.push(task("s", "kept last", Some("k20")));
    submit(&w, &tx, "kept", insert_op(&kept[20]));
    assert_eq!(next(&rx), ("kept", Ok(Outcome::Inserted)));
    w.sync_queue().lose_unsynced();
    w.sync_queue()
        .fail_next(std::io::Error::from_raw_os_error(libc::EIO));
    let writer_hold = w.hold();
    let lost = task("s", "lost", Some("m1"));
    submit(&w, &tx, "lost", insert_op(&lost));
    submit(
        &w,
        &tx,
        "progress",
        Op::Progress {
            id: kept[0].id,
            text: "p".into(),
        },
    );
    drop(writer_hold);
    let mut got: Vec<(&str, Result<Outcome, StoreError>)> = (0..2).map(|_| next(&rx)).collect();
    got.sort_by_key(|(name, _)| *name);
    assert!(
        matches!(&got[0], ("lost", Err(e)) if e.is_storage()),
        "{got:?}"
    );
    assert_eq!(got[1], ("progress", Ok(Outcome::Updated(1))));
    let later = task("s", "later", Some("m2"));
    submit(&w, &tx, "later", insert_op(&later));
    assert_eq!(next(&rx), ("later", Ok(Outcome::Inserted)));
    w.submit(Op::Flush).wait().unwrap();
    for t in &kept {
        assert!(reader.task(t.id).unwrap().is_some(), "{} lost", t.text);
    }
    assert_eq!(reader.task(lost.id).unwrap(), None);
    assert_eq!(
        reader
            .task(kept[0].id)
            .unwrap()
            .unwrap()
            .progress
            .as_deref(),
        Some("p")
    );
    drop(reader);
    drop(store);
    let (store, recovery) = open(dir.path());
    let queued: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    let mut expected: Vec<Uuid> = kept.iter().map(|t| t.id).collect();
    expected.push(later.id);
    assert_eq!(queued, expected);
    assert_eq!(recovery.queued[0].progress.as_deref(), Some("p"));
    assert_eq!(
        store.reader().unwrap().find_message("s", "m1").unwrap(),
        None
    );
}

/// The last sync fails while the store closes: the task its sender was told was
/// not saved must not come back at the next start (and run), and the state
/// changes it covered are kept.
#[test]
fn a_sync_that_fails_at_close_leaves_no_refused_task_to_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    let (tx, rx) = mpsc::channel();
    let kept = task("s", "kept", Some("m0"));
    submit(&w, &tx, "kept", insert_op(&kept));
    assert_eq!(next(&rx), ("kept", Ok(Outcome::Inserted)));
    let sync_hold = w.sync_queue().hold();
    w.sync_queue()
        .fail_next(std::io::Error::from_raw_os_error(libc::EIO));
    let writer_hold = w.hold();
    let lost = task("s", "lost", Some("m1"));
    submit(&w, &tx, "lost", insert_op(&lost));
    submit(
        &w,
        &tx,
        "progress",
        Op::Progress {
            id: kept.id,
            text: "p".into(),
        },
    );
    drop(writer_hold);
    wait_until("the sync to be held", || w.sync_queue().held());
    let closer = std::thread::spawn(move || store.close());
    wait_until("the store to close", || w.sync_queue().closing());
    drop(sync_hold);
    let mut got: Vec<(&str, Result<Outcome, StoreError>)> = (0..2).map(|_| next(&rx)).collect();
    got.sort_by_key(|(name, _)| *name);
    assert!(
        matches!(&got[0], ("lost", Err(e)) if e.is_storage()),
        "{got:?}"
    );
    assert_eq!(got[1], ("progress", Ok(Outcome::Updated(1))));
    closer.join().unwrap();
    let (store, recovery) = open(dir.path());
    let queued: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    assert_eq!(queued, vec![kept.id], "a refused task came back");
    assert_eq!(recovery.queued[0].progress.as_deref(), Some("p"));
    assert_eq!(recovery.previous_run, PreviousRun::Clean);
    assert_eq!(
        store.reader().unwrap().find_message("s", "m1").unwrap(),
        None
    );
}

/// As above, but the log cannot be written again at close either (the disk still
/// failing), so the refused task's row stays in it: it is recorded beside the store
/// before its sender is told, and the next open deletes it before recovery.
#[test]
fn a_task_refused_at_a_close_that_cannot_repair_the_log_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let w = store.writer();
    let (tx, rx) = mpsc::channel();
    let kept = task("s", "kept", Some("m0"));
    submit(&w, &tx, "kept", insert_op(&kept));
    assert_eq!(next(&rx), ("kept", Ok(Outcome::Inserted)));
    let sync_hold = w.sync_queue().hold();
    w.sync_queue()
        .fail_next(std::io::Error::from_raw_os_error(libc::EIO));
    w.sync_queue().fail_repairs(u32::MAX);
    let lost = task("s", "lost", Some("m1"));
    submit(&w, &tx, "lost", insert_op(&lost));
    wait_until("the sync to be held", || w.sync_queue().held());
    let closer = std::thread::spawn(move || store.close());
    wait_until("the store to close", || w.sync_queue().closing());
    drop(sync_hold);
    let refused_file = dir.path().join(REFUSED_FILE);
    assert!(matches!(next(&rx), ("lost", Err(e)) if e.is_storage()));
    // Told only once it is recorded.
    let recorded = std::fs::read_to_string(&refused_file).unwrap();
    assert_eq!(recorded, format!("{}\n", lost.id));
    closer.join().unwrap();
    let (store, recovery) = open(dir.path());
    let queued: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    assert_eq!(queued, vec![kept.id], "a refused task came back");
    assert_eq!(
        store.reader().unwrap().find_message("s", "m1").unwrap(),
        None
    );
    assert!(!refused_file.exists());
    drop(store);
    let (_store, recovery) = open(dir.path());
    let queued: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    assert_eq!(queued, vec![kept.id]);
}

/// A sync of the log by SQLite itself (a checkpoint's) fails: what the syncer's
/// next sync covers may be lost all the same, so it counts as failed (nothing it
/// covered is acknowledged), the log is written again, and the store goes on.
#[test]
fn a_failed_checkpoint_sync_fails_the_next_sync_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let reader = store.reader().unwrap();
    let w = store.writer();
    crate::walbuf::fail_next_sync_under(dir.path(), rusqlite::ffi::SQLITE_IOERR_FSYNC);
    // Enough pages for an automatic checkpoint, whose sync of the log fails.
    let big = "x".repeat(3000);
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for round in 0..20 {
        let tasks: Vec<TaskRecord> = (0..200)
            .map(|i| task("s", &format!("{round} {i} {big}"), None))
            .collect();
        let tickets: Vec<Ticket> = tasks.iter().map(|t| w.submit(insert_op(t))).collect();
        for (t, ticket) in tasks.into_iter().zip(tickets) {
            match ticket.wait() {
                Ok(Outcome::Inserted) => accepted.push(t.id),
                Err(e) if e.is_storage() => refused.push(t.id),
                other => panic!("{other:?}"),
            }
        }
        if !crate::walbuf::sync_failing_under(dir.path()) && !refused.is_empty() {
            break;
        }
    }
    assert!(
        !crate::walbuf::sync_failing_under(dir.path()),
        "no checkpoint ran"
    );
    assert!(!refused.is_empty(), "nothing refused after the failed sync");
    let later = task("s", "later", None);
    assert_eq!(
        w.submit(insert_op(&later)).wait().unwrap(),
        Outcome::Inserted
    );
    assert!(store.stats().healthy);
    for id in &refused {
        assert_eq!(reader.task(*id).unwrap(), None);
    }
    drop(reader);
    drop(store);
    let (_store, recovery) = open(dir.path());
    let queued: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    accepted.push(later.id);
    assert_eq!(queued, accepted);
}
