//! `status` and `tasks`: where tasks stand.

use agentd_core::{Task, TaskId};
use agentd_proto::control::{LivenessView, StatusReply, TaskView};
use agentd_proto::text;

use std::borrow::Cow;

use crate::control::Reply;
use crate::listing;
use crate::supervisor::{json, Supervisor};
use crate::views;

impl Supervisor {
    /// A chat's `/status` (of one task: see `status_of`).
    pub(crate) fn chat_status(&self, session: &str) -> Reply {
        let status = self.status_reply();
        let mine = self.list(Some(session), false);
        Ok(self.chat_reply(
            "status",
            text::chat_status(status.capacity, status.queued, &mine),
            serde_json::to_value(&status).unwrap_or_default(),
        ))
    }

    /// `status` of the whole daemon (of one task: see `status_of`).
    pub(crate) fn status(&self) -> Reply {
        json(self.status_reply())
    }

    pub(crate) fn status_reply(&self) -> StatusReply {
        let mut active: Vec<TaskView> = self
            .dispatcher
            .active_tasks()
            .map(|t| views::task_view(t, None))
            .collect();
        active.sort_by(|a, b| (&a.started_at, &a.task_id).cmp(&(&b.started_at, &b.task_id)));
        StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_ms: self.info.started.elapsed().as_millis() as u64,
            capacity: views::capacity(self.dispatcher.capacity()),
            queued: self.dispatcher.n_queued() as u32,
            sessions: self.dispatcher.n_sessions() as u32,
            active,
            containment: Some(views::containment(&self.procs.containment())),
            liveness: Some(LivenessView {
                heartbeat_ms: self.config.agents.heartbeat.as_millis() as u64,
                hung_after_ms: self.liveness.hung_after.map(|d| d.as_millis() as u64),
                task_timeout_ms: self.liveness.task_timeout.map(|d| d.as_millis() as u64),
                frame_timeout_ms: self.config.agents.frame_timeout.as_millis() as u64,
            }),
            recovery: self.recovery.clone(),
        }
    }

    /// Active tasks first (by start), then queued ones by position, then (with `all`)
    /// finished ones, oldest first.
    pub(crate) fn list(&self, session: Option<&str>, all: bool) -> Vec<TaskView> {
        let in_session = |t: &&Task| session.is_none_or(|s| t.session == s);
        let mut active: Vec<&Task> = self.dispatcher.active_tasks().filter(in_session).collect();
        active.sort_by_key(|t| (t.started_at, t.id));
        // Queued tasks in admission order, without sorting the whole queue.
        let queued: Vec<(&Task, u32)> = match session {
            Some(s) => self
                .dispatcher
                .session_positions(s)
                .into_iter()
                .filter_map(|(id, p)| Some((self.dispatcher.task(&id)?, p)))
                .collect(),
            None => self.dispatcher.queued_in_order().collect(),
        };
        let mut views: Vec<TaskView> = active
            .into_iter()
            .map(|t| views::task_view(t, None))
            .chain(
                queued
                    .into_iter()
                    .map(|(t, p)| views::task_view(t, Some(p))),
            )
            .collect();
        if all {
            let done = self
                .history
                .iter(session)
                .map(|task| views::task_view(&task, None));
            views.extend(done);
        }
        views
    }

    /// `tasks`: one page with `limit` or `cursor` (see [`crate::listing`]), else
    /// the whole listing in display order if it fits in one page.
    pub(crate) fn tasks(
        &self,
        session: Option<&str>,
        all: bool,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Reply {
        // Only the tasks a page shows need a position: O(log² n) each, not a table
        // of the whole queue.
        let position = |id: &TaskId| self.dispatcher.position(id);
        let live = self.dispatcher.tasks().map(Cow::Borrowed);
        let history = all
            .then(|| self.history.iter(session))
            .into_iter()
            .flatten();
        let tasks = live.chain(history);
        if limit.is_none() && cursor.is_none() {
            listing::check_fits(tasks, position, session)?;
            json(self.list(session, all))
        } else {
            json(listing::page(tasks, position, session, limit, cursor)?)
        }
    }

    pub(crate) fn view(&self, task_id: &TaskId) -> Option<TaskView> {
        if let Some(task) = self.dispatcher.task(task_id) {
            return Some(views::task_view(task, self.dispatcher.position(task_id)));
        }
        self.history
            .get(task_id)
            .map(|t| views::task_view(&t, None))
    }
}
