//! agentd's side of the store (`agentd-store`): opening it at start, the mapping
//! between core tasks and stored records, and putting recovered work back into the
//! dispatcher. The SQL itself lives in `agentd-store`.

use std::borrow::Cow;
use std::time::Duration;

use agentd_core::{Ending, Interruption, Message, Mode, Priority, QueueSettings, Task, TaskState};
use agentd_proto::text;
use agentd_store::{Exit, Op, Recovery, State, Store, StoreOptions, TaskRecord};

use crate::config::DaemonConfig;
use crate::supervisor::history::{History, MemoryHistory};
use crate::views;

/// The open store and what it held at start.
pub struct Durable {
    pub store: Store,
    pub recovery: Recovery,
}

/// Opens (creating, migrating, recovering) the store in the state dir. A corrupt,
/// foreign or unreadable file is an error naming the file and what to do.
pub fn open(config: &DaemonConfig) -> anyhow::Result<Durable> {
    let options = StoreOptions {
        interrupted_reason: text::INTERRUPTED_BY_CRASH.to_string(),
        retention: config.retention,
        // The de-duplication window is seeded from the store at start.
        recent_messages: config.dispatch.dedup_window,
        // Recovery reads the queue a page at a time (`Supervisor::restore_queued_from_store`).
        read_queued: false,
        ..StoreOptions::default()
    };
    let (store, recovery) = Store::open(&config.state_dir, options)?;
    Ok(Durable { store, recovery })
}

/// A priority's spelling in the store: its one name table ([`agentd_core::Named`]).
pub(crate) fn priority_name(p: Priority) -> &'static str {
    p.as_str()
}

/// A stored priority; an unknown name (never written by agentd) is interactive.
fn parse_priority(name: &str) -> Priority {
    <Priority as agentd_core::Named>::from_name(name).unwrap_or(Priority::Interactive)
}

/// The record of a message the dispatcher accepted as a new queued task.
pub(crate) fn queued_record(message: &Message, mode: Option<Mode>, created_at: u64) -> TaskRecord {
    let mut record = TaskRecord::queued(
        message.task_id,
        &message.session,
        &message.text,
        created_at as i64,
    );
    record.mode = mode.unwrap_or(Mode::Collect).as_str().to_string();
    record.priority = priority_name(message.priority).to_string();
    record.message_id = message.message_id.clone();
    record
}

/// The stored state of a finished task.
fn terminal_state(ending: &Ending) -> State {
    match ending {
        Ending::Succeeded => State::Succeeded,
        Ending::Failed { .. } => State::Failed,
        Ending::Cancelled { .. } => State::Cancelled,
        Ending::Interrupted { .. } => State::Interrupted,
        Ending::Expired => State::Expired,
        Ending::Dropped => State::Dropped,
        Ending::Merged { .. } => State::Merged,
    }
}

/// The write that records a finished task: its state, result, exit, and its whole
/// wire view (JSON) as the ending, so history can be shown after a restart.
pub(crate) fn finish_op(task: &Task) -> Option<Op> {
    let TaskState::Done { ending, exit } = &task.state else {
        return None;
    };
    let view = views::task_view(task, None);
    Some(Op::Finish {
        id: task.id,
        state: terminal_state(ending),
        at: task.finished_at.map(|m| m.0 as i64).unwrap_or(0),
        progress: task.progress.clone(),
        result: task.report.as_ref().map(|r| r.text.clone()),
        ending: serde_json::to_string(&view).ok(),
        reason: match ending {
            Ending::Failed { reason } => Some(reason.clone()),
            Ending::Interrupted { why, .. } => Some(views::interruption_reason(*why).to_string()),
            _ => None,
        },
        exit: exit.map(|e| Exit {
            code: e.code,
            signal: e.signal,
        }),
    })
}

