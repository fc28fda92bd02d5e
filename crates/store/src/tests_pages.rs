//! Reading the queue a page at a time ([`Reader::queued_page`]): the same tasks in
//! the same order as [`Recovery::queued`], however the pages fall.

use uuid::Uuid;

use crate::*;

#[test]
fn queued_pages_hold_the_recovered_queue_in_order_whatever_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids_in_arrival = Vec::new();
    {
        let (store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let w = store.writer();
        for i in 0..23 {
            let t = TaskRecord::queued(Uuid::now_v7(), &format!("s{}", i % 4), &format!("t{i}"), 1);
            // Every fifth goes in front of its session's queue (an interrupt).
            w.submit(Op::Insert {
                task: Box::new(t.clone()),
                front: i % 5 == 0,
            })
            .wait()
            .unwrap();
            ids_in_arrival.push(t.id);
        }
        // One starts: it is no longer queued.
        w.submit(Op::Start {
            id: ids_in_arrival[7],
            at: 2,
            process: None,
            text: None,
        })
        .wait()
        .unwrap();
        store.close();
    }
    let (store, recovery) = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let expected: Vec<Uuid> = recovery.queued.iter().map(|t| t.id).collect();
    assert_eq!(expected.len(), 22);
    assert!(!expected.contains(&ids_in_arrival[7]));
    let reader = store.reader().unwrap();
    for limit in [1, 2, 5, 22, 23, 1000] {
        let (mut got, mut after) = (Vec::new(), None);
        loop {
            let (page, last) = reader.queued_page(after, limit).unwrap();
            assert!(page.len() <= limit);
            got.extend(page.iter().cloned());
            if page.len() < limit {
                break;
            }
            after = last;
        }
        assert_eq!(
            got.iter().map(|t| t.id).collect::<Vec<_>>(),
            expected,
            "pages of {limit}"
        );
        assert_eq!(got, recovery.queued, "the same records, pages of {limit}");
    }
    drop(store);
    // With `read_queued` off, recovery leaves the queue to the pages.
    let (_store, recovery) = Store::open(
        dir.path(),
        StoreOptions {
            read_queued: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    assert!(recovery.queued.is_empty());
}
