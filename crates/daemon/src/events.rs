//! Live events: who watches what, and delivery to them.
//!
//! A subscriber watches one task or one session. Events go out in the order the
//! supervisor publishes them. A task subscriber follows its task when the message is
//! merged into another task (collected or steered), and is dropped after that
//! task's `finished` event, which ends the client's stream. A subscriber whose
//! client went away is dropped at the next event.

use std::collections::HashMap;

use agentd_proto::control::{EventKind, EventView};
use tokio::sync::mpsc;

/// What a subscriber watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Task(String),
    Session(String),
}

struct Subscriber {
    filter: Filter,
    events: mpsc::UnboundedSender<EventView>,
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
}

impl Subscriptions {
    pub fn add(&mut self, filter: Filter, events: mpsc::UnboundedSender<EventView>) {
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

    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    /// Delivers `event` to every subscriber it concerns.
    pub fn publish(&mut self, event: &EventView) {
        self.subscribers.retain_mut(|sub| {
            let concerned = match &sub.filter {
                Filter::Task(id) => *id == event.task_id,
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
                    at: None,
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
        let (tx, mut rx) = mpsc::unbounded_channel();
        subs.add(Filter::Task("a".into()), tx);
        subs.publish(&event(EventKind::Progress, "b", None));
        subs.publish(&event(EventKind::Merged, "a", Some("b")));
        subs.publish(&event(EventKind::Progress, "b", None));
        subs.publish(&event(EventKind::Finished, "b", None));
        assert!(subs.is_empty());
        let kinds: Vec<(EventKind, String)> = std::iter::from_fn(|| rx.try_recv().ok())
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

    #[test]
    fn watched_lists_each_task_and_session_once_and_positions_go_out_once() {
        let mut subs = Subscriptions::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        subs.add(Filter::Task("t".into()), tx.clone());
        subs.add(Filter::Task("t".into()), tx.clone());
        subs.add(Filter::Session("s".into()), tx.clone());
        subs.add(Filter::Session("s".into()), tx);
        assert_eq!(subs.watched(), (vec!["t".into()], vec!["s".into()]));
        // `t` is watched by id and through its session: one report of its position,
        // to each of the four subscribers.
        subs.publish_positions(vec![
            ("t".into(), "s".into(), 3),
            ("t".into(), "s".into(), 3),
        ]);
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 4);
    }

    #[test]
    fn positions_are_computed_again_after_an_order_change_a_new_watch_or_a_merge() {
        let mut subs = Subscriptions::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        subs.add(Filter::Task("a".into()), tx.clone());
        assert!(!subs.positions_current(7));
        subs.set_positions_version(7);
        assert!(subs.positions_current(7));
        assert!(!subs.positions_current(8), "the order changed");
        subs.add(Filter::Session("s".into()), tx);
        assert!(!subs.positions_current(7), "a new watcher");
        subs.set_positions_version(7);
        subs.publish(&event(EventKind::Merged, "a", Some("b")));
        assert!(!subs.positions_current(7), "the watch follows another task");
    }

    #[test]
    fn gone_clients_are_dropped_and_positions_report_changes_only() {
        let mut subs = Subscriptions::default();
        let (tx, rx) = mpsc::unbounded_channel();
        subs.add(Filter::Session("s".into()), tx);
        drop(rx);
        subs.publish(&event(EventKind::Progress, "x", None));
        assert!(subs.is_empty());

        let (tx, mut rx) = mpsc::unbounded_channel();
        subs.add(Filter::Session("s".into()), tx);
        subs.publish_positions(vec![("t".into(), "s".into(), 2)]);
        subs.publish_positions(vec![("t".into(), "s".into(), 2)]);
        subs.publish_positions(vec![("t".into(), "s".into(), 1)]);
        let positions: Vec<Option<u32>> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.position)
            .collect();
        assert_eq!(positions, [Some(2), Some(1)]);
    }
}