/// A finished record as a core task for the in-memory history (the view's details
/// that have no core field, such as a recovery reason, are kept in the view JSON).
pub(crate) fn finished_task(record: &TaskRecord) -> Option<Task> {
    // The view written when it finished has what the record's columns do not: how a
    // stop ended it, the command's exit, the times the user was shown.
    let written = written_view(record);
    let exit = written.as_ref().and_then(|v| v.exit.as_ref());
    let by = exit.and_then(|e| e.ended_by).map(|step| match step {
        agentd_proto::control::StopStep::CooperativeCancel => {
            agentd_core::StopStep::CooperativeCancel
        }
        agentd_proto::control::StopStep::Sigterm => agentd_core::StopStep::Sigterm,
        agentd_proto::control::StopStep::Sigkill => agentd_core::StopStep::Sigkill,
    });
    let after = Duration::from_millis(exit.and_then(|e| e.stop_ms).unwrap_or(0));
    let command_exit = exit
        .filter(|e| e.command_code.is_some() || e.command_signal.is_some())
        .map(|e| agentd_core::ExitStatus {
            code: e.command_code,
            signal: e.command_signal,
        });
    let written_time = |stamp: Option<&str>| {
        stamp
            .and_then(|s| humantime::parse_rfc3339(s).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| agentd_core::Millis(d.as_millis() as u64))
    };
    let ending = match record.state {
        State::Succeeded => Ending::Succeeded,
        State::Failed => Ending::Failed {
            reason: record.reason.clone().unwrap_or_default(),
        },
        State::Cancelled => Ending::Cancelled { by, after },
        State::Interrupted => Ending::Interrupted {
            by,
            after,
            why: match record.reason.as_deref() {
                Some(text::INTERRUPTED_BY_CRASH) => Interruption::Crash,
                Some(text::INTERRUPTED_BY_SHUTDOWN) => Interruption::Shutdown,
                _ => Interruption::NewerMessage,
            },
        },
        State::Expired => Ending::Expired,
        State::Dropped => Ending::Dropped,
        State::Merged => Ending::Merged {
            into: merged_into(record).unwrap_or(record.id),
        },
        State::Queued | State::Starting | State::Running | State::Stopping => return None,
    };
    Some(Task {
        id: record.id,
        session: record.session.clone(),
        text: record.text.clone(),
        state: TaskState::Done {
            ending,
            exit: record.exit.map(|e| agentd_core::ExitStatus {
                code: e.code,
                signal: e.signal,
            }),
        },
        created_at: agentd_core::Millis(record.created_at.max(0) as u64),
        started_at: written_time(written.as_ref().and_then(|v| v.started_at.as_deref())).or(record
            .started_at
            .map(|m| agentd_core::Millis(m.max(0) as u64))),
        finished_at: record
            .finished_at
            .map(|m| agentd_core::Millis(m.max(0) as u64)),
        progress: record.progress.clone(),
        report: record.result.as_ref().map(|text| {
            Box::new(agentd_core::AgentReport {
                outcome: match record.state {
                    State::Succeeded => agentd_core::ReportOutcome::Succeeded,
                    State::Cancelled => agentd_core::ReportOutcome::Cancelled,
                    _ => agentd_core::ReportOutcome::Failed,
                },
                text: text.clone(),
                command_exit,
            })
        }),
        priority: parse_priority(&record.priority),
        mode: Mode::parse(&record.mode).unwrap_or(Mode::Collect),
        message_id: record.message_id.clone(),
    })
}

/// A finished record as `status` and `tasks` show it: the wire view written when it
/// finished (with every detail of its ending), in the state the store holds (a task
/// stopped for a shutdown is `interrupted`); else (ended by a recovery) built from
/// the record.
pub(crate) fn stored_view(record: &TaskRecord) -> Option<agentd_proto::control::TaskView> {
    if !record.state.is_terminal() {
        return None;
    }
    match written_view(record) {
        Some(mut view) => {
            view.state = wire_state(record.state);
            Some(view)
        }
        None => finished_task(record).map(|task| views::task_view(&task, None)),
    }
}

/// The wire view written when the task finished (the record's `ending`), if any.
fn written_view(record: &TaskRecord) -> Option<agentd_proto::control::TaskView> {
    record
        .ending
        .as_deref()
        .and_then(|json| serde_json::from_str::<agentd_proto::control::TaskView>(json).ok())
        .filter(|view| view.task_id == record.id.to_string())
}

fn wire_state(state: State) -> agentd_proto::control::TaskState {
    use agentd_proto::control::TaskState as W;
    match state {
        State::Queued => W::Queued,
        State::Starting => W::Starting,
        State::Running => W::Running,
        State::Stopping => W::Stopping,
        State::Succeeded => W::Succeeded,
        State::Failed => W::Failed,
        State::Cancelled => W::Cancelled,
        State::Interrupted => W::Interrupted,
        State::Expired => W::Expired,
        State::Dropped => W::Dropped,
        State::Merged => W::Merged,
    }
}

