//! Plain Display forms for log fields: agentd's log lines never show Rust Debug
//! dumps (`Some(…)`, `Done { … }`), only words, numbers and quoted texts.

use std::fmt;
use std::time::Duration;

use agentd_core::{Ending, StopStep, Task, TaskState};

/// A text (a task text, a message) in double quotes, with quotes, backslashes and
/// control characters escaped, so it stays on its log line.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_debug())
    }
}

/// A field value given by a client or an agent (a session name, an agent's name):
/// as is when it is one plain word, else [`Quoted`], so that a space, a quote or a
/// newline in it can neither split its log line nor pass for another field.
pub struct Word<'a>(pub &'a str);

impl fmt::Display for Word<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '\\' | '='));
        if plain {
            f.write_str(self.0)
        } else {
            Quoted(self.0).fmt(f)
        }
    }
}

/// Pids as `12,34,56`.
pub struct Pids<'a>(pub &'a [u32]);

impl fmt::Display for Pids<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pid) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{pid}")?;
        }
        Ok(())
    }
}

/// A duration in seconds: `0.04s`, `1.5s`, `10s` (millisecond precision).
pub struct Secs(pub Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let (whole, frac) = (ms / 1000, ms % 1000);
        if frac == 0 {
            write!(f, "{whole}s")
        } else {
            let frac = format!("{frac:03}");
            write!(f, "{whole}.{}s", frac.trim_end_matches('0'))
        }
    }
}

/// A stop step as a word: `cooperative_cancel`, `sigterm`, `sigkill`.
pub fn step(step: StopStep) -> &'static str {
    match step {
        StopStep::CooperativeCancel => "cooperative_cancel",
        StopStep::Sigterm => "sigterm",
        StopStep::Sigkill => "sigkill",
    }
}

/// Logs a finished task as one line of plain fields:
/// `task finished task_id=… session=… state=cancelled by=cooperative_cancel after=0.04s signal=15`.
pub fn task_finished(task: &Task) {
    let TaskState::Done { ending, exit } = &task.state else {
        tracing::info!(task_id = %task.id, session = %Word(&task.session), "task finished");
        return;
    };
    let (state, by, after, reason, into) = match ending {
        Ending::Succeeded => ("succeeded", None, None, None, None),
        Ending::Failed { reason } => ("failed", None, None, Some(reason.as_str()), None),
        Ending::Cancelled { by, after } => ("cancelled", *by, Some(*after), None, None),
        Ending::Interrupted { by, after } => ("interrupted", *by, Some(*after), None, None),
        Ending::Expired => ("expired", None, None, None, None),
        Ending::Dropped => ("dropped", None, None, None, None),
        Ending::Merged { into } => ("merged", None, None, None, Some(*into)),
    };
    tracing::info!(
        task_id = %task.id,
        session = %Word(&task.session),
        state = %state,
        by = by.map(|s| display(step(s))),
        after = after.map(|d| display(Secs(d))),
        reason = reason.map(|r| display(Quoted(r))),
        into = into.map(display),
        exit_code = exit.and_then(|e| e.code),
        signal = exit.and_then(|e| e.signal),
        "task finished"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(Secs(Duration::from_millis(40)).to_string(), "0.04s");
        assert_eq!(Secs(Duration::from_millis(1500)).to_string(), "1.5s");
        assert_eq!(Secs(Duration::from_secs(10)).to_string(), "10s");
        assert_eq!(Secs(Duration::from_micros(10)).to_string(), "0s");
        assert_eq!(Pids(&[1, 22, 333]).to_string(), "1,22,333");
        assert_eq!(Pids(&[]).to_string(), "");
        assert_eq!(Word("chat-1:a/b").to_string(), "chat-1:a/b");
        assert_eq!(Word("two words").to_string(), r#""two words""#);
        assert_eq!(Word("a=b").to_string(), r#""a=b""#);
        assert_eq!(Word("").to_string(), r#""""#);
        assert_eq!(Word("x\ny").to_string(), r#""x\ny""#);
        assert_eq!(Quoted("a \"b\"\nc").to_string(), r#""a \"b\"\nc""#);
    }
}
