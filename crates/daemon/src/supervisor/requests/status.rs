//! `status` and `tasks`: where tasks stand.

use agentd_core::{Task, TaskId};
use agentd_proto::control::{LivenessView, StatusReply, TaskView};
use agentd_proto::text;

use std::borrow::Cow;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use agentd_proto::control::RequestBody;

use crate::control::{Reply, StatusSnapshot};
use crate::listing;
use crate::supervisor::{json, Supervisor};
use crate::views;

impl Supervisor {
    /// A chat's `/status` (of one task: see `status_of`).
    pub(crate) fn chat_status(&self, session: &str) -> Reply {
        let status = self.status_reply();
        let (mine, more) = self.chat_status_tasks(session);
        Ok(self.chat_reply(
            "status",
            text::chat_status(status.capacity, status.queued, &mine, more),
            serde_json::to_value(&status).unwrap_or_default(),
        ))
    }

    /// What a chat's `/status` lists: its active task and its first
    /// [`text::CHAT_STATUS_QUEUED`] queued ones, and how many more are queued:
    /// O(shown · log² n), however long the chat's queue.
    fn chat_status_tasks(&self, session: &str) -> (Vec<TaskView>, usize) {
        let active = self
            .dispatcher
            .active_task(session)
            .and_then(|id| self.dispatcher.task(&id))
            .map(|t| views::task_view(t, None));
        let queued = self
            .dispatcher
            .queued_tasks_of(session)
            .take(text::CHAT_STATUS_QUEUED)
            .map(|t| views::task_view(t, self.dispatcher.position(&t.id)));
        let shown: Vec<TaskView> = active.into_iter().chain(queued).collect();
        let more = self
            .dispatcher
            .n_queued_in(session)
            .saturating_sub(text::CHAT_STATUS_QUEUED);
        (shown, more)
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
            pid: self.info.pid,
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

    /// Brings the connections' status snapshot (see
    /// [`crate::control::ServerInfo::status`]) up to date at the end of a loop step:
    /// the counts always (O(1)), the rest only when the step may have changed the
    /// active tasks (O(active)), so a `send` costs no rebuild of the active views.
    pub(crate) fn refresh_status(&mut self, touched: Touched) {
        let capacity = views::capacity(self.dispatcher.capacity());
        let queued = self.dispatcher.n_queued() as u32;
        let sessions = self.dispatcher.n_sessions() as u32;
        let key = match (touched, self.status_key) {
            (Touched::Nothing, Some(_)) => None,
            (Touched::Live | Touched::Progress(_), Some(old)) => {
                Some(self.active_key()).filter(|k| *k != old)
            }
            _ => Some(self.active_key()),
        };
        // A progress line changes one task's view: patched in place, not rebuilt
        // (a chatty agent must not cost a copy of every active task per line).
        let patched = match (touched, key) {
            (Touched::Progress(task_id), None) => {
                let progress = self
                    .dispatcher
                    .task(&task_id)
                    .and_then(|t| t.progress.as_ref());
                self.info
                    .set_status_progress(&task_id.to_string(), progress)
            }
            (Touched::Progress(_), Some(_)) => false,
            _ => true,
        };
        match key {
            None if patched && self.info.set_status_counts(capacity, queued, sessions) => {}
            _ => {
                self.status_key = Some(key.unwrap_or_else(|| self.active_key()));
                self.info.set_status(StatusSnapshot {
                    capacity,
                    queued,
                    sessions,
                    rest: Arc::new(self.status_reply()),
                });
            }
        }
    }

    /// A key of what the active tasks' views show but their progress: which tasks,
    /// their states, pids and start times, their texts' lengths (a steered message)
    /// and their results. An agent's message, its reap and its tree's report change
    /// nothing else of the snapshot (progress is patched in place, the counts are set
    /// every step, the rest is fixed at start), so such a step rebuilds the snapshot
    /// only when this key changed (an agent's Features, or a reap before its channel
    /// drained, cost no rebuild). Hashed with foldhash's fixed-seed quality variant:
    /// every `send` computes it, and std's SipHash made that 1,760 instructions of the
    /// loop's per message (callgrind), foldhash 360.
    fn active_key(&self) -> u64 {
        let mut h = foldhash::quality::FixedState::default().build_hasher();
        for task in self.dispatcher.active_tasks() {
            task.id.hash(&mut h);
            std::mem::discriminant(&task.state).hash(&mut h);
            task.state.pid().hash(&mut h);
            task.started_at.hash(&mut h);
            task.text.len().hash(&mut h);
            task.report.as_ref().map(|r| &r.text).hash(&mut h);
        }
        h.finish()
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
            return Some(self.live_view(task));
        }
        self.history
            .get(task_id)
            .map(|t| views::task_view(&t, None))
    }
}

impl Supervisor {
    /// The view of a task the dispatcher holds, with its position if queued and, if
    /// stopping, how far its stop is (the next step included, from the armed timers).
    pub(crate) fn live_view(&self, task: &Task) -> TaskView {
        let mut view = views::task_view(task, self.dispatcher.position(&task.id));
        if view.stopping.is_some() {
            view.stopping = self.stopping(&task.id);
        }
        view
    }
}

/// What a loop step may have changed of what `status` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Touched {
    /// A read-only request: nothing.
    Nothing,
    /// A `send`, an agent's message other than progress, a reap or a tree's report:
    /// the counts, and maybe what the active tasks' key covers (see `active_key`).
    Live,
    /// An agent's progress line: that task's progress (and what `Live` may change).
    Progress(TaskId),
    /// Anything (timers, shutdown, stops, queue edits, resumes, store events).
    Anything,
}

impl Touched {
    /// What an agent's message (or the end of its channel) may change.
    pub(crate) fn by_agent(event: &crate::agent_io::AgentEvent) -> Touched {
        use agentd_proto::ipc::AgentMsg;
        match &event.input {
            crate::agent_io::AgentInput::Msg(AgentMsg::Progress { .. }) => {
                Touched::Progress(event.task_id)
            }
            _ => Touched::Live,
        }
    }

    pub(crate) fn by(request: &RequestBody) -> Touched {
        match request {
            RequestBody::Status { .. }
            | RequestBody::Tasks { .. }
            | RequestBody::Log { .. }
            | RequestBody::Watch { .. }
            | RequestBody::Hello { .. }
            | RequestBody::Ping => Touched::Nothing,
            RequestBody::Send { .. } => Touched::Live,
            RequestBody::Stop { .. } | RequestBody::Queue { .. } | RequestBody::Resume { .. } => {
                Touched::Anything
            }
        }
    }
}
