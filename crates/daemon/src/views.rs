//! Conversion of core types into the wire views of `agentd-proto`. Core types stay
//! free of serde; this is the boundary. (The texts users read are in
//! `agentd_proto::text`.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_core::{
    DropPolicy, Ending, Interruption, Millis, Mode, Priority, QueueSettings, StopStep, Task,
    TaskState,
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

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const LAST_RFC3339_MS: u64 = 253_402_300_799_999;

/// `ms` as RFC 3339. A time past the year 9999 (read back from a store agentd did not
/// write, or from a clock far off) is shown as the last one RFC 3339 can write:
/// humantime refuses to format it, and `to_string` would panic.
pub fn rfc3339(ms: Millis) -> String {
    let ms = ms.0.min(LAST_RFC3339_MS);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
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
                Ending::Interrupted { by, after, why } => {
                    view.ended_by = by.map(stop_step);
                    // A task found live after a crash had no stop to time.
                    if *why != Interruption::Crash {
                        view.stop_ms = Some(after.as_millis() as u64);
                    }
                    view.reason = Some(interruption_reason(*why).to_string());
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
        stopping: stopping_view(task),
    }
}

/// A stopping task's step and since when (the next step is the daemon's timers':
/// `status` of the task adds it).
pub fn stopping_view(task: &Task) -> Option<control::StoppingView> {
    let TaskState::Stopping { step, step_at, .. } = &task.state else {
        return None;
    };
    Some(control::StoppingView {
        task_id: task.id.to_string(),
        step: stop_step(*step),
        step_at: Some(rfc3339(*step_at)),
        next: None,
        next_in_ms: None,
    })
}

/// Why a task was interrupted, in the words the view and the store give.
pub fn interruption_reason(why: Interruption) -> &'static str {
    match why {
        Interruption::NewerMessage => agentd_proto::text::INTERRUPTED_BY_NEWER_MESSAGE,
        Interruption::Shutdown => agentd_proto::text::INTERRUPTED_BY_SHUTDOWN,
        Interruption::Crash => agentd_proto::text::INTERRUPTED_BY_CRASH,
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

/// The wire view of the containment in use.
pub fn containment(c: &agentd_proc::Containment) -> control::ContainmentView {
    match c {
        agentd_proc::Containment::Cgroup { root, controllers } => control::ContainmentView {
            kind: control::ContainmentKind::Cgroup,
            cgroup: Some(root.display().to_string()),
            controllers: controllers.clone(),
            reason: None,
        },
        agentd_proc::Containment::ProcessTree { reason } => control::ContainmentView {
            kind: control::ContainmentKind::ProcessTree,
            cgroup: None,
            controllers: Vec::new(),
            reason: Some(reason.clone()),
        },
    }
}
