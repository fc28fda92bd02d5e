//! Live events: who watches what, and delivery to them.
//!
//! A subscriber watches one task or one session. Events go out in the order the
//! supervisor publishes them. A task subscriber follows its task when the message is
//! merged into another task (collected or steered), and is dropped after that
//! task's `finished` event, which ends the client's stream. A session subscriber
//! sees a merged message's `merged` and then its `finished`, like any other ending.
//! A subscriber whose client went away, or that fell too far behind (it gets a
//! `lagged` notice, see [`crate::outbox`]), is dropped at the next event.

use std::collections::HashMap;

use agentd_proto::control::{EventKind, EventView, TaskState};

use crate::outbox::EventSink;

use crate::views::{now_millis, rfc3339};

/// What a subscriber watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Task(String),
    Session(String),
}

struct Subscriber {
    filter: Filter,
    events: EventSink,
}

/// Every live subscription, and the queue positions last reported.
#[derive(Default)]
pub struct Subscriptions {
    subscribers: Vec<Subscriber>,
    /// Positions of queued tasks as last published, to report only changes.
    positions: HashMap<String, u32>,
    /// The dispatcher's order version those positions were computed at; `None` once
    /// a subscriber came or follows another task, so they are computed again.
    positions_version: Option<u64>,
    /// Set when a first subscriber arrives: `positions` is stale (nobody was told
    /// anything), and the subscriber's snapshot said where every task stands.
    reseed: bool,
}

impl Subscriptions {
    pub fn add(&mut self, filter: Filter, events: EventSink) {
        self.subscribers.retain(|sub| !sub.events.is_closed());
        if self.subscribers.is_empty() {
            self.reseed = true;
        }
        self.subscribers.push(Subscriber { filter, events });
        self.positions_version = None;
    }

    /// True when the positions published last are still current: the dispatcher's
    /// order version is the same and nobody new watches.
    pub fn positions_current(&self, order_version: u64) -> bool {
        self.positions_version == Some(order_version)
    }

    /// Records the order version the positions just published were computed at.
    pub fn set_positions_version(&mut self, order_version: u64) {
        self.positions_version = Some(order_version);
    }

    /// Records positions a new subscriber's snapshot just gave (same loop turn), so
    /// that they are not reported to it again as news.
    pub fn seed_positions(&mut self, seen: impl IntoIterator<Item = (String, u32)>) {
        self.positions.extend(seen);
    }

    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    /// Delivers `event` to every subscriber it concerns.
    pub fn publish(&mut self, event: &EventView) {
        if let (EventKind::Accepted, Some(position)) = (event.kind, event.position) {
            // The `accepted` event says where it stands: no `position` event to repeat it.
            self.positions.insert(event.task_id.clone(), position);
        }
        self.deliver(event, false);
        let merged_away = event
            .task
            .as_ref()
            .is_some_and(|t| t.state == TaskState::Merged && t.task_id == event.task_id);
        if event.kind == EventKind::Merged && merged_away {
            // The message's own task ended: a session watch sees that as for any task
            // (a task watch follows the message into `into` instead).
            let finished = EventView {
                kind: EventKind::Finished,
                ..event.clone()
            };
            self.deliver(&finished, true);
        }
    }

    fn deliver(&mut self, event: &EventView, sessions_only: bool) {
        self.subscribers.retain_mut(|sub| {
            let concerned = match &sub.filter {
                Filter::Task(id) => !sessions_only && *id == event.task_id,
                Filter::Session(session) => *session == event.session,
            };
            if !concerned {
                return !sub.events.is_closed();
            }
            if sub.events.send(event.clone()).is_err() {
                return false;
            }
            match (&mut sub.filter, event.kind, &event.into) {
                // The watched message went into another task: follow that one.
                (Filter::Task(id), EventKind::Merged, Some(into)) => {
                    *id = into.clone();
                    self.positions_version = None;
                    true
                }
                (Filter::Task(_), EventKind::Finished, _) => false,
                _ => true,
            }
        });
    }

    /// The task ids and the sessions that subscribers watch (each once), so that
    /// only their positions are computed.
    pub fn watched(&self) -> (Vec<String>, Vec<String>) {
        let (mut tasks, mut sessions) = (Vec::new(), Vec::new());
        for sub in &self.subscribers {
            match &sub.filter {
                Filter::Task(id) => tasks.push(id.clone()),
                Filter::Session(s) => sessions.push(s.clone()),
            }
        }
        tasks.sort();
        tasks.dedup();
        sessions.sort();
        sessions.dedup();
        (tasks, sessions)
    }

