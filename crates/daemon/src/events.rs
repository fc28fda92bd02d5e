//! Live events: who watches what, and delivery to them.
//!
//! A subscriber watches one task or one session. Events go out in the order the
//! supervisor publishes them. A task subscriber follows its task when the message is
//! merged into another task (collected or steered), and is dropped after that
//! task's `finished` event, which ends the client's stream. A subscriber whose
//! client went away, or that fell too far behind (it gets a `lagged` notice, see
//! [`crate::outbox`]), is dropped at the next event.

use std::collections::HashMap;

use agentd_proto::control::{EventKind, EventView};

use crate::outbox::EventSink;

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
}

impl Subscriptions {
    pub fn add(&mut self, filter: Filter, events: EventSink) {
        self.subscribers.push(Subscriber { filter, events });
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
                    true
                }
                (Filter::Task(_), EventKind::Finished, _) => false,
                _ => true,
            }
        });
    }

    /// Reports queued tasks whose position changed since the last call. `current`
    /// holds every queued task: `(task_id, session, position)`.
    pub fn publish_positions(&mut self, current: Vec<(String, String, u32)>) {
        let mut next = HashMap::with_capacity(current.len());
        for (task_id, session, position) in current {
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
        subs.publish_positions(vec![("t".into(), "s".into(), 2)]);
        subs.publish_positions(vec![("t".into(), "s".into(), 2)]);
        subs.publish_positions(vec![("t".into(), "s".into(), 1)]);
        drop(subs);
        let positions: Vec<Option<u32>> = received(&rx).into_iter().map(|e| e.position).collect();
        assert_eq!(positions, [Some(2), Some(1)]);
    }
}
