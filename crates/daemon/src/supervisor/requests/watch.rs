//! `watch` and the live events published to subscribers.

use agentd_core::{Ending, Task, TaskId, TaskState};
use agentd_proto::control::{ErrorBody, ErrorCode, EventKind, EventView, TaskView, WatchReply};
use agentd_proto::text;

use crate::control::{self, Reply};
use crate::events::Filter;
use crate::supervisor::requests::check_session;
use crate::supervisor::{err, json, Supervisor};
use crate::views::{self, now_millis};

impl Supervisor {
    /// Subscribes `events` to a task or a session, after a snapshot of where it stands.
    pub(crate) fn watch(
        &mut self,
        task_id: Option<String>,
        session: Option<String>,
        events: Option<control::EventSink>,
    ) -> Reply {
        let Some(events) = events else {
            return err(ErrorCode::Internal, "watch without an event channel");
        };
        match (task_id, session) {
            (Some(id), None) => {
                let mut task_id = self.resolve(&id)?;
                let mut followed = None;
                // Follow the message into the task it went into, as a live watcher would.
                for _ in 0..16 {
                    let view = self
                        .view(&task_id)
                        .ok_or_else(|| ErrorBody::new(ErrorCode::NotFound, text::no_task(&id)))?;
                    match (&view.merged_into, view.state.is_terminal()) {
                        (Some(into), _) => {
                            let into_id = TaskId::parse_str(into)
                                .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
                            let _ = events.send(event_of(
                                EventKind::Merged,
                                &view,
                                None,
                                Some(into.clone()),
                            ));
                            task_id = into_id;
                        }
                        (None, true) => {
                            let _ = events.send(event_of(EventKind::Finished, &view, None, None));
                            followed = Some(view);
                            break;
                        }
                        (None, false) => {
                            let _ = events.send(snapshot_event(&view));
                            self.subscriptions
                                .add(Filter::Task(view.task_id.clone()), events);
                            self.subscriptions
                                .seed_positions(view.position.map(|p| (view.task_id.clone(), p)));
                            followed = Some(view);
                            break;
                        }
                    }
                }
                json(WatchReply {
                    task_id: Some(task_id.to_string()),
                    session: None,
                    task: followed,
                })
            }
            (None, Some(session)) => {
                check_session(&session)?;
                let snapshot = self.list(Some(&session), false);
                for view in &snapshot {
                    let _ = events.send(snapshot_event(view));
                }
                self.subscriptions
                    .add(Filter::Session(session.clone()), events);
                // The snapshot said where its queued tasks stand: not news to repeat.
                self.subscriptions.seed_positions(
                    snapshot
                        .into_iter()
                        .filter_map(|v| Some((v.task_id, v.position?))),
                );
                json(WatchReply {
                    task_id: None,
                    session: Some(session),
                    task: None,
                })
            }
            _ => err(ErrorCode::BadRequest, text::WATCH_TARGETS),
        }
    }

    /// Publishes an event about a task that is queued or active.
    pub(crate) fn publish_task(
        &mut self,
        kind: EventKind,
        task_id: &TaskId,
        text: Option<String>,
        into: Option<String>,
    ) {
        if self.subscriptions.is_empty() {
            return;
        }
        if let Some(view) = self.view(task_id) {
            self.subscriptions
                .publish(&event_of(kind, &view, text, into));
        }
    }

    /// Publishes how a task ended (merged, dropped, expired, finished).
    pub(crate) fn publish_finished(&mut self, task: &Task) {
        if self.subscriptions.is_empty() {
            return;
        }
        let view = views::task_view(task, None);
        let kinds: &[EventKind] = match &task.state {
            TaskState::Done {
                ending: Ending::Merged { .. },
                ..
            } => &[EventKind::Merged],
            TaskState::Done {
                ending: Ending::Dropped,
                ..
            } => &[EventKind::Dropped, EventKind::Finished],
            TaskState::Done {
                ending: Ending::Expired,
                ..
            } => &[EventKind::Expired, EventKind::Finished],
            _ => &[EventKind::Finished],
        };
        for kind in kinds {
            self.subscriptions
                .publish(&event_of(*kind, &view, None, view.merged_into.clone()));
        }
    }

    /// Tells watchers about queued tasks whose position changed.
    pub(crate) fn publish_positions(&mut self) {
        if self.subscriptions.is_empty() {
            return;
        }
        // Only when an order changed, and only the watched tasks: O(watched · log² n),
        // not the whole queue.
        let version = self.dispatcher.order_version();
        if self.subscriptions.positions_current(version) {
            return;
        }
        let (task_ids, sessions) = self.subscriptions.watched();
        let task_ids: Vec<TaskId> = task_ids
            .iter()
            .filter_map(|t| TaskId::parse_str(t).ok())
            .collect();
        let mut current: Vec<(String, String, u32)> = Vec::new();
        for (id, p) in self.dispatcher.positions_of(&task_ids) {
            if let Some(t) = self.dispatcher.task(&id) {
                current.push((id.to_string(), t.session.clone(), p));
            }
        }
        for session in sessions {
            for (id, p) in self.dispatcher.session_positions(&session) {
                current.push((id.to_string(), session.clone(), p));
            }
        }
        self.subscriptions.publish_positions(current);
        self.subscriptions.set_positions_version(version);
    }
}

pub(crate) fn event_of(
    kind: EventKind,
    view: &TaskView,
    text: Option<String>,
    into: Option<String>,
) -> EventView {
    EventView {
        kind,
        task_id: view.task_id.clone(),
        session: view.session.clone(),
        position: view.position,
        text,
        into,
        task: Some(view.clone()),
        at: Some(views::rfc3339(now_millis())),
    }
}

/// Where a live task stands, as the first event of a watch: its position if queued,
/// else `started`.
pub(crate) fn snapshot_event(view: &TaskView) -> EventView {
    let kind = if view.position.is_some() {
        EventKind::Position
    } else {
        EventKind::Started
    };
    event_of(kind, view, None, None)
}
