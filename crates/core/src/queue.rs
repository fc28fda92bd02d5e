//! Queue settings (mode, debounce, cap, drop policy), priorities, and the texts a
//! follow-up task is made of.

use std::time::Duration;

use crate::names::Named;

/// What a new message does while its session has a run active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Hold; when the run ends, all held messages become one follow-up task.
    Collect,
    /// Hold; each held message becomes its own follow-up task, in order.
    Followup,
    /// Deliver into the running agent now; fall back to `Followup` if it can't take it.
    Steer,
    /// Steer now and also keep the message as its own follow-up task.
    SteerBacklog,
    /// Stop the running task and run this message next.
    Interrupt,
}

impl Mode {
    /// Its spelling (from the [`Named`] table).
    pub fn as_str(self) -> &'static str {
        self.name()
    }

    /// Parses a mode name (case-insensitive; the [`Named`] table).
    pub fn parse(word: &str) -> Option<Mode> {
        Mode::from_name(word)
    }
}

/// What happens to a message past a session's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropPolicy {
    /// Drop the oldest held message.
    Old,
    /// Refuse the new message.
    New,
    /// Drop the oldest held message and pass a one-line summary of it to the follow-up
    /// (an agent that wants collected prompts only; others get the follow-up as sent).
    Summarize,
}

impl DropPolicy {
    /// Its spelling (from the [`Named`] table).
    pub fn as_str(self) -> &'static str {
        self.name()
    }

    /// Parses a policy name (case-insensitive; the [`Named`] table).
    pub fn parse(word: &str) -> Option<DropPolicy> {
        DropPolicy::from_name(word)
    }
}

impl Priority {
    /// Its spelling (from the [`Named`] table).
    pub fn as_str(self) -> &'static str {
        self.name()
    }
}

/// Admission class: interactive work is admitted before background work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    #[default]
    Interactive,
    Background,
}

/// A session's queue settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    pub mode: Mode,
    /// Quiet time after a run ends (and after each new held message) before the
    /// follow-up starts.
    pub debounce: Duration,
    /// Most held (queued) messages per session.
    pub cap: u32,
    pub drop: DropPolicy,
}

impl Default for QueueSettings {
    fn default() -> QueueSettings {
        QueueSettings {
            mode: Mode::Collect,
            debounce: Duration::from_secs(1),
            cap: 20,
            drop: DropPolicy::Summarize,
        }
    }
}

/// The longest debounce a session may set.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest preview kept of a dropped message.
pub const PREVIEW_CHARS: usize = 80;

/// Most previews an overflow note lists; it counts the messages past them.
pub const MAX_PREVIEWS: usize = 20;

/// Longest collected prompt, in bytes: held messages join one only while it stays
/// within this (the first always does), the rest form the next one. One message is
/// at most a request line (1 MiB); the prompt must fit in one IPC frame (4 MiB).
pub const MAX_COLLECTED_BYTES: usize = 2 * 1024 * 1024;

/// One line standing for a dropped message.
pub fn preview(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > PREVIEW_CHARS {
        let cut: String = line.chars().take(PREVIEW_CHARS).collect();
        format!("{cut}…")
    } else {
        line
    }
}

/// The prompt of a collected follow-up: every message, in order, marked as messages
/// that arrived while the agent was busy. A single message stays as it is.
pub fn collected_text(texts: &[String]) -> String {
    if let [one] = texts {
        return one.clone();
    }
    let mut out = String::from("[Queued messages while agent was busy]");
    for (i, text) in texts.iter().enumerate() {
        out.push_str(&format!("\n---\nQueued #{}\n{text}", i + 1));
    }
    out
}

/// The note a follow-up gets about messages dropped on overflow.
pub fn overflow_text(previews: &[String]) -> String {
    overflow_note(previews, previews.len() as u64)
}

/// The note about `dropped` messages dropped on overflow, of which `previews` are
/// the first (at most [`MAX_PREVIEWS`] are listed).
pub fn overflow_note(previews: &[String], dropped: u64) -> String {
    let listed = &previews[..previews.len().min(MAX_PREVIEWS)];
    let mut out = format!("[Queue overflow] Dropped {dropped} messages due to cap.");
    for p in listed {
        out.push_str(&format!("\n- {p}"));
    }
    let more = dropped.saturating_sub(listed.len() as u64);
    if more > 0 {
        out.push_str(&format!("\n- … and {more} more"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts() {
        assert_eq!(collected_text(&["a".into()]), "a");
        assert_eq!(
            collected_text(&["a".into(), "b\nc".into()]),
            "[Queued messages while agent was busy]\n---\nQueued #1\na\n---\nQueued #2\nb\nc"
        );
        assert_eq!(
            overflow_text(&["x".into(), "y".into()]),
            "[Queue overflow] Dropped 2 messages due to cap.\n- x\n- y"
        );
        assert_eq!(preview("  a\n  b "), "a b");
        assert_eq!(preview(&"z".repeat(100)).chars().count(), PREVIEW_CHARS + 1);
    }
}
