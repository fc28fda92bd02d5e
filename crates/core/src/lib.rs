//! The pure core of agentd: what happens to sessions and tasks, decided without IO.
//!
//! [`Dispatcher`] is a state machine. The daemon feeds it what happened (a message
//! arrived, an agent was spawned, reported, was reaped, a timer fired) and executes the
//! [`Action`]s it returns (spawn an agent, send a cancel, signal a process tree, arm a
//! timer, record a finished task). The core never reads a clock, never touches a pid,
//! never blocks: every event carries its own `now`, and every effect is an action.
//!
//! This is the only place that decides:
//! - which task of which session runs next (per-session lane of 1, global cap counted
//!   from live agent processes, round-robin across ready sessions);
//! - what a stop does at each step (cooperative cancel → SIGTERM → SIGKILL);
//! - how a task ended.

mod command;
mod dispatcher;
mod liveness;
mod names;
mod order;
mod queue;
mod task;

pub use command::{
    parse_chat_command, parse_duration, ChatCommand, QueueChange, QueueCommand, StopArg, COMMANDS,
    HELP_TEXT,
};
pub use dispatcher::{
    Accepted, Action, Actions, Capacity, Config, Dispatcher, Event, Message, Refused, Scope,
    StopError, StopTarget, Submitted, HUNG, TIMED_OUT,
};
pub use liveness::{Liveness, Verdict, DEFAULT_HUNG_INTERVALS};
pub use names::{check_table, Named};
pub use queue::{
    collected_text, overflow_note, overflow_text, preview, DropPolicy, Mode, Priority,
    QueueSettings, MAX_COLLECTED_BYTES, MAX_DEBOUNCE, MAX_PREVIEWS,
};
pub use task::{
    AgentReport, Ending, ExitStatus, Interruption, Millis, ReportOutcome, StopCause, StopStep,
    Task, TaskId, TaskState,
};
