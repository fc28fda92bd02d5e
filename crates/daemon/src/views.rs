//! Conversion of core types into the wire views of `agentd-proto`. Core types stay
//! free of serde; this is the boundary. (The texts users read are in
//! `agentd_proto::text`.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_core::{
    DropPolicy, Ending, Millis, Mode, Priority, QueueSettings, StopStep, Task, TaskState,
};
use agentd_proto::control::{self, Capacity, ExitView, TaskView};

pub fn now_millis() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

pub fn rfc3339(ms: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.0)).to_string()
}

pub fn stop_step(step: StopStep) -> control::StopStep {
    match step {
        StopStep::CooperativeCancel => control::StopStep::CooperativeCancel,
        StopStep::Sigterm => control::StopStep::Sigterm,
        StopStep::Sigkill => control::StopStep::Sigkill,
    }
}

pub fn capacity(c: agentd_core::Capacity) -> Capacity {
    Capacity {
        busy: c.busy,
        max: c.max,
    }
}

/// The wire view of a task; `position` only matters for queued tasks.
pub fn task_view(task: &Task, position: Option<u32>) -> TaskView {
    let (state, exit) = match &task.state {
        TaskState::Queued => (control::TaskState::Queued, None),
        TaskState::Starting { .. } => (control::TaskState::Starting, None),
        TaskState::Running { .. } => (control::TaskState::Running, None),
        TaskState::Stopping { .. } => (control::TaskState::Stopping, None),
        TaskState::Done { ending, exit } => {
            let mut view = ExitView {
                code: exit.and_then(|e| e.code),
                signal: exit.and_then(|e| e.signal),
                ..ExitView::default()
            };
            if let Some(cmd) = task.report.as_ref().and_then(|r| r.command_exit) {
                view.command_code = cmd.code;
                view.command_signal = cmd.signal;
            }
            let state = match ending {
                Ending::Succeeded => control::TaskState::Succeeded,
                Ending::Failed { reason } => {
                    view.error = Some(reason.clone());
                    control::TaskState::Failed
                }
                Ending::Cancelled { by, after } => {
                    view.ended_by = by.map(stop_step);
                    view.stop_ms = Some(after.as_millis() as u64);
                    control::TaskState::Cancelled
                }
                Ending::Interrupted { by, after } => {
                    view.ended_by = by.map(stop_step);
                    view.stop_ms = Some(after.as_millis() as u64);
                    control::TaskState::Interrupted
                }
                Ending::Expired => control::TaskState::Expired,
                Ending::Dropped => control::TaskState::Dropped,
                Ending::Merged { .. } => control::TaskState::Merged,
            };
            (state, Some(view))
        }
    };
    TaskView {
        task_id: task.id.to_string(),
        session: task.session.clone(),
        state,
        position: if state == control::TaskState::Queued {
            position
        } else {
            None
        },
        pid: task.state.pid(),
        created_at: rfc3339(task.created_at),
        started_at: task.started_at.map(rfc3339),
        finished_at: task.finished_at.map(rfc3339),
        text: task.text.clone(),
        progress: task.progress.clone(),
        result: task.report.as_ref().map(|r| r.text.clone()),
        exit,
        merged_into: match &task.state {
            TaskState::Done {
                ending: Ending::Merged { into },
                ..
            } => Some(into.to_string()),
            _ => None,
        },
        priority: priority_view(task.priority),
    }
}

pub fn priority_view(p: Priority) -> control::Priority {
    match p {
        Priority::Interactive => control::Priority::Interactive,
        Priority::Background => control::Priority::Background,
    }
}

pub fn priority(p: control::Priority) -> Priority {
    match p {
        control::Priority::Interactive => Priority::Interactive,
        control::Priority::Background => Priority::Background,
    }
}

pub fn mode(m: control::QueueMode) -> Mode {
    match m {
        control::QueueMode::Collect => Mode::Collect,
        control::QueueMode::Followup => Mode::Followup,
        control::QueueMode::Steer => Mode::Steer,
        control::QueueMode::SteerBacklog => Mode::SteerBacklog,
        control::QueueMode::Interrupt => Mode::Interrupt,
    }
}

pub fn mode_view(m: Mode) -> control::QueueMode {
    match m {
        Mode::Collect => control::QueueMode::Collect,
        Mode::Followup => control::QueueMode::Followup,
        Mode::Steer => control::QueueMode::Steer,
        Mode::SteerBacklog => control::QueueMode::SteerBacklog,
        Mode::Interrupt => control::QueueMode::Interrupt,
    }
}