/// The task a merged record went into, from its stored view.
fn merged_into(record: &TaskRecord) -> Option<agentd_core::TaskId> {
    let view: agentd_proto::control::TaskView =
        serde_json::from_str(record.ending.as_deref()?).ok()?;
    agentd_core::TaskId::parse_str(view.merged_into.as_deref()?).ok()
}

/// A recovered queued record as the message that puts it back in its queue, with
/// the same id. Modes that act on the running task (steer, interrupt) come back as
/// follow-ups: the run they were meant for is gone.
pub(crate) fn recovered_message(record: &TaskRecord) -> Message {
    let mode = match Mode::parse(&record.mode) {
        Some(Mode::Collect) => Mode::Collect,
        _ => Mode::Followup,
    };
    Message {
        task_id: record.id,
        session: record.session.clone(),
        text: record.text.clone(),
        message_id: record.message_id.clone(),
        priority: parse_priority(&record.priority),
        mode: Some(mode),
    }
}

/// Stored settings as the dispatcher's, if every name is known.
pub(crate) fn settings(s: &agentd_store::SessionSettings) -> Option<QueueSettings> {
    Some(QueueSettings {
        mode: Mode::parse(&s.mode)?,
        debounce: Duration::from_millis(s.debounce_ms),
        cap: s.cap.max(1),
        drop: agentd_core::DropPolicy::parse(&s.drop_policy)?,
    })
}

pub(crate) fn settings_op(session: &str, s: QueueSettings) -> Op {
    Op::Settings(agentd_store::SessionSettings {
        session: session.to_string(),
        mode: s.mode.as_str().to_string(),
        debounce_ms: s.debounce.as_millis() as u64,
        cap: s.cap,
        drop_policy: s.drop.as_str().to_string(),
    })
}

/// History backed by the store: the newest tasks in memory (reloaded at start), and
/// any older finished task read from the store by id (one indexed lookup).
/// Listings (`tasks --all`) read the store on the reader thread instead
/// (`requests::stored`); `cached*` answer from memory only.
pub struct StoreHistory {
    memory: MemoryHistory,
    reader: Option<agentd_store::Reader>,
}

impl StoreHistory {
    pub fn new(capacity: usize, reader: Option<agentd_store::Reader>) -> StoreHistory {
        StoreHistory {
            memory: MemoryHistory::new(capacity),
            reader,
        }
    }
}

impl History for StoreHistory {
    fn record(&mut self, task: Task) {
        self.memory.record(task);
    }

    fn get(&self, id: &agentd_core::TaskId) -> Option<Cow<'_, Task>> {
        if let Some(task) = self.memory.get(id) {
            return Some(task);
        }
        let record = self.reader.as_ref()?.task(*id).ok()??;
        finished_task(&record).map(Cow::Owned)
    }

    fn iter<'a>(
        &'a self,
        session: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = Cow<'a, Task>> + 'a> {
        self.memory.iter(session)
    }

    fn cached(&self, id: &agentd_core::TaskId) -> Option<Cow<'_, Task>> {
        self.memory.get(id)
    }

    fn cached_ids_with_prefix(&self, prefix: &str) -> Vec<agentd_core::TaskId> {
        self.memory.ids_with_prefix(prefix)
    }

    fn ids_with_prefix(&self, prefix: &str) -> Vec<agentd_core::TaskId> {
        let mut ids = self.memory.ids_with_prefix(prefix);
        if let Some(reader) = &self.reader {
            ids.extend(reader.ids_with_prefix(prefix, 16).unwrap_or_default());
        }
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_comes_back_with_its_priority_and_id() {
        for priority in [Priority::Interactive, Priority::Background] {
            let mut message = Message::new(agentd_core::TaskId::from_u128(7), "cron", "report");
            message.priority = priority;
            message.message_id = Some("evt-1".into());
            let record = queued_record(&message, Some(Mode::Followup), 1);
            let back = recovered_message(&record);
            assert_eq!(back.priority, priority, "{record:?}");
            assert_eq!(
                (back.task_id, back.message_id, back.mode),
                (
                    message.task_id,
                    message.message_id.clone(),
                    Some(Mode::Followup)
                )
            );
        }
    }
}
