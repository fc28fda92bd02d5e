//! The supervisor: one event loop that owns all mutable state of agentd.
//!
//! ```text
//!  control connections ──requests──▶┐
//!  agent reader tasks ──agent events─▶  Supervisor::run  ──▶ Dispatcher::handle ──▶ actions
//!  signal thread ──SIGCHLD/TERM/INT─▶┘        │                                     │
//!                                             ◀──────── spawn, IPC, signals, timers ◀┘
//! ```
//!
//! **Invariants:**
//! - Only this loop mutates the dispatcher, the agent table and the history; everything
//!   else talks to it through channels. Requests are polled before agent events
//!   (`biased`), so a flood of progress cannot delay `/status`.
//! - The loop never blocks on an agent: spawning is a fork/exec, IPC writes go through
//!   per-agent writer tasks, and stop escalation is driven by timers.
//! - [`agentd_proc::reap_children`] runs only here, and the dispatcher learns of an
//!   exit in the same step, so a pid is never signalled after it was reaped.
//! - A task's slot is released when its agent is reaped and its leftover processes were
//!   killed, never when it merely reports a result.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_core::{
    parse_chat_command, Accepted, Action, AgentReport, ChatCommand, Dispatcher, Ending, Event,
    ExitStatus, Message, Mode, Priority, QueueChange, QueueCommand, Refused, ReportOutcome, Scope,
    StopArg, StopError, StopStep, StopTarget, Task, TaskId, TaskState, HELP_TEXT,
};
use agentd_proc::{reap_children, spawn_agent, AgentCommand, TaskTree};
use agentd_proto::control::{
    ErrorCode, EventKind, EventView, RequestBody, SendReply, StatusReply, StopReply, TaskView,
    WatchReply,
};
use agentd_proto::ipc::{AgentMsg, Outcome, SupervisorMsg, TaskStart, IPC_PROTOCOL_VERSION};
use interprocess::local_socket::tokio::Listener;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};

use crate::agent_io::{self, AgentEvent, AgentInput};
use crate::config::{agent_argv, DaemonConfig};
use crate::control::{self, ControlRequest, Reply, ServerInfo};
use crate::events::{Filter, Subscriptions};
use crate::views::{self, now_millis};

/// Signals the daemon acts on, delivered by the signal thread of the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonSignal {
    /// A child changed state: run the reaper.
    Child,
    /// SIGTERM or SIGINT: the first drains (stops every task), the second kills.
    Shutdown,
}