pub fn drop_policy(d: control::DropPolicy) -> DropPolicy {
    match d {
        control::DropPolicy::Old => DropPolicy::Old,
        control::DropPolicy::New => DropPolicy::New,
        control::DropPolicy::Summarize => DropPolicy::Summarize,
    }
}

pub fn drop_view(d: DropPolicy) -> control::DropPolicy {
    match d {
        DropPolicy::Old => control::DropPolicy::Old,
        DropPolicy::New => control::DropPolicy::New,
        DropPolicy::Summarize => control::DropPolicy::Summarize,
    }
}

pub fn settings_view(session: &str, s: QueueSettings, custom: bool) -> control::QueueSettingsView {
    control::QueueSettingsView {
        session: session.to_string(),
        mode: mode_view(s.mode),
        debounce_ms: s.debounce.as_millis() as u64,
        cap: s.cap,
        drop: drop_view(s.drop),
        custom,
    }
}

#[cfg(test)]
mod tests {
    //! The spellings of queue modes and drop policies in every place users type or
    //! read them stay in sync: the core's tables (chat parser, config file, flags of
    //! agentd), the wire's (serde, agentctl; see `agentd_proto::control`), the help
    //! and the error lists.
    use super::*;
    use agentd_core::{parse_chat_command, ChatCommand, QueueChange, QueueCommand, HELP_TEXT};

    use crate::config;

    fn chat_queue(text: &str) -> Option<QueueChange> {
        match parse_chat_command(text) {
            Some(ChatCommand::Queue(QueueCommand::Set(change))) => Some(change),
            _ => None,
        }
    }

    #[test]
    fn queue_modes_are_spelled_alike_everywhere() {
        assert_eq!(Mode::ALL.len(), control::QueueMode::ALL.len());
        let unknown = config::parse_mode("bogus").unwrap_err().to_string();
        let refused = match parse_chat_command("/queue bogus") {
            Some(ChatCommand::Invalid { reply }) => reply,
            other => panic!("{other:?}"),
        };
        for m in Mode::ALL {
            let wire = mode_view(m);
            assert_eq!(wire.as_str(), m.as_str());
            assert_eq!(mode(wire), m);
            let upper = m.as_str().to_ascii_uppercase();
            assert_eq!(config::parse_mode(&upper).unwrap(), m);
            let change =
                chat_queue(&format!("/queue {upper}")).unwrap_or_else(|| panic!("/queue {upper}"));
            assert_eq!(change.mode, Some(m));
            assert!(HELP_TEXT.contains(m.as_str()), "/help lacks {m:?}");
            assert!(unknown.contains(m.as_str()), "{unknown}");
            assert!(refused.contains(m.as_str()), "{refused}");
        }
    }

    #[test]
    fn drop_policies_are_spelled_alike_everywhere() {
        assert_eq!(DropPolicy::ALL.len(), control::DropPolicy::ALL.len());
        let unknown = config::parse_drop("bogus").unwrap_err().to_string();
        let refused = match parse_chat_command("/queue drop:bogus") {
            Some(ChatCommand::Invalid { reply }) => reply,
            other => panic!("{other:?}"),
        };
        for d in DropPolicy::ALL {
            let wire = drop_view(d);
            assert_eq!(wire.as_str(), d.as_str());
            assert_eq!(drop_policy(wire), d);
            let upper = d.as_str().to_ascii_uppercase();
            assert_eq!(config::parse_drop(&upper).unwrap(), d);
            let change = chat_queue(&format!("/queue DROP:{upper}"))
                .unwrap_or_else(|| panic!("/queue DROP:{upper}"));
            assert_eq!(change.drop, Some(d));
            assert!(HELP_TEXT.contains(d.as_str()), "/help lacks {d:?}");
            assert!(unknown.contains(d.as_str()), "{unknown}");
            assert!(refused.contains(d.as_str()), "{refused}");
        }
    }

    #[test]
    fn priorities_and_stop_steps_map_one_to_one() {
        for p in [Priority::Interactive, Priority::Background] {
            assert_eq!(priority(priority_view(p)), p);
        }
        let steps: Vec<_> = [
            StopStep::CooperativeCancel,
            StopStep::Sigterm,
            StopStep::Sigkill,
        ]
        .into_iter()
        .map(stop_step)
        .collect();
        assert_eq!(steps, control::StopStep::ALL);
    }
}
