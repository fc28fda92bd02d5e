use super::*;

fn progress(task: &str, text: &str) -> EventView {
    EventView {
        kind: EventKind::Progress,
        task_id: task.into(),
        session: "s".into(),
        position: None,
        text: Some(text.into()),
        into: None,
        task: None,
        at: None,
    }
}

fn drain(outbox: &Outbox) -> Vec<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    outbox.finish_reading();
    let mut lines = Vec::new();
    rt.block_on(async {
        while let Ok(Some(line)) =
            tokio::time::timeout(std::time::Duration::from_millis(50), outbox.next()).await
        {
            lines.push(serde_json::from_slice(&line).expect("valid JSON line"));
        }
    });
    lines
}

#[test]
fn lines_are_encoded_whole_and_at_their_exact_size() {
    for value in [
        Response::ok(1, "x".repeat(200_000)),
        Response::ok(2, "short".to_string()),
        Response::ok(3, "a \"quoted\"\nline".to_string()),
    ] {
        let line = encode_line(&value);
        let mut want = serde_json::to_vec(&value).unwrap();
        want.push(b'\n');
        assert_eq!(line, want);
        assert_eq!(
            line.capacity(),
            line.len(),
            "what the budget counts is what it takes"
        );
    }
}

#[test]
fn encode_failures_still_give_valid_json() {
    struct Bad;
    impl Serialize for Bad {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("a \"quoted\"\nmessage \\ here"))
        }
    }
    let line = encode_line(&Bad);
    assert_eq!(line.last(), Some(&b'\n'));
    let value: serde_json::Value = serde_json::from_slice(&line).expect("valid JSON");
    assert_eq!(value["error"]["code"], "internal");
    assert!(value["error"]["message"]
        .as_str()
        .unwrap()
        .contains("\"quoted\"\nmessage"));
}

/// An outbox whose client is behind: [`COALESCE_AFTER`] bytes of an answer wait
/// (the first line [`drain`] returns).
fn behind(outbox: &Outbox) {
    outbox.push(&Response::ok(1, "#".repeat(COALESCE_AFTER)));
}

#[test]
fn progress_of_a_client_that_keeps_up_is_not_coalesced() {
    let outbox = Outbox::new(OUTPUT_BUDGET);
    let (sink, answer) = EventSink::new(&outbox, 1, 7);
    answer.answer(&Response::ok(7, "watching"));
    // Many lines in one go, as an agent's burst reaches the outbox before the
    // writer runs: each is written, up to COALESCE_AFTER bytes of them.
    for i in 0..50 {
        sink.send(progress("a", &format!("line {i}"))).unwrap();
    }
    drop(sink);
    let lines = drain(&outbox);
    assert_eq!(lines.len(), 51, "{lines:?}");
    for (i, line) in lines[1..].iter().enumerate() {
        assert_eq!(line["event"]["text"], format!("line {i}"));
        assert!(line.get("skipped").is_none(), "{line}");
    }
}

#[test]
fn progress_is_coalesced_latest_wins_with_a_count() {
    let outbox = Outbox::new(OUTPUT_BUDGET);
    behind(&outbox);
    let (sink, answer) = EventSink::new(&outbox, 1, 7);
    answer.answer(&Response::ok(7, "watching"));
    for i in 0..1000 {
        sink.send(progress("a", &format!("line {i}"))).unwrap();
    }
    sink.send(progress("b", "other")).unwrap();
    assert!(
        outbox.pending() < COALESCE_AFTER + 4096,
        "{}",
        outbox.pending()
    );
    drop(sink);
    let lines = drain(&outbox);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[1]["result"], "watching");
    assert_eq!(lines[2]["event"]["text"], "line 999");
    assert_eq!(lines[2]["skipped"], 999);
    assert_eq!(lines[3]["event"]["text"], "other");
    assert!(lines[3].get("skipped").is_none());
}

#[test]
fn a_watch_whose_client_stops_reading_ends_with_a_lagged_notice() {
    let outbox = Outbox::with_stall_limit(OUTPUT_BUDGET, Duration::from_millis(50));
    behind(&outbox);
    let (sink, answer) = EventSink::new(&outbox, 1, 7);
    answer.answer(&Response::ok(7, "watching"));
    // Nobody writes: coalescing bounds the queue meanwhile.
    for i in 0..100 {
        sink.send(progress("a", &format!("{i}"))).unwrap();
    }
    assert!(outbox.pending() < COALESCE_AFTER + 4096);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(sink.send(progress("a", "late")), Err(Delivery::Lagged));
    assert!(sink.is_closed());
    assert_eq!(sink.send(progress("a", "later")), Err(Delivery::Lagged));
    drop(sink);
    let lines = drain(&outbox);
    assert_eq!(lines[2]["event"]["text"], "99");
    let last = lines.last().unwrap();
    assert_eq!(last["id"], 7);
    assert_eq!(last["error"]["code"], "lagged");
}

