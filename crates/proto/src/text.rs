//! The one-line texts users read, shared by agentd's chat replies and agentctl, so a
//! chat and a terminal say the same thing in the same words.

use std::time::Duration;

use crate::control::{Capacity, StopReply, StopStep, TaskState, TaskView};

/// The refusal of an unknown chat command such as `/stauts`: nothing was run.
pub fn unknown_command(command: &str) -> String {
    let commands: Vec<String> = agentd_core::COMMANDS
        .iter()
        .map(|c| format!("/{c}"))
        .collect();
    format!(
        "unknown command /{command}: nothing was run (commands: {}; /help explains them); \
         to send work that starts with a slash, begin it with //",
        commands.join(", ")
    )
}

/// A stop step in words: `cooperative cancel`, `SIGTERM`, `SIGKILL`.
pub fn stop_step(step: StopStep) -> &'static str {
    match step {
        StopStep::CooperativeCancel => "cooperative cancel",
        StopStep::Sigterm => "SIGTERM",
        StopStep::Sigkill => "SIGKILL",
    }
}

/// `0.04 s`, `2.01 s`, `0.003 s` under 10 ms, `1m 15s` from a minute on.
pub fn format_seconds(d: Duration) -> String {
    if d >= Duration::from_secs(60) {
        let secs = d.as_secs();
        format!("{}m {}s", secs / 60, secs % 60)
    } else if d < Duration::from_millis(10) {
        format!("{:.3} s", d.as_secs_f64())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// How a task stands or ended, in words: `running`, `cancelled (ended by SIGKILL
/// after 2.01 s)`, `cancelled (removed from the queue)`, `failed (command failed
/// with exit code 2)`.
pub fn outcome(view: &TaskView) -> String {
    let exit = view.exit.clone().unwrap_or_default();
    match view.state {
        TaskState::Cancelled => match (exit.ended_by, exit.stop_ms) {
            (Some(step), Some(ms)) => format!(
                "cancelled (ended by {} after {})",
                stop_step(step),
                format_seconds(Duration::from_millis(ms))
            ),
            (Some(step), None) => format!("cancelled (ended by {})", stop_step(step)),
            (None, _) if view.started_at.is_none() => {
                "cancelled (removed from the queue)".to_string()
            }
            (None, _) => "cancelled".to_string(),
        },
        TaskState::Failed => match &exit.error {
            Some(error) => format!("failed ({error})"),
            None => "failed".to_string(),
        },
        TaskState::Merged => match &view.merged_into {
            Some(into) => format!("merged into task {into}"),
            None => "merged".to_string(),
        },
        state => state.to_string(),
    }
}

/// The answer to accepted work: `task ID  started` or
/// `task ID  queued: position 1 (1/1 agents busy)`.
pub fn accepted_line(view: &TaskView, capacity: Option<Capacity>) -> String {
    let id = &view.task_id;
    match view.state {
        TaskState::Queued => {
            let mut line = format!("task {id}  queued");
            if let Some(position) = view.position {
                line.push_str(&format!(": position {position}"));
            }
            if let Some(c) = capacity {
                line.push_str(&format!(" ({}/{} agents busy)", c.busy, c.max));
            }
            line
        }
        TaskState::Starting | TaskState::Running => format!("task {id}  started"),
        // Collected messages merge only when their follow-up starts, so a message
        // that is merged as it is accepted was steered into the running task.
        TaskState::Merged => match &view.merged_into {
            Some(into) => format!("task {id}  steered into running task {into}"),
            None => format!("task {id}  steered into the running task"),
        },
        _ => format!("task {id}  {}", outcome(view)),
    }
}

/// One line per stopped task (`task ID  cancelled (…)`), or `nothing to stop`.
pub fn stop_lines(reply: &StopReply) -> String {
    if reply.stopped.is_empty() {
        return "nothing to stop".to_string();
    }
    let lines: Vec<String> = reply
        .stopped
        .iter()
        .map(|v| format!("task {}  {}", v.task_id, outcome(v)))
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ExitView, StopStep};

    fn view(state: TaskState, exit: Option<ExitView>, started: bool) -> TaskView {
        TaskView {
            task_id: "T".into(),
            session: "s".into(),
            state,
            position: (state == TaskState::Queued).then_some(3),
            pid: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            started_at: started.then(|| "2026-01-01T00:00:01Z".into()),
            finished_at: None,
            text: "x".into(),
            progress: None,
            result: None,
            exit,
            merged_into: None,
            priority: Default::default(),
        }
    }

    #[test]
    fn seconds() {
        let ms = Duration::from_millis;
        assert_eq!(format_seconds(ms(40)), "0.04 s");
        assert_eq!(format_seconds(ms(3)), "0.003 s");
        assert_eq!(format_seconds(ms(2_010)), "2.01 s");
        assert_eq!(format_seconds(ms(75_000)), "1m 15s");
    }

    #[test]
    fn lines() {
        let cap = Some(Capacity { busy: 1, max: 1 });
        assert_eq!(
            accepted_line(&view(TaskState::Queued, None, false), cap),
            "task T  queued: position 3 (1/1 agents busy)"
        );
        assert_eq!(
            accepted_line(&view(TaskState::Running, None, true), cap),
            "task T  started"
        );
        let stopped = ExitView {
            ended_by: Some(StopStep::Sigkill),
            stop_ms: Some(2010),
            ..ExitView::default()
        };
        let removed = ExitView::default();
        let failed = ExitView {
            error: Some("boom".into()),
            ..ExitView::default()
        };
        let reply = StopReply {
            stopped: vec![
                view(TaskState::Cancelled, Some(stopped), true),
                view(TaskState::Cancelled, Some(removed), false),
                view(TaskState::Failed, Some(failed), true),
            ],
        };
        assert_eq!(
            stop_lines(&reply),
            "task T  cancelled (ended by SIGKILL after 2.01 s)\ntask T  cancelled (removed from the queue)\ntask T  failed (boom)"
        );
        assert_eq!(
            stop_lines(&StopReply { stopped: vec![] }),
            "nothing to stop"
        );
    }
}