    /// Reports queued tasks whose position changed since the last call. `current`
    /// holds every watched queued task: `(task_id, session, position)`; a task left
    /// out is forgotten.
    pub fn publish_positions(&mut self, current: Vec<(String, String, u32)>) {
        if std::mem::take(&mut self.reseed) {
            // Called in the same loop turn as the snapshot: nothing moved since.
            self.positions = current.into_iter().map(|(id, _, p)| (id, p)).collect();
            return;
        }
        let mut next = HashMap::with_capacity(current.len());
        for (task_id, session, position) in current {
            if next.contains_key(&task_id) {
                // Watched twice (by id and by session): one event.
                continue;
            }
            if self.positions.get(&task_id) != Some(&position) && !self.subscribers.is_empty() {
                self.publish(&EventView {
                    kind: EventKind::Position,
                    task_id: task_id.clone(),
                    session,
                    position: Some(position),
                    text: None,
                    into: None,
                    task: None,
                    at: Some(rfc3339(now_millis())),
                });
            }
            next.insert(task_id, position);
        }
        self.positions = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Outbox, OUTPUT_BUDGET};
    use agentd_proto::control::Response;
    use std::sync::Arc;

    /// A sink on a fresh connection, answered, and a way to read what it got.
    fn sink() -> (EventSink, Arc<Outbox>) {
        let outbox = Outbox::new(OUTPUT_BUDGET);
        let (sink, answer) = EventSink::new(&outbox, 1, 1);
        answer.answer(&Response::ok(1, "watching"));
        (sink, outbox)
    }

    /// The events queued on `outbox` (after the watch's answer).
    fn received(outbox: &Outbox) -> Vec<EventView> {
        outbox.finish_reading();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut events = Vec::new();
        rt.block_on(async {
            while let Ok(Some(line)) =
                tokio::time::timeout(std::time::Duration::from_millis(50), outbox.next()).await
            {
                let response: Response = serde_json::from_slice(&line).unwrap();
                events.extend(response.event);
            }
        });
        events
    }

    fn event(kind: EventKind, task: &str, into: Option<&str>) -> EventView {
        EventView {
            kind,
            task_id: task.into(),
            session: "s".into(),
            position: None,
            text: None,
            into: into.map(String::from),
            task: None,
            at: None,
        }
    }

    #[test]
    fn task_subscribers_follow_merges_and_end_on_finish() {
        let mut subs = Subscriptions::default();
        let (tx, rx) = sink();
        subs.add(Filter::Task("a".into()), tx);
        subs.publish(&event(EventKind::Progress, "b", None));
        subs.publish(&event(EventKind::Merged, "a", Some("b")));
        subs.publish(&event(EventKind::Progress, "b", None));
        subs.publish(&event(EventKind::Finished, "b", None));
        assert!(subs.is_empty());
        let kinds: Vec<(EventKind, String)> = received(&rx)
            .into_iter()
            .map(|e| (e.kind, e.task_id))
            .collect();
        assert_eq!(
            kinds,
            [
                (EventKind::Merged, "a".into()),
                (EventKind::Progress, "b".into()),
                (EventKind::Finished, "b".into())
            ]
        );
    }

    fn merged_view(task: &str, into: &str) -> agentd_proto::control::TaskView {
        agentd_proto::control::TaskView {
            task_id: task.into(),
            session: "s".into(),
            state: TaskState::Merged,
            position: None,
            pid: None,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            started_at: None,
            finished_at: Some("2026-01-01T00:00:01.000Z".into()),
            text: "x".into(),
            progress: None,
            result: None,
            exit: None,
            merged_into: Some(into.into()),
            priority: Default::default(),
            stopping: None,
        }
    }

    #[test]
    fn a_session_watch_sees_a_merged_message_finish_and_a_task_watch_follows_it() {
        let mut subs = Subscriptions::default();
        let (session_tx, session_rx) = sink();
        let (task_tx, task_rx) = sink();
        subs.add(Filter::Session("s".into()), session_tx);
        subs.add(Filter::Task("a".into()), task_tx);
        let mut merged = event(EventKind::Merged, "a", Some("b"));
        merged.task = Some(merged_view("a", "b"));
        subs.publish(&merged);
        let kinds = |rx: &Outbox| {
            received(rx)
                .into_iter()
                .map(|e| (e.kind, e.task_id))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(&session_rx),
            [
                (EventKind::Merged, "a".into()),
                (EventKind::Finished, "a".into())
            ]
        );
        assert_eq!(kinds(&task_rx), [(EventKind::Merged, "a".into())]);
        assert_eq!(subs.len(), 2, "the task watch now follows b");
    }

    #[test]
    fn accepted_is_not_repeated_as_a_position_and_positions_carry_a_time() {
        let mut subs = Subscriptions::default();
        let (tx, rx) = sink();
        subs.add(Filter::Session("s".into()), tx);
        let mut accepted = event(EventKind::Accepted, "t", None);
        accepted.position = Some(1);
        subs.publish(&accepted);
        subs.publish_positions(vec![("t".into(), "s".into(), 1)]);
        subs.publish_positions(vec![("t".into(), "s".into(), 2)]);
        let events: Vec<EventView> = received(&rx);
        let kinds: Vec<(EventKind, Option<u32>)> =
            events.iter().map(|e| (e.kind, e.position)).collect();
        assert_eq!(
            kinds,
            [
                (EventKind::Accepted, Some(1)),
                (EventKind::Position, Some(2))
            ]
        );
        assert!(events[1].at.is_some(), "{:?}", events[1]);
    }