#[test]
fn a_reading_client_is_not_stalled() {
    let outbox = Outbox::with_stall_limit(OUTPUT_BUDGET, Duration::from_millis(200));
    let (sink, answer) = EventSink::new(&outbox, 1, 7);
    answer.answer(&Response::ok(7, "watching"));
    // Idle for longer than the limit, then output: not a stall.
    std::thread::sleep(Duration::from_millis(240));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(outbox.next()).unwrap();
    outbox.wrote();
    std::thread::sleep(Duration::from_millis(240));
    sink.send(progress("a", "after a pause")).unwrap();
    // Writes keep completing, slower than the limit in all but never stalled (each
    // pause well under the limit, so that a loaded machine's late wake-up is not one).
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(120));
        sink.send(progress("a", &format!("{i}"))).unwrap();
        rt.block_on(outbox.next()).unwrap();
        outbox.wrote();
    }
}

#[test]
fn progress_is_not_coalesced_across_other_events_of_its_task() {
    let outbox = Outbox::new(OUTPUT_BUDGET);
    behind(&outbox);
    let (sink, answer) = EventSink::new(&outbox, 1, 7);
    answer.answer(&Response::ok(7, "watching"));
    sink.send(progress("a", "1")).unwrap();
    let mut steered = progress("a", "steer");
    steered.kind = EventKind::Steered;
    sink.send(steered).unwrap();
    sink.send(progress("a", "2")).unwrap();
    sink.send(progress("a", "3")).unwrap();
    drop(sink);
    let texts: Vec<_> = drain(&outbox)[2..]
        .iter()
        .map(|l| (l["event"]["text"].clone(), l["skipped"].clone()))
        .collect();
    assert_eq!(
        texts,
        [
            ("1".into(), serde_json::Value::Null),
            ("steer".into(), serde_json::Value::Null),
            ("3".into(), 1.into())
        ]
    );
}

#[test]
fn events_before_the_answer_are_held_until_it() {
    let outbox = Outbox::new(OUTPUT_BUDGET);
    let (sink, answer) = EventSink::new(&outbox, 1, 7);
    sink.send(progress("a", "snapshot")).unwrap();
    outbox.push(&Response::ok(3, "other answer"));
    answer.answer(&Response::ok(7, "watching"));
    drop(sink);
    let ids: Vec<_> = drain(&outbox)
        .iter()
        .map(|l| (l["id"].clone(), l.get("event").is_some()))
        .collect();
    assert_eq!(
        ids,
        [(3.into(), false), (7.into(), false), (7.into(), true)]
    );
}

#[test]
fn the_reader_waits_while_too_much_is_in_flight_or_queued() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ready = |outbox: &Outbox| {
        rt.block_on(async {
            tokio::time::timeout(Duration::ZERO, outbox.wait_for_room(2))
                .await
                .is_ok()
        })
    };
    let outbox = Outbox::new(1024);
    assert!(ready(&outbox));
    // Live watches do not count: a connection with many of them is still read.
    let watches: Vec<_> = (0..4)
        .map(|i| {
            let (sink, answer) = EventSink::new(&outbox, i, i);
            answer.answer(&Response::ok(i, "watching"));
            sink
        })
        .collect();
    assert!(ready(&outbox));
    assert_eq!(outbox.watches(), 4);
    drop(watches);
    assert_eq!(outbox.watches(), 0);
    for _ in 0..4 {
        rt.block_on(outbox.next()).unwrap();
        outbox.wrote();
    }
    let first = outbox.answering(false);
    let second = outbox.answering(false);
    assert!(!ready(&outbox), "two requests in flight is the cap");
    drop(first);
    assert!(ready(&outbox));
    // Answers past the budget stop the reader until the writer takes them.
    outbox.push(&Response::ok(1, "x".repeat(2000)));
    assert!(!ready(&outbox), "the queue is over its budget");
    rt.block_on(outbox.next()).unwrap();
    outbox.wrote();
    assert!(ready(&outbox));
    drop(second);
}

#[test]
fn many_non_progress_events_stay_within_the_budget() {
    let outbox = Outbox::new(64 * 1024);
    let (sink, answer) = EventSink::new(&outbox, 1, 7);
    answer.answer(&Response::ok(7, "watching"));
    let mut event = progress("a", &"y".repeat(300));
    event.kind = EventKind::Started;
    let mut n = 0;
    while sink.send(event.clone()).is_ok() {
        n += 1;
        assert!(n < 10_000);
    }
    assert!(n > 100);
    assert!(outbox.pending() <= 64 * 1024 + 1024);
    drop(sink);
    assert_eq!(drain(&outbox).last().unwrap()["error"]["code"], "lagged");
}
