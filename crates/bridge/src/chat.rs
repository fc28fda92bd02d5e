//! What the chat-independent core needs from a chat system. A bridge for another
//! chat app implements [`Chat`] in a small file beside `matrix.rs`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a message came from and where answers go: a room (chat, channel), or a
/// thread inside one. Each is one agentd session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Conversation {
    pub room: String,
    /// The thread's root message id, for a message in a thread.
    pub thread: Option<String>,
}

impl Conversation {
    pub fn room(room: impl Into<String>) -> Conversation {
        Conversation {
            room: room.into(),
            thread: None,
        }
    }

    /// The agentd session of this conversation: `<app>:<room>` or
    /// `<app>:<room>/<thread root>`.
    pub fn session(&self, app: &str) -> String {
        match &self.thread {
            None => format!("{app}:{}", self.room),
            Some(root) => format!("{app}:{}/{root}", self.room),
        }
    }
}

impl fmt::Display for Conversation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.thread {
            None => f.write_str(&self.room),
            Some(root) => write!(f, "{} (thread {root})", self.room),
        }
    }
}

/// A text message someone wrote in a conversation the bridge serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub conversation: Conversation,
    /// The chat system's id of the message: agentd's `message_id`, so a message
    /// delivered again never runs twice.
    pub message_id: String,
    pub sender: String,
    pub text: String,
}

/// A text the bridge shows. Its end from `output` on (a byte offset at a line
/// start) is an agent's output (a task's result, its latest progress line), which
/// a chat that formats text shows as a code block (Matrix: `<pre><code>` in the
/// `formatted_body`); `text` is the whole of it as plain text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outbound {
    pub text: String,
    pub output: Option<usize>,
}

impl Outbound {
    /// Plain text, without output.
    pub fn plain(text: impl Into<String>) -> Outbound {
        Outbound {
            text: text.into(),
            output: None,
        }
    }

    /// `lead`, then on the next line `output`, an agent's output.
    pub fn with_output(lead: &str, output: &str) -> Outbound {
        Outbound {
            text: format!("{lead}\n{output}"),
            output: Some(lead.len() + 1),
        }
    }

    /// `text`, which ends with `output` (after a line end), shown as
    /// [`Outbound::with_output`]; plain when it does not end so.
    pub fn ending_with_output(text: String, output: &str) -> Outbound {
        let at = text.len().checked_sub(output.len());
        let output =
            at.filter(|&at| at > 0 && text[at..] == *output && text.as_bytes()[at - 1] == b'\n');
        Outbound { text, output }
    }

    /// The text before the output, without the line end that ends it.
    pub fn lead(&self) -> &str {
        match self.output {
            Some(at) => &self.text[..at - 1],
            None => &self.text,
        }
    }

    /// The agent's output, if there is some.
    pub fn output(&self) -> Option<&str> {
        self.output.map(|at| &self.text[at..])
    }
}

/// One answer of [`Chat::poll`].
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The messages, oldest first.
    pub messages: Vec<Inbound>,
    /// Where the next poll starts; the core persists it once the batch is handled.
    pub cursor: Option<String>,
}

/// A chat system, as the core uses it. Calls may block (HTTP); each is made from
/// one of the core's threads, so an implementation must be `Sync`. Errors are
/// retried by the core with a growing delay; an implementation retries what it
/// knows to be transient itself (rate limits) and makes retried sends idempotent.
pub trait Chat: Send + Sync + 'static {
    /// Short name used in session names: `matrix`.
    fn app(&self) -> &str;

    /// Waits for new messages after `cursor` (a long poll of up to about 30 s).
    /// Without a cursor (the first start, or the state was lost) it returns no
    /// history, only the position to start from: messages written before the
    /// bridge ran are not acted on.
    fn poll(&self, cursor: Option<&str>) -> anyhow::Result<Batch>;

    /// Posts `text` in the conversation and returns the new message's id. `key`
    /// names this post: the core passes the same key in every attempt of one post
    /// (a post made again after a failure) and a new one for every other post of
    /// this run of the bridge. The chat shows a post made again with the same key
    /// once, also when an earlier attempt did pass but its answer was lost (Matrix:
    /// the key is in the transaction id, which the homeserver de-duplicates).
    fn post(&self, to: &Conversation, text: &Outbound, key: &str) -> anyhow::Result<String>;

    /// Replaces the text of the bridge's own message `message_id`; `key` as for
    /// [`Chat::post`].
    fn edit(
        &self,
        to: &Conversation,
        message_id: &str,
        text: &Outbound,
        key: &str,
    ) -> anyhow::Result<()>;

    /// Shows (or stops showing) that the bridge is typing in the conversation.
    fn typing(&self, to: &Conversation, on: bool) -> anyhow::Result<()>;

    /// Whether a failed [`Chat::poll`] cannot get better by retrying (the
    /// credentials were revoked): the bridge then exits with the error.
    fn is_fatal(&self, _error: &anyhow::Error) -> bool {
        false
    }

    /// Whether a failed [`Chat::post`] or [`Chat::edit`] may pass later (the chat
    /// system was unreachable or overloaded), so the core tries it again; false
    /// when the chat said no for good (the bridge was removed from the room).
    fn may_pass_later(&self, _error: &anyhow::Error) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_the_end_of_the_text_after_a_line_end() {
        let out = Outbound::with_output("task T  succeeded", "a\nb");
        assert_eq!(out.text, "task T  succeeded\na\nb");
        assert_eq!(
            (out.lead(), out.output()),
            ("task T  succeeded", Some("a\nb"))
        );
        let out = Outbound::ending_with_output("task T  succeeded\ndone".into(), "done");
        assert_eq!(
            (out.lead(), out.output()),
            ("task T  succeeded", Some("done"))
        );
        // Not the end of the text after a line end: plain.
        for (text, output) in [
            ("task T  succeeded", "succeeded"),
            ("task T  succeeded", "d"),
            ("done", "done"),
            ("x", "longer than x"),
        ] {
            let out = Outbound::ending_with_output(text.into(), output);
            assert_eq!(
                (out.lead(), out.output()),
                (text, None),
                "{text:?} {output:?}"
            );
        }
        assert_eq!(Outbound::plain("p").output(), None);
    }
}