/// Runs agentd on an already-bound listener until `shutdown` resolves (or signals say
/// so) and every agent is gone.
pub async fn run(
    config: DaemonConfig,
    listener: Listener,
    mut signals: mpsc::UnboundedReceiver<DaemonSignal>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let logs = config.state_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let info = Arc::new(ServerInfo {
        started: Instant::now(),
    });
    let (request_tx, mut requests) = mpsc::channel::<ControlRequest>(1024);
    let (agent_tx, mut agent_events) = mpsc::channel::<AgentEvent>(1024);
    let acceptor = tokio::spawn(control::accept_loop(listener, request_tx, info.clone()));

    let mut sup = Supervisor::new(config, logs, agent_tx, info);
    tracing::info!(
        "agentd {} ready (pid {}, max {} concurrent agents)",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        sup.dispatcher.config().max_concurrent
    );
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    let mut shutdown_fired = false;
    loop {
        let next_timer = sup.timers.keys().next().map(|(at, _)| *at);
        tokio::select! {
            biased;
            Some(request) = requests.recv() => sup.on_request(request),
            Some(signal) = signals.recv() => match signal {
                DaemonSignal::Child => sup.reap(),
                DaemonSignal::Shutdown => sup.on_shutdown_signal(),
            },
            () = &mut shutdown, if !shutdown_fired => {
                shutdown_fired = true;
                sup.on_shutdown_signal();
            }
            Some(event) = agent_events.recv() => sup.on_agent_event(event),
            () = sleep_until(next_timer) => sup.fire_timers(),
            _ = tick.tick() => {
                sup.reap();
                sup.handle(Event::Tick);
            }
        }
        sup.publish_positions();
        if sup.shutting_down.is_some()
            && sup.agents.is_empty()
            && sup.dispatcher.tasks().next().is_none()
        {
            break;
        }
    }
    acceptor.abort();
    tracing::info!("agentd stopped");
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Timer {
    Stop {
        task_id: TaskId,
        step: StopStep,
    },
    Debounce {
        session: String,
        generation: u64,
    },
    Handshake {
        task_id: TaskId,
    },
    /// A reaped agent's channel did not reach EOF in time: finish the task anyway.
    Drain {
        task_id: TaskId,
    },
}

/// How long a reaped agent's channel may take to deliver its last frames.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// agentd's side of one live agent.
struct Agent {
    pid: u32,
    /// Messages to the agent, written by its writer task.
    to_agent: mpsc::UnboundedSender<SupervisorMsg>,
    /// The task, sent once the agent's Hello checks out.
    start: TaskStart,
    /// Whether the handshake completed.
    ready: bool,
    /// Messages ordered before the handshake completed (a cancel), sent right after Start.
    held: Vec<SupervisorMsg>,
    /// Set when the reaper collected the agent: its pid must never be signalled again.
    exit: Option<ExitStatus>,
    /// Set when the reader saw the end of the channel: every frame has been handled.
    drained: bool,
    /// Steered texts awaiting the agent's SteerAck, oldest first.
    steers: VecDeque<String>,
}

/// A `stop` request waiting for its tasks to end.
struct StopWaiter {
    tasks: Vec<TaskId>,
    remaining: HashSet<TaskId>,
    /// `Some(session)` when the stop came as a chat `/stop`: answer as a chat reply.
    chat: bool,
    reply: oneshot::Sender<Reply>,
}

struct Supervisor {
    dispatcher: Dispatcher,
    config: DaemonConfig,
    logs: PathBuf,
    agent_events: mpsc::Sender<AgentEvent>,
    info: Arc<ServerInfo>,
    agents: HashMap<TaskId, Agent>,
    pids: HashMap<u32, TaskId>,
    timers: BTreeMap<(Instant, u64), Timer>,
    timer_seq: u64,
    /// Finished tasks, newest last, bounded by `config.history`.
    history: HashMap<TaskId, Task>,
    history_order: VecDeque<TaskId>,
    waiters: Vec<StopWaiter>,
    /// Clients watching tasks or sessions.
    subscriptions: Subscriptions,
    /// Set by the first shutdown signal.
    shutting_down: Option<Instant>,
}

type RequestError = (ErrorCode, String);

fn err<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, RequestError> {
    Err((code, message.into()))
}

fn json(value: impl serde::Serialize) -> Reply {
    serde_json::to_value(value).map_err(|e| (ErrorCode::Internal, e.to_string()))
}

impl Supervisor {
    fn new(
        config: DaemonConfig,
        logs: PathBuf,
        agent_events: mpsc::Sender<AgentEvent>,
        info: Arc<ServerInfo>,
    ) -> Supervisor {
        let dispatcher = Dispatcher::new(config.dispatch.clone());
        Supervisor {
            dispatcher,
            config,
            logs,
            agent_events,
            info,
            agents: HashMap::new(),
            pids: HashMap::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            history: HashMap::new(),
            history_order: VecDeque::new(),
            waiters: Vec::new(),
            subscriptions: Subscriptions::default(),
            shutting_down: None,
        }
    }

    // ----- executing decisions -----

    /// Executes actions, feeding the events they cause (spawned, spawn failed) back into
    /// the dispatcher until nothing is left to do.
    fn execute(&mut self, actions: agentd_core::Actions) {
        let mut work: VecDeque<Action> = actions.into_vec().into();
        while let Some(action) = work.pop_front() {
            let follow_up = match action {
                Action::Spawn {
                    task_id,
                    session,
                    text,
                } => self.spawn(task_id, session, text),
                Action::SendCancel { task_id } => {
                    self.send_to_agent(task_id, SupervisorMsg::Cancel);
                    None
                }
                Action::Signal { task_id, step } => {
                    self.signal_tree(task_id, step);
                    None
                }
                Action::SetTimer {
                    task_id,
                    after,
                    step,
                } => {
                    self.arm(after, Timer::Stop { task_id, step });
                    None
                }
                Action::Steer { task_id, text } => {
                    if let Some(agent) = self.agents.get_mut(&task_id) {
                        agent.steers.push_back(text.clone());
                    }
                    self.send_to_agent(task_id, SupervisorMsg::Steer { text: text.clone() });
                    self.publish_task(EventKind::Steered, &task_id, Some(text), None);
                    None
                }
                Action::SetDebounce {
                    session,
                    after,
                    generation,
                } => {
                    self.arm(
                        after,
                        Timer::Debounce {
                            session,
                            generation,
                        },
                    );
                    None
                }
                Action::Finished(task) => {
                    self.publish_finished(&task);
                    self.record_finished(task);
                    None
                }
            };
            if let Some(event) = follow_up {
                work.extend(self.dispatcher.handle(event, now_millis()).into_vec());
            }
        }
        self.answer_waiters();
    }

    fn handle(&mut self, event: Event) {
        let actions = self.dispatcher.handle(event, now_millis());
        self.execute(actions);
    }

    fn arm(&mut self, after: Duration, timer: Timer) {
        self.timer_seq += 1;
        // A duration too large for the clock (a flag of a thousand years) is a timer
        // that never fires in practice, not a panic.
        let now = Instant::now();
        let at = now
            .checked_add(after)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        self.timers.insert((at, self.timer_seq), timer);
    }

    fn spawn(&mut self, task_id: TaskId, session: String, text: String) -> Option<Event> {
        let (program, args) = agent_argv(&self.config.agent, &text);
        let command = AgentCommand {
            program: program.clone(),
            args,
            task_id: task_id.to_string(),
            session: session.clone(),
            log_path: Some(self.logs.join(format!("{task_id}.log"))),
        };
        let spawned = match spawn_agent(&command) {
            Ok(spawned) => spawned,
            Err(e) => {
                tracing::warn!(%task_id, "cannot start agent {program}: {e}");
                self.remove_empty_log(task_id);
                return Some(Event::SpawnFailed {
                    task_id,
                    error: format!("{program}: {e}"),
                });
            }
        };
        let pid = spawned.pid;
        let to_agent = match agent_io::start(task_id, spawned.channel, self.agent_events.clone()) {
            Ok(to_agent) => to_agent,
            Err(e) => {
                // The process exists: kill it; the reaper will report it.
                TaskTree::new(pid, task_id.to_string()).kill_all(true, 10);
                tracing::warn!(%task_id, "cannot set up the IPC channel: {e}");
                self.pids.insert(pid, task_id);
                return Some(Event::ProtocolError {
                    task_id,
                    error: format!("cannot set up the IPC channel: {e}"),
                });
            }
        };
        tracing::info!(%task_id, pid, session = %session, "agent started");
        self.pids.insert(pid, task_id);
        self.agents.insert(
            task_id,
            Agent {
                pid,
                to_agent,
                start: TaskStart {
                    task_id: task_id.to_string(),
                    session,
                    text,
                },
                ready: false,
                held: Vec::new(),
                exit: None,
                drained: false,
                steers: VecDeque::new(),
            },
        );
        self.arm(self.config.handshake_timeout, Timer::Handshake { task_id });
        self.publish_task(EventKind::Started, &task_id, None, None);
        Some(Event::Spawned { task_id, pid })
    }

    fn send_to_agent(&mut self, task_id: TaskId, msg: SupervisorMsg) {
        if let Some(agent) = self.agents.get_mut(&task_id) {
            if agent.ready {
                let _ = agent.to_agent.send(msg);
            } else {
                agent.held.push(msg);
            }
        }
    }

    fn signal_tree(&mut self, task_id: TaskId, step: StopStep) {
        let Some(agent) = self.agents.get(&task_id) else {
            return;
        };
        let tree = TaskTree::new(agent.pid, task_id.to_string());
        // Once reaped, the agent's pid (and so its group id) may be reused: from then on
        // its processes are found by scanning only.
        let unreaped = agent.exit.is_none();
        match step {
            StopStep::CooperativeCancel => {}
            StopStep::Sigterm => {
                let n = tree.signal(Signal::SIGTERM, unreaped);
                tracing::info!(%task_id, processes = n, "SIGTERM sent to the task's processes");
            }
            StopStep::Sigkill => {
                let left = tree.kill_all(unreaped, 10);
                tracing::info!(%task_id, "SIGKILL sent to the task's processes");
                if !left.is_empty() {
                    tracing::warn!(%task_id, ?left, "processes survived SIGKILL rounds");
                }
            }
        }
    }

    fn record_finished(&mut self, task: Task) {
        tracing::info!(task_id = %task.id, session = %task.session, state = ?task.state, "task finished");
        let id = task.id;
        if self.history.insert(id, task).is_none() {
            self.history_order.push_back(id);
        }
        while self.history_order.len() > self.config.history {
            if let Some(old) = self.history_order.pop_front() {
                self.history.remove(&old);
            }
        }
        for waiter in &mut self.waiters {
            waiter.remaining.remove(&id);
        }
    }

    fn answer_waiters(&mut self) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.remaining.is_empty());
        self.waiters = waiting;
        for waiter in done {
            let stopped: Vec<TaskView> =
                waiter.tasks.iter().filter_map(|id| self.view(id)).collect();
            let reply = StopReply { stopped };
            let answer = if waiter.chat {
                json(SendReply {
                    reply: agentd_proto::text::stop_lines(&reply),
                    accepted: false,
                    task: None,
                    capacity: None,
                    command: Some("stop".into()),
                    data: serde_json::to_value(&reply).ok(),
                    ..SendReply::default()
                })
            } else {
                json(reply)
            };
            let _ = waiter.reply.send(answer);
        }
    }

    // ----- reaping and timers -----

    fn reap(&mut self) {
        for reaped in reap_children() {
            let Some(task_id) = self.pids.remove(&reaped.pid) else {
                tracing::debug!(pid = reaped.pid, "reaped an adopted orphan");
                continue;
            };
            // The agent is gone; whatever it left behind goes too, before the slot frees.
            // Its pid was reaped, so the group is found by scanning, never by killpg.
            let tree = TaskTree::new(reaped.pid, task_id.to_string());
            let left = tree.kill_all(false, 10);
            if !left.is_empty() {
                tracing::warn!(%task_id, ?left, "leftover processes survived SIGKILL rounds");
            }
            let status = ExitStatus {
                code: reaped.code,
                signal: reaped.signal,
            };
            tracing::info!(%task_id, pid = reaped.pid, status = %status.describe(), "agent reaped");
            // Frames the agent wrote before exiting (its result) may still be unread:
            // the task ends once its channel is drained (EOF), or after DRAIN_TIMEOUT.
            match self.agents.get_mut(&task_id) {
                Some(agent) if !agent.drained => {
                    agent.exit = Some(status);
                    self.arm(DRAIN_TIMEOUT, Timer::Drain { task_id });
                }
                _ => self.finish_reaped(task_id, status),
            }
        }
    }

    /// An agent that wrote nothing on its own stdout/stderr leaves no log file.
    fn remove_empty_log(&self, task_id: TaskId) {
        let log = self.logs.join(format!("{task_id}.log"));
        if std::fs::metadata(&log).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&log);
        }
    }

    /// The agent is reaped and its channel drained: the dispatcher may end the task.
    fn finish_reaped(&mut self, task_id: TaskId, status: ExitStatus) {
        self.agents.remove(&task_id);
        self.remove_empty_log(task_id);
        self.handle(Event::Reaped { task_id, status });
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                Timer::Stop { task_id, step } => self.handle(Event::StopTimer { task_id, step }),
                Timer::Debounce {
                    session,
                    generation,
                } => self.handle(Event::Debounce {
                    session,
                    generation,
                }),
                Timer::Drain { task_id } => {
                    if let Some(status) = self.agents.get(&task_id).and_then(|a| a.exit) {
                        tracing::warn!(%task_id, "the agent's channel stayed open after it exited");
                        self.finish_reaped(task_id, status);
                    }
                }
                Timer::Handshake { task_id } => {
                    if self.agents.get(&task_id).is_some_and(|a| !a.ready) {
                        let error = format!(
                            "no handshake within {}",
                            humantime::format_duration(self.config.handshake_timeout)
                        );
                        self.handle(Event::ProtocolError { task_id, error });
                    }
                }
            }
        }
    }

    fn on_shutdown_signal(&mut self) {
        if self.shutting_down.is_none() {
            tracing::info!("shutting down: stopping every task");
            self.shutting_down = Some(Instant::now());
            if let Ok((_, actions)) =
                self.dispatcher
                    .stop(StopTarget::Everything, &Scope::Owner, now_millis())
            {
                self.execute(actions);
            }
        } else {
            tracing::warn!("second shutdown signal: killing every agent now");
            let ids: Vec<TaskId> = self.agents.keys().copied().collect();
            for task_id in ids {
                self.signal_tree(task_id, StopStep::Sigkill);
            }
        }
    }

    // ----- agents -----

    fn on_agent_event(&mut self, event: AgentEvent) {
        let AgentEvent { task_id, input } = event;
        let Some(agent) = self.agents.get_mut(&task_id) else {
            return;
        };
        let event = match input {
            AgentInput::Msg(AgentMsg::Hello(hello)) if !agent.ready => {
                if hello.protocol != IPC_PROTOCOL_VERSION {
                    let reason = format!(
                        "agentd speaks agent protocol {IPC_PROTOCOL_VERSION}, the agent {}",
                        hello.protocol
                    );
                    let _ = agent.to_agent.send(SupervisorMsg::Reject {
                        reason: reason.clone(),
                    });
                    Event::ProtocolError {
                        task_id,
                        error: reason,
                    }
                } else {
                    agent.ready = true;
                    let _ = agent.to_agent.send(SupervisorMsg::Welcome {
                        protocol: IPC_PROTOCOL_VERSION,
                    });
                    let _ = agent
                        .to_agent
                        .send(SupervisorMsg::Start(agent.start.clone()));
                    for held in agent.held.drain(..) {
                        let _ = agent.to_agent.send(held);
                    }
                    tracing::info!(%task_id, agent = %hello.agent, steer = hello.capabilities.steer, "agent ready");
                    Event::AgentReady {
                        task_id,
                        steer: hello.capabilities.steer,
                    }
                }
            }
            AgentInput::Msg(msg) if !agent.ready => Event::ProtocolError {
                task_id,
                error: format!("expected Hello first, got {}", msg_name(&msg)),
            },
            AgentInput::Msg(AgentMsg::Hello(_)) => Event::ProtocolError {
                task_id,
                error: "a second Hello".into(),
            },
            AgentInput::Msg(AgentMsg::Progress { text }) => Event::Progress {
                task_id,
                text: clip(text, 4096),
            },
            AgentInput::Msg(AgentMsg::Result(result)) => Event::Report {
                task_id,
                report: AgentReport {
                    outcome: match result.outcome {
                        Outcome::Succeeded => ReportOutcome::Succeeded,
                        Outcome::Failed => ReportOutcome::Failed,
                        Outcome::Cancelled => ReportOutcome::Cancelled,
                    },
                    text: clip(result.text, 64 * 1024),
                    command_exit: result.command_exit.map(|e| ExitStatus {
                        code: e.code,
                        signal: e.signal,
                    }),
                },
            },
            AgentInput::Msg(AgentMsg::Heartbeat) => return,
            AgentInput::Msg(AgentMsg::SteerAck { accepted }) => {
                let text = agent.steers.pop_front();
                if let (false, Some(text)) = (accepted, text) {
                    self.steer_refused(task_id, text);
                }
                return;
            }
            // The agent closed its channel: it is exiting, or has exited and was reaped.
            AgentInput::Closed => {
                agent.drained = true;
                if let Some(status) = agent.exit {
                    self.finish_reaped(task_id, status);
                }
                return;
            }
            AgentInput::Broken(error) => {
                agent.drained = true;
                if let Some(status) = agent.exit {
                    // It died in the middle of a frame: its exit says more than the frame.
                    tracing::debug!(%task_id, "channel of an exited agent ended mid-frame: {error}");
                    self.finish_reaped(task_id, status);
                    return;
                }
                Event::ProtocolError { task_id, error }
            }
        };
        if let Event::ProtocolError { error, .. } = &event {
            tracing::warn!(%task_id, pid = agent.pid, "agent broke the protocol: {error}; killing it");
        }
        if let Event::Progress { text, .. } = &event {
            let text = text.clone();
            self.publish_task(EventKind::Progress, &task_id, Some(text), None);
        }
        self.handle(event);
    }

    // ----- requests -----

    fn on_request(&mut self, request: ControlRequest) {
        let ControlRequest {
            body,
            reply,
            events,
        } = request;
        match body {
            RequestBody::Stop {
                task_id,
                session,
                all,
            } => {
                let target = match (task_id, session, all) {
                    (Some(id), None, false) => self.resolve(&id).map(StopTarget::Task),
                    (None, Some(session), false) => Ok(StopTarget::SessionAll(session)),
                    (None, None, true) => Ok(StopTarget::Everything),
                    _ => err(
                        ErrorCode::BadRequest,
                        "stop takes exactly one of task_id, session, all",
                    ),
                };
                match target {
                    Ok(target) => self.stop(target, Scope::Owner, false, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            RequestBody::Send {
                session,
                text,
                message_id,
                priority,
                mode,
            } => {
                let work = Work {
                    session,
                    text,
                    message_id,
                    priority: priority.map(views::priority).unwrap_or_default(),
                    mode: mode.map(views::mode),
                };
                if let Some((reply, answer)) = self.on_send(work, reply) {
                    let _ = reply.send(answer);
                }
            }
            RequestBody::Queue {
                session,
                mode,
                debounce_ms,
                cap,
                drop,
                reset,
            } => {
                let change = QueueChange {
                    mode: mode.map(views::mode),
                    debounce: debounce_ms.map(Duration::from_millis),
                    cap,
                    drop: drop.map(views::drop_policy),
                };
                let answer = self.queue_settings(&session, reset, change).and_then(json);
                let _ = reply.send(answer);
            }
            RequestBody::Watch { task_id, session } => {
                let _ = reply.send(self.watch(task_id, session, events));
            }
            RequestBody::Status { task_id } => {
                let _ = reply.send(self.status(task_id.as_deref()));
            }
            RequestBody::Tasks { session, all } => {
                let _ = reply.send(json(self.list(session.as_deref(), all)));
            }
            RequestBody::Hello { .. } | RequestBody::Ping => {
                let _ = reply.send(err(ErrorCode::Internal, "answered by the connection"));
            }
        }
    }

    /// A chat message: a control command or work. Returns the reply to send now, or
    /// `None` when the reply was handed to a stop waiter.
    fn on_send(
        &mut self,
        work: Work,
        reply: oneshot::Sender<Reply>,
    ) -> Option<(oneshot::Sender<Reply>, Reply)> {
        if let Err(e) = check_session(&work.session) {
            return Some((reply, Err(e)));
        }
        let (text, mode) = match parse_chat_command(&work.text) {
            Some(ChatCommand::WorkWithMode { mode, text }) => (text, Some(mode)),
            Some(ChatCommand::Work { text }) => (text, work.mode),
            Some(command) => return self.chat_command(work.session, command, reply),
            None => (work.text, work.mode),
        };
        if text.trim().is_empty() {
            return Some((
                reply,
                err(ErrorCode::BadRequest, "empty message: nothing to do"),
            ));
        }
        if self.shutting_down.is_some() {
            let message = "agentd is shutting down; the message was not accepted";
            return Some((reply, err(ErrorCode::ShuttingDown, message)));
        }
        let message = Message {
            task_id: TaskId::now_v7(),
            session: work.session,
            text,
            message_id: work.message_id,
            priority: work.priority,
            mode,
        };
        let (outcome, actions) = self.dispatcher.accept(message, now_millis());
        if let Ok(Accepted::Task { task_id, .. }) = &outcome {
            self.publish_task(EventKind::Accepted, task_id, None, None);
        }
        let dropped_views: Vec<TaskView> = actions
            .0
            .iter()
            .filter_map(|a| match a {
                Action::Finished(t)
                    if matches!(
                        t.state,
                        TaskState::Done {
                            ending: Ending::Dropped,
                            ..
                        }
                    ) =>
                {
                    Some(views::task_view(t, None))
                }
                _ => None,
            })
            .collect();
        self.execute(actions);
        Some((reply, self.send_reply(outcome, dropped_views)))
    }

    /// The answer to accepted (or refused) work.
    fn send_reply(&self, outcome: Result<Accepted, Refused>, dropped: Vec<TaskView>) -> Reply {
        let capacity = views::capacity(self.dispatcher.capacity());
        match outcome {
            Err(Refused::QueueFull { limit }) => err(
                ErrorCode::QueueFull,
                format!("agentd's queue is full ({limit} messages wait): the message was not accepted"),
            ),
            Err(Refused::SessionFull { cap }) => err(
                ErrorCode::QueueFull,
                format!(
                    "this chat already holds {cap} waiting messages (cap {cap}, drop: new): the message was not accepted"
                ),
            ),
            Ok(Accepted::Duplicate { task_id }) => {
                let view = self.view(&task_id).ok_or((ErrorCode::Internal, "the task vanished".into()))?;
                json(SendReply {
                    reply: format!(
                        "task {task_id}  already received ({}): not run again",
                        agentd_proto::text::outcome(&view)
                    ),
                    accepted: true,
                    task: Some(view),
                    capacity: Some(capacity),
                    command: None,
                    data: None,
                    duplicate: true,
                    dropped: Vec::new(),
                    notice: None,
                })
            }
            Ok(Accepted::Task {
                task_id,
                steered_into,
                dropped: _,
                notice,
            }) => {
                let view = self.view(&task_id).ok_or((ErrorCode::Internal, "the task vanished".into()))?;
                let mut reply = match steered_into {
                    Some(into) if view.state == agentd_proto::control::TaskState::Merged => {
                        format!("task {task_id}  steered into running task {into}")
                    }
                    Some(into) => format!(
                        "{}
(also steered into running task {into})",
                        agentd_proto::text::accepted_line(&view, Some(capacity))
                    ),
                    None => agentd_proto::text::accepted_line(&view, Some(capacity)),
                };
                for d in &dropped {
                    reply.push_str(&format!(
                        "
dropped to make room: task {}  {}",
                        d.task_id,
                        agentd_core::preview(&d.text)
                    ));
                }
                if let Some(notice) = &notice {
                    reply.push_str(&format!("
note: {notice}"));
                }
                json(SendReply {
                    reply,
                    accepted: true,
                    task: Some(view),
                    capacity: Some(capacity),
                    command: None,
                    data: None,
                    duplicate: false,
                    dropped,
                    notice,
                })
            }
        }
    }

    /// A control command typed as chat text. Returns the reply to send now, or `None`
    /// when the reply was handed to a stop waiter.
    fn chat_command(
        &mut self,
        session: String,
        command: ChatCommand,
        reply: oneshot::Sender<Reply>,
    ) -> Option<(oneshot::Sender<Reply>, Reply)> {
        let answer = match command {
            ChatCommand::Help => {
                Ok(self.chat_reply("help", HELP_TEXT.to_string(), serde_json::Value::Null))
            }
            ChatCommand::Status { task } => self.chat_status(&session, task.as_deref()),
            ChatCommand::Tasks => {
                let list = self.list(Some(&session), false);
                let text = if list.is_empty() {
                    "no tasks in this chat".to_string()
                } else {
                    list.iter()
                        .map(views::task_line)
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                Ok(self.chat_reply(
                    "tasks",
                    text,
                    serde_json::to_value(&list).unwrap_or_default(),
                ))
            }
            ChatCommand::Queue(queue) => {
                let result = match queue {
                    QueueCommand::Show => {
                        self.queue_settings(&session, false, QueueChange::default())
                    }
                    QueueCommand::Reset => {
                        self.queue_settings(&session, true, QueueChange::default())
                    }
                    QueueCommand::Set(change) => self.queue_settings(&session, false, change),
                };
                result.map(|view| {
                    let text = views::settings_line(&view);
                    self.chat_reply(
                        "queue",
                        text,
                        serde_json::to_value(&view).unwrap_or_default(),
                    )
                })
            }
            ChatCommand::Invalid { reply: text } => Err((ErrorCode::BadRequest, text)),
            ChatCommand::Unknown { command } => Err((
                ErrorCode::BadRequest,
                agentd_proto::text::unknown_command(&command),
            )),
            ChatCommand::WorkWithMode { .. } | ChatCommand::Work { .. } => {
                err(ErrorCode::Internal, "work is not a command")
            }
            ChatCommand::Stop(arg) => {
                let target = match arg {
                    StopArg::Current => Ok(StopTarget::SessionCurrent(session.clone())),
                    StopArg::All => Ok(StopTarget::SessionAll(session.clone())),
                    StopArg::Task(id) => self.resolve(&id).map(StopTarget::Task),
                };
                match target {
                    Ok(target) => {
                        self.stop(target, Scope::Chat(session), true, reply);
                        return None;
                    }
                    Err(e) => Err(e),
                }
            }
        };
        Some((reply, answer))
    }

    /// Shows, changes or resets a session's queue settings.
    fn queue_settings(
        &mut self,
        session: &str,
        reset: bool,
        change: QueueChange,
    ) -> Result<agentd_proto::control::QueueSettingsView, RequestError> {
        check_session(session)?;
        if change.cap == Some(0) {
            return err(ErrorCode::BadRequest, "cap must be at least 1");
        }
        if change
            .debounce
            .is_some_and(|d| d > agentd_core::MAX_DEBOUNCE)
        {
            return err(ErrorCode::BadRequest, "debounce must be at most 24h");
        }
        if reset {
            self.dispatcher.reset_settings(session);
        }
        if change != QueueChange::default() {
            let settings = change.apply(self.dispatcher.settings(session));
            self.dispatcher.set_settings(session, settings);
        }
        Ok(views::settings_view(
            session,
            self.dispatcher.settings(session),
            self.dispatcher.has_own_settings(session),
        ))
    }

    /// The agent refused a steered message: it becomes a follow-up, and watchers are told.
    fn steer_refused(&mut self, running: TaskId, text: String) {
        let Some(session) = self.dispatcher.task(&running).map(|t| t.session.clone()) else {
            tracing::warn!(%running, "a steered message was refused after its task ended: {text:?}");
            return;
        };
        let message = Message {
            task_id: TaskId::now_v7(),
            session,
            text,
            message_id: None,
            priority: Priority::Interactive,
            mode: Some(Mode::Followup),
        };
        let task_id = message.task_id;
        let (outcome, actions) = self.dispatcher.accept(message, now_millis());
        match outcome {
            Ok(_) => {
                let note = format!("the agent of task {running} refused the steered message: queued as a follow-up");
                self.publish_task(EventKind::Accepted, &task_id, Some(note), None);
            }
            Err(refused) => {
                tracing::warn!(%running, ?refused, "a refused steered message could not be queued")
            }
        }
        self.execute(actions);
    }

    // ----- live events -----

    /// Subscribes `events` to a task or a session, after a snapshot of where it stands.
    fn watch(
        &mut self,
        task_id: Option<String>,
        session: Option<String>,
        events: Option<mpsc::UnboundedSender<EventView>>,
    ) -> Reply {
        let Some(events) = events else {
            return err(ErrorCode::Internal, "watch without an event channel");
        };
        match (task_id, session) {
            (Some(id), None) => {
                let mut task_id = self.resolve(&id)?;
                // Follow the message into the task it went into, as a live watcher would.
                for _ in 0..16 {
                    let view = self
                        .view(&task_id)
                        .ok_or((ErrorCode::NotFound, format!("no task {id}")))?;
                    match (&view.merged_into, view.state.is_terminal()) {
                        (Some(into), _) => {
                            let into_id = TaskId::parse_str(into)
                                .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                            let _ = events.send(event_of(
                                EventKind::Merged,
                                &view,
                                None,
                                Some(into.clone()),
                            ));
                            task_id = into_id;
                        }
                        (None, true) => {
                            let _ = events.send(event_of(EventKind::Finished, &view, None, None));
                            break;
                        }
                        (None, false) => {
                            let _ = events.send(snapshot_event(&view));
                            self.subscriptions
                                .add(Filter::Task(view.task_id.clone()), events);
                            break;
                        }
                    }
                }
                json(WatchReply {
                    task_id: Some(task_id.to_string()),
                    session: None,
                })
            }
            (None, Some(session)) => {
                check_session(&session)?;
                for view in self.list(Some(&session), false) {
                    let _ = events.send(snapshot_event(&view));
                }
                self.subscriptions
                    .add(Filter::Session(session.clone()), events);
                json(WatchReply {
                    task_id: None,
                    session: Some(session),
                })
            }
            _ => err(
                ErrorCode::BadRequest,
                "watch takes exactly one of task_id, session",
            ),
        }
    }

    /// Publishes an event about a task that is queued or active.
    fn publish_task(
        &mut self,
        kind: EventKind,
        task_id: &TaskId,
        text: Option<String>,
        into: Option<String>,
    ) {
        if self.subscriptions.is_empty() {
            return;
        }
        if let Some(view) = self.view(task_id) {
            self.subscriptions
                .publish(&event_of(kind, &view, text, into));
        }
    }

    /// Publishes how a task ended (merged, dropped, expired, finished).
    fn publish_finished(&mut self, task: &Task) {
        if self.subscriptions.is_empty() {
            return;
        }
        let view = views::task_view(task, None);
        let kinds: &[EventKind] = match &task.state {
            TaskState::Done {
                ending: Ending::Merged { .. },
                ..
            } => &[EventKind::Merged],
            TaskState::Done {
                ending: Ending::Dropped,
                ..
            } => &[EventKind::Dropped, EventKind::Finished],
            TaskState::Done {
                ending: Ending::Expired,
                ..
            } => &[EventKind::Expired, EventKind::Finished],
            _ => &[EventKind::Finished],
        };
        for kind in kinds {
            self.subscriptions
                .publish(&event_of(*kind, &view, None, view.merged_into.clone()));
        }
    }

    /// Tells watchers about queued tasks whose position changed.
    fn publish_positions(&mut self) {
        if self.subscriptions.is_empty() {
            return;
        }
        // Only when an order changed, and only the watched tasks: O(watched · log² n),
        // not the whole queue.
        let version = self.dispatcher.order_version();
        if self.subscriptions.positions_current(version) {
            return;
        }
        let (task_ids, sessions) = self.subscriptions.watched();
        let task_ids: Vec<TaskId> = task_ids
            .iter()
            .filter_map(|t| TaskId::parse_str(t).ok())
            .collect();
        let mut current: Vec<(String, String, u32)> = Vec::new();
        for (id, p) in self.dispatcher.positions_of(&task_ids) {
            if let Some(t) = self.dispatcher.task(&id) {
                current.push((id.to_string(), t.session.clone(), p));
            }
        }
        for session in sessions {
            for (id, p) in self.dispatcher.session_positions(&session) {
                current.push((id.to_string(), session.clone(), p));
            }
        }
        self.subscriptions.publish_positions(current);
        self.subscriptions.set_positions_version(version);
    }

    fn chat_reply(
        &self,
        command: &str,
        text: String,
        data: serde_json::Value,
    ) -> serde_json::Value {
        serde_json::to_value(SendReply {
            reply: text,
            accepted: false,
            task: None,
            capacity: None,
            command: Some(command.to_string()),
            data: Some(data),
            ..SendReply::default()
        })
        .unwrap_or_default()
    }

    fn chat_status(&self, session: &str, task: Option<&str>) -> Reply {
        match task {
            Some(id) => {
                let task_id = self.resolve(id)?;
                let view = self
                    .view(&task_id)
                    .ok_or((ErrorCode::NotFound, format!("no task {id}")))?;
                if view.session != session {
                    return err(
                        ErrorCode::Forbidden,
                        format!("task {id} is not in this chat"),
                    );
                }
                let mut text = views::task_line(&view);
                if let Some(progress) = &view.progress {
                    text.push_str(&format!("\nlatest: {progress}"));
                }
                if let Some(result) = &view.result {
                    text.push_str(&format!("\nresult: {result}"));
                }
                Ok(self.chat_reply(
                    "status",
                    text,
                    serde_json::to_value(&view).unwrap_or_default(),
                ))
            }
            None => {
                let status = self.status_reply();
                let mine = self.list(Some(session), false);
                let mut text = format!(
                    "{}/{} agents busy, {} queued overall",
                    status.capacity.busy, status.capacity.max, status.queued
                );
                if mine.is_empty() {
                    text.push_str("\nnothing running or queued in this chat");
                }
                for view in &mine {
                    text.push('\n');
                    text.push_str(&views::task_line(view));
                    if let Some(progress) = &view.progress {
                        text.push_str(&format!("\n  latest: {progress}"));
                    }
                }
                Ok(self.chat_reply(
                    "status",
                    text,
                    serde_json::to_value(&status).unwrap_or_default(),
                ))
            }
        }
    }

    fn stop(
        &mut self,
        target: StopTarget,
        scope: Scope,
        chat: bool,
        reply: oneshot::Sender<Reply>,
    ) {
        // A task that already ended is reported as it ended.
        if let StopTarget::Task(task_id) = &target {
            if let Some(done) = self.history.get(task_id) {
                if let Scope::Chat(session) = &scope {
                    if &done.session != session {
                        let _ = reply.send(err(
                            ErrorCode::Forbidden,
                            format!("task {task_id} is not in this chat"),
                        ));
                        return;
                    }
                }
                let id = *task_id;
                self.waiters.push(StopWaiter {
                    tasks: vec![id],
                    remaining: HashSet::new(),
                    chat,
                    reply,
                });
                self.answer_waiters();
                return;
            }
        }
        match self.dispatcher.stop(target, &scope, now_millis()) {
            Ok((tasks, actions)) => {
                let remaining = tasks.iter().copied().collect();
                self.waiters.push(StopWaiter {
                    tasks,
                    remaining,
                    chat,
                    reply,
                });
                self.execute(actions);
            }
            Err(StopError::NotFound(id)) => {
                let _ = reply.send(err(ErrorCode::NotFound, format!("no task {id}")));
            }
            Err(StopError::Forbidden { task_id, .. }) => {
                let _ = reply.send(err(
                    ErrorCode::Forbidden,
                    format!("task {task_id} is not in this chat"),
                ));
            }
            Err(StopError::OtherSession { session }) => {
                let _ = reply.send(err(
                    ErrorCode::Forbidden,
                    format!("session {session} is not this chat"),
                ));
            }
        }
    }

    fn status(&self, task_id: Option<&str>) -> Reply {
        match task_id {
            Some(id) => {
                let task_id = self.resolve(id)?;
                json(
                    self.view(&task_id)
                        .ok_or((ErrorCode::NotFound, format!("no task {id}")))?,
                )
            }
            None => json(self.status_reply()),
        }
    }

    fn status_reply(&self) -> StatusReply {
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
        }
    }

    /// Active tasks first (by start), then queued ones by position, then (with `all`)
    /// finished ones, oldest first.
    fn list(&self, session: Option<&str>, all: bool) -> Vec<TaskView> {
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
            let mut done: Vec<TaskView> = Vec::new();
            for id in &self.history_order {
                if let Some(task) = self
                    .history
                    .get(id)
                    .filter(|t| session.is_none_or(|s| t.session == s))
                {
                    done.push(views::task_view(task, None));
                }
            }
            views.splice(0..0, done);
        }
        views
    }

    fn view(&self, task_id: &TaskId) -> Option<TaskView> {
        if let Some(task) = self.dispatcher.task(task_id) {
            return Some(views::task_view(task, self.dispatcher.position(task_id)));
        }
        self.history.get(task_id).map(|t| views::task_view(t, None))
    }

    /// A full task id, or a unique prefix (at least 4 characters) of a known one.
    fn resolve(&self, text: &str) -> Result<TaskId, RequestError> {
        let text = text.trim().trim_end_matches('…');
        if let Ok(id) = TaskId::parse_str(text) {
            return Ok(id);
        }
        if text.len() < 4 || !text.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return err(
                ErrorCode::NotFound,
                format!("no task {text} (task ids look like 0192f3c4-…)"),
            );
        }
        let prefix = text.to_ascii_lowercase();
        let mut matches: Vec<TaskId> = self
            .dispatcher
            .tasks()
            .map(|t| t.id)
            .chain(self.history_order.iter().copied())
            .filter(|id| id.to_string().starts_with(&prefix))
            .collect();
        matches.sort();
        matches.dedup();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => err(ErrorCode::NotFound, format!("no task {text}")),
            _ => err(
                ErrorCode::BadRequest,
                format!(
                    "task id prefix {text} is ambiguous ({} tasks)",
                    matches.len()
                ),
            ),
        }
    }
}

/// A work message as a client sent it.
struct Work {
    session: String,
    text: String,
    message_id: Option<String>,
    priority: Priority,
    mode: Option<Mode>,
}

fn check_session(session: &str) -> Result<(), RequestError> {
    if session.trim().is_empty() || session.len() > 256 {
        return err(ErrorCode::BadRequest, "session must be 1 to 256 bytes");
    }
    Ok(())
}

fn event_of(
    kind: EventKind,
    view: &TaskView,
    text: Option<String>,
    into: Option<String>,
) -> EventView {
    EventView {
        kind,
        task_id: view.task_id.clone(),
        session: view.session.clone(),
        position: view.position,
        text,
        into,
        task: Some(view.clone()),
        at: Some(views::rfc3339(now_millis())),
    }
}

/// Where a live task stands, as the first event of a watch: its position if queued,
/// else `started`.
fn snapshot_event(view: &TaskView) -> EventView {
    let kind = if view.position.is_some() {
        EventKind::Position
    } else {
        EventKind::Started
    };
    event_of(kind, view, None, None)
}

fn msg_name(msg: &AgentMsg) -> &'static str {
    match msg {
        AgentMsg::Hello(_) => "Hello",
        AgentMsg::Progress { .. } => "Progress",
        AgentMsg::Result(_) => "Result",
        AgentMsg::Heartbeat => "Heartbeat",
        AgentMsg::SteerAck { .. } => "SteerAck",
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Makes orphaned descendants of agents come back to agentd (see [`agentd_proc`]).
pub fn become_subreaper() -> nix::Result<()> {
    agentd_proc::become_subreaper()
}