    #[test]
    fn a_first_watcher_is_not_told_again_the_positions_its_snapshot_gave() {
        let mut subs = Subscriptions::default();
        // Nobody watched: positions were never published.
        subs.publish_positions(vec![("t".into(), "s".into(), 3)]);
        let (tx, rx) = sink();
        subs.add(Filter::Session("s".into()), tx);
        subs.publish_positions(vec![
            ("t".into(), "s".into(), 1),
            ("u".into(), "s".into(), 2),
        ]);
        subs.publish_positions(vec![("u".into(), "s".into(), 1)]);
        let events: Vec<(String, Option<u32>)> = received(&rx)
            .into_iter()
            .map(|e| (e.task_id, e.position))
            .collect();
        assert_eq!(
            events,
            [("u".into(), Some(1))],
            "the snapshot already said where t and u stood; only u's move is news"
        );
    }

    #[test]
    fn watched_lists_each_task_and_session_once_and_positions_go_out_once() {
        let mut subs = Subscriptions::default();
        let mut outboxes = Vec::new();
        for filter in [
            Filter::Task("t".into()),
            Filter::Task("t".into()),
            Filter::Session("s".into()),
            Filter::Session("s".into()),
        ] {
            let (tx, rx) = sink();
            subs.add(filter, tx);
            outboxes.push(rx);
        }
        assert_eq!(subs.watched(), (vec!["t".into()], vec!["s".into()]));
        // The first call after the first watch only records (the snapshot said it).
        subs.publish_positions(vec![("t".into(), "s".into(), 4)]);
        // `t` is watched by id and through its session: one report of its position,
        // to each of the four subscribers.
        subs.publish_positions(vec![
            ("t".into(), "s".into(), 3),
            ("t".into(), "s".into(), 3),
        ]);
        for rx in &outboxes {
            let positions: Vec<(String, Option<u32>)> = received(rx)
                .into_iter()
                .map(|e| (e.task_id, e.position))
                .collect();
            assert_eq!(positions, [("t".to_string(), Some(3))]);
        }
    }

    #[test]
    fn positions_are_computed_again_after_an_order_change_a_new_watch_or_a_merge() {
        let mut subs = Subscriptions::default();
        let (tx, _rx) = sink();
        subs.add(Filter::Task("a".into()), tx);
        assert!(!subs.positions_current(7));
        subs.set_positions_version(7);
        assert!(subs.positions_current(7));
        assert!(!subs.positions_current(8), "the order changed");
        let (tx, _rx2) = sink();
        subs.add(Filter::Session("s".into()), tx);
        assert!(!subs.positions_current(7), "a new watcher");
        subs.set_positions_version(7);
        subs.publish(&event(EventKind::Merged, "a", Some("b")));
        assert!(!subs.positions_current(7), "the watch follows another task");
    }

    #[test]
    fn a_later_watcher_is_not_told_again_the_positions_its_snapshot_gave() {
        let mut subs = Subscriptions::default();
        let (first, first_rx) = sink();
        subs.add(Filter::Task("t".into()), first);
        subs.publish_positions(vec![("t".into(), "s".into(), 2)]);
        // A second watcher of another task, whose snapshot said "u is 3rd".
        let (second, second_rx) = sink();
        subs.add(Filter::Task("u".into()), second);
        subs.seed_positions([("u".to_string(), 3)]);
        subs.publish_positions(vec![
            ("t".into(), "s".into(), 2),
            ("u".into(), "s".into(), 3),
        ]);
        subs.publish_positions(vec![
            ("t".into(), "s".into(), 1),
            ("u".into(), "s".into(), 2),
        ]);
        let moves = |rx: &Outbox| {
            received(rx)
                .into_iter()
                .map(|e| (e.task_id, e.position))
                .collect::<Vec<_>>()
        };
        assert_eq!(moves(&first_rx), [("t".into(), Some(1))]);
        assert_eq!(moves(&second_rx), [("u".into(), Some(2))]);
    }

    #[test]
    fn gone_clients_are_dropped_and_positions_report_changes_only() {
        let mut subs = Subscriptions::default();
        let (tx, rx) = sink();
        subs.add(Filter::Session("s".into()), tx);
        rx.close();
        subs.publish(&event(EventKind::Progress, "x", None));
        assert!(subs.is_empty());

        let (tx, rx) = sink();
        subs.add(Filter::Session("s".into()), tx);
        // (The first call only takes stock: the watch's snapshot said where t stands.)
        subs.publish_positions(vec![("t".into(), "s".into(), 3)]);
        subs.publish_positions(vec![("t".into(), "s".into(), 2)]);
        subs.publish_positions(vec![("t".into(), "s".into(), 2)]);
        subs.publish_positions(vec![("t".into(), "s".into(), 1)]);
        drop(subs);
        let positions: Vec<Option<u32>> = received(&rx).into_iter().map(|e| e.position).collect();
        assert_eq!(positions, [Some(2), Some(1)]);
    }
}
