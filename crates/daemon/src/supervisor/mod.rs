//! The supervisor: one event loop that owns all mutable state of agentd.
//!
//! ```text
//!  control connections ──requests──▶┐
//!  agent reader tasks ──agent events─▶  Supervisor::run  ──▶ Dispatcher::handle ──▶ actions
//!  SIGCHLD, signal thread (TERM/INT)▶┤        │                                     │
//!  Killer thread ──TreeReport────────▶┘        ◀──────── spawn, IPC, signals, timers ◀┘
//! ```
//!
//! **Invariants:**
//! - Only this loop mutates the dispatcher, the agent table and the history; everything
//!   else talks to it through channels. Requests are polled before agent events
//!   (`biased`), so a flood of progress cannot delay `/status`.
//! - The loop never blocks on an agent, never sleeps and never scans the machine:
//!   spawning is a fork/exec ([`agentd_proc::Procs::spawn`]), IPC writes go through
//!   per-agent writer tasks, stop escalation and liveness checks are driven by timers,
//!   and signals, kill rounds and the search for leftovers run on the
//!   [`agentd_proc::Killer`]'s thread. The one exception is cheap: after a normal exit
//!   in a task cgroup no stop touched, the loop tries one `rmdir` of the cgroup, which
//!   the kernel refuses while it is populated
//!   ([`agentd_proc::Killer::untracked_exited`]); only a tree that may hold leftovers
//!   goes to the Killer.
//! - [`agentd_proc::reap_children`] runs only here, and the dispatcher learns of an
//!   exit in the same step, so a pid is never signalled after it was reaped.
//! - A task's slot is released when its agent is reaped, its channel drained and its
//!   tree is known empty (that `rmdir`, or the Killer's report), never when it merely
//!   reports a result.
//! - Store writes are handed to the writer when the loop is about to wait (or once
//!   64 are held), in the order they were made (`step_writes`): never held across a
//!   wait.
//!
//! **Layout:** this module holds the loop and the `Supervisor` state; the rest is
//! split by concern, each an `impl Supervisor` block:
//! - `executor`: executes the dispatcher's actions; timers (arm, fire);
//! - `agents`: agentd's side of live agents (spawn, IPC, signals, reap, agent events);
//! - `requests`: one module per request family (`send` with the chat commands, `stop`
//!   with its waiters, `queue`, `watch` with event publishing, `status` and `tasks`);
//! - `history`: finished tasks and task id resolution;
//! - `recovery`: putting the store's work back at start, and write failures.

mod agent_events;
mod agents;
mod executor;
pub mod history;
mod recovery;
mod requests;
mod step_writes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_core::{Dispatcher, Event, Liveness, StopStep, TaskId};
use agentd_proc::{CgroupOptions, Containment, Killer, Procs, TreeReport};
use agentd_proto::control::{Answer, ErrorBody, ErrorCode};
use tokio::sync::mpsc;

use crate::agent_io::AgentEvent;
use crate::config::DaemonConfig;
use crate::control::{self, ControlRequest, Reply, ServerInfo};
use crate::durable::Durable;
use crate::events::Subscriptions;
use crate::supervisor::agents::Agent;
use crate::supervisor::executor::Timer;
use crate::supervisor::history::{History, MemoryHistory};
use crate::supervisor::requests::stop::StopWaiter;
use crate::views::now_millis;
use agentd_proto::control::RecoveryView;
use agentd_store::StoreWriter;
pub(crate) use recovery::StoreEvent;
use requests::status::Touched;

/// Signals the daemon acts on, delivered by the binary (SIGCHLD from the loop's own
/// runtime, SIGTERM and SIGINT from its signal thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonSignal {
    /// A child changed state: run the reaper.
    Child,
    /// SIGTERM or SIGINT: the first drains (stops every task), the second kills.
    Shutdown,
}

/// How long, at exit, connections may take to write what waits for them.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

/// Runs agentd on an already-bound listener until `shutdown` resolves (or signals say
/// so) and every agent is gone.
pub async fn run(
    config: DaemonConfig,
    durable: Durable,
    listener: control::Endpoint,
    mut signals: mpsc::UnboundedReceiver<DaemonSignal>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    crate::config::create_state_dir(&config.state_dir)?;
    let (socket, state_dir) = (config.socket.clone(), config.state_dir.clone());
    let info = Arc::new(ServerInfo::new());
    let (request_tx, mut requests) = mpsc::channel::<ControlRequest>(1024);
    let (agent_tx, mut agent_events) = mpsc::channel::<AgentEvent>(1024);
    let connections = listener.limits.clone();
    // Connections are accepted and read on the fast lane's thread (see `FastLane`).
    let mut fast_lane = control::FastLane::start(listener, request_tx, info.clone())?;

    let procs = containment(&config);
    let (tree_tx, mut tree_reports) = mpsc::unbounded_channel::<TreeReport>();
    let killer = Killer::start(move |report| {
        let _ = tree_tx.send(report);
    })?;
    let (store_tx, mut store_events) = mpsc::unbounded_channel::<StoreEvent>();
    let Durable { store, recovery } = durable;
    let history_size = config.history;
    let mut sup = Supervisor::new(
        config,
        agent_tx,
        info,
        procs,
        killer,
        store.writer(),
        store_tx,
    );
    sup.store_reader = store.reader().ok();
    sup.reads = match store.reader() {
        Ok(reader) => crate::reads::Reads::start(reader)
            .map_err(|e| tracing::warn!("cannot start the history reader: {e}"))
            .ok(),
        Err(e) => {
            tracing::warn!("finished tasks of earlier runs cannot be listed: {e}");
            None
        }
    };
    sup.history = Box::new(crate::durable::StoreHistory::new(
        history_size,
        store
            .reader()
            .map_err(|e| tracing::warn!("history beyond memory is unavailable: {e}"))
            .ok(),
    ));
    match store.reader().and_then(|r| r.finished(None, history_size)) {
        Ok(finished) => sup.load_history(finished),
        Err(e) => tracing::warn!("cannot read finished tasks from the store: {e}"),
    }
    // Ends the interrupted tasks' agents (by their recorded identity), then what a
    // previous agentd left in its task cgroups, before any recovered work starts.
    sup.recover(recovery);
    // Where it listens and keeps its state: what a user gives agentctl (`--socket`).
    tracing::info!(
        "agentd {} ready on {} (pid {}, state dir {}, max {} concurrent agents)",
        env!("CARGO_PKG_VERSION"),
        socket.display(),
        std::process::id(),
        state_dir.display(),
        sup.dispatcher.config().max_concurrent
    );
    crate::notify::ready();
    sup.refresh_status(Touched::Anything);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    let mut shutdown_fired = false;
    loop {
        let next_timer = sup.timers.keys().next().map(|(at, _)| *at);
        // What this step may have changed of the status snapshot, and the request's
        // hand-over token, dropped once the snapshot is current.
        let mut touched = Touched::Anything;
        let mut handed = None;
        tokio::select! {
            biased;
            Some(mut request) = requests.recv() => {
                agentd_store::timeline::mark(agentd_store::timeline::Stage::Loop, 0);
                handed = request.handed.take();
                touched = Touched::by(&request.body);
                sup.on_request(request);
            }
            Some(signal) = signals.recv() => match signal {
                DaemonSignal::Child => {
                    touched = Touched::Live;
                    sup.reap();
                }
                DaemonSignal::Shutdown => sup.on_shutdown_signal(),
            },
            Some(report) = tree_reports.recv() => {
                touched = Touched::Live;
                sup.on_tree_report(report);
            }
            () = &mut shutdown, if !shutdown_fired => {
                shutdown_fired = true;
                sup.on_shutdown_signal();
            }
            Some(event) = store_events.recv() => sup.on_store_event(event),
            Some(event) = agent_events.recv() => {
                touched = Touched::by_agent(&event);
                sup.on_agent_event(event);
            }
            () = sleep_until(next_timer) => sup.fire_timers(),
            _ = tick.tick() => {
                sup.reap();
                sup.handle(Event::Tick);
            }
            // Last: polled only when nothing else is ready. The store writes of the
            // steps since the last wait go to the writer together (see step_writes).
            () = sup.store.flush_before_waiting() => {}
        }
        sup.store.flush_if_many();
        sup.publish_positions();
        sup.refresh_status(touched);
        drop(handed);
        // Queued work stays queued (in the store) for the next start.
        if sup.shutting_down.is_some() && sup.agents.is_empty() {
            break;
        }
    }
    sup.store.flush();
    // What the stop told its watchers (the tasks' `finished`) reaches them before
    // the connections close, and so do the answers the fast lane's connections owe
    // (both lanes at once, each for at most a second).
    fast_lane.begin_stop();
    connections.flush_all(SHUTDOWN_FLUSH).await;
    fast_lane.stop();
    // `{ sup }` moves it: everything but these two (the agents' logs among them)
    // is dropped here, before the store closes.
    let Supervisor {
        killer, mut procs, ..
    } = { sup };
    drop(killer);
    if let Err(e) = procs.shutdown() {
        tracing::warn!("cannot remove agentd's cgroups: {e}");
    }
    // Every state change submitted so far is written before agentd exits.
    store.close();
    tracing::info!("agentd stopped");
    Ok(())
}

/// Decides the containment (see [`agentd_proc::Procs`]) and starts the cgroup
/// guardian at once (after the previous agentd's has finished), so that from here on
/// an agentd that dies, even while it recovers, leaves no cgroup behind; recovery
/// (see `Supervisor::recover_cgroups`) then kills what a previous agentd on this
/// socket left in its task cgroups.
fn containment(config: &DaemonConfig) -> Procs {
    let mut procs = if config.agents.no_cgroup {
        Procs::process_tree(agentd_proto::text::CGROUP_DISABLED)
    } else {
        Procs::detect(&CgroupOptions::for_socket(&config.socket))
    };
    match procs.containment() {
        Containment::Cgroup { root, controllers } => tracing::info!(
            "containment: a cgroup per task under {} (controllers: {})",
            root.display(),
            if controllers.is_empty() {
                "none".to_string()
            } else {
                controllers.join(",")
            }
        ),
        Containment::ProcessTree { reason } => {
            tracing::info!("containment: process tree search ({reason})")
        }
    }
    match procs.start_guardian() {
        Ok(Some(pid)) => tracing::debug!(pid, "cgroup guardian started"),
        Ok(None) => {}
        Err(e) => tracing::warn!("cannot start the cgroup guardian: {e}"),
    }
    procs
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

struct Supervisor {
    dispatcher: Dispatcher,
    config: DaemonConfig,
    agent_events: mpsc::Sender<AgentEvent>,
    info: Arc<ServerInfo>,
    agents: HashMap<TaskId, Agent>,
    pids: HashMap<u32, TaskId>,
    timers: BTreeMap<(Instant, u64), Timer>,
    timer_seq: u64,
    /// Finished tasks.
    history: Box<dyn History>,
    waiters: Vec<StopWaiter>,
    /// Clients watching tasks or sessions.
    subscriptions: Subscriptions,
    /// Set by the first shutdown signal.
    shutting_down: Option<Instant>,
    /// How agents are contained: spawns go through it.
    procs: Procs,
    /// Signals and empties task trees off the loop; reports arrive on the loop.
    killer: Killer,
    /// The silence and run-time limits.
    liveness: Liveness,
    /// Run-time limits of single tasks (`send.timeout_ms`), until they start or end.
    task_timeouts: HashMap<TaskId, Duration>,
    /// Writes to the store (see `durable`), handed to its writer when the loop step
    /// ends.
    store: step_writes::StepWrites,
    /// Where write completions that need the loop report back.
    store_events: mpsc::UnboundedSender<StoreEvent>,
    /// Carries answers sent on the store's writer thread to their connections.
    relay: crate::replier::Relay,
    /// What recovery did at start, for `status`.
    recovery: Option<RecoveryView>,
    /// Tasks whose output log may still grow.
    pumps: crate::output::Pumps,
    /// Each live agent's log (progress lines go in through it).
    log_writers: HashMap<TaskId, crate::output::TaskOutput>,
    /// Reads of the store for re-deliveries the dispatcher has forgotten.
    store_reader: Option<agentd_store::Reader>,
    /// Resumed attempts not yet handed to an agent: what the agent is told.
    resumes: HashMap<TaskId, requests::resume::Resumed>,
    /// Each task's latest checkpoint while its write is in flight (then the store
    /// has it), with the number of that write.
    checkpoints_in_flight: HashMap<TaskId, (u64, String)>,
    checkpoint_seq: u64,
    /// New tasks with a message id whose insert may still be in flight, in submission
    /// order, with their acknowledgements: a duplicate of one is answered only with
    /// its commit. Committed ones leave from the front as new ones come; a failed one
    /// leaves when the loop hears of the failure.
    inserts_pending: std::collections::VecDeque<(TaskId, Arc<requests::ack::Ack>)>,
    /// Reads of finished tasks from the store, off the loop (`tasks --all`, `status`).
    reads: Option<crate::reads::Reads>,
    /// Finished tasks whose ending is not committed yet: listings take them from memory.
    /// The store's writer removes each one itself once its ending committed, so that
    /// a commit does not wake the loop (measured: one wake-up in ten per task less).
    finishing: std::sync::Arc<std::sync::Mutex<HashSet<TaskId>>>,
    /// Every message id the store held at start was put in the dispatcher's window
    /// (it held fewer than the window): a message the window does not know is new,
    /// and the store need not be asked, unless its id may have left the window
    /// since (`Dispatcher::may_have_left_window`).
    dedup_complete: bool,
    /// The active tasks' key when the status snapshot's active part was built
    /// (`None`: not built yet).
    status_key: Option<u64>,
}

type RequestError = ErrorBody;

/// The set of finishing tasks, shared with the store's writer (a poisoned lock is
/// still a set of ids: taken as it is).
pub(crate) fn lock(
    finishing: &std::sync::Mutex<HashSet<TaskId>>,
) -> std::sync::MutexGuard<'_, HashSet<TaskId>> {
    finishing
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn err<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, RequestError> {
    Err(ErrorBody::new(code, message))
}

/// A successful typed answer.
fn json(value: impl Into<Answer>) -> Reply {
    Ok(value.into())
}

impl Supervisor {
    fn new(
        config: DaemonConfig,
        agent_events: mpsc::Sender<AgentEvent>,
        info: Arc<ServerInfo>,
        procs: Procs,
        killer: Killer,
        store: StoreWriter,
        store_events: mpsc::UnboundedSender<StoreEvent>,
    ) -> Supervisor {
        let dispatcher = Dispatcher::new(config.dispatch.clone());
        let history = Box::new(MemoryHistory::new(config.history));
        Supervisor {
            dispatcher,
            liveness: Liveness {
                hung_after: config.agents.hung_after,
                task_timeout: config.agents.task_timeout,
            },
            config,
            agent_events,
            info,
            agents: HashMap::new(),
            pids: HashMap::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            history,
            waiters: Vec::new(),
            subscriptions: Subscriptions::default(),
            shutting_down: None,
            procs,
            killer,
            task_timeouts: HashMap::new(),
            store: step_writes::StepWrites::new(store),
            store_events,
            relay: crate::replier::Relay::start(),
            recovery: None,
            pumps: Default::default(),
            log_writers: HashMap::new(),
            store_reader: None,
            resumes: HashMap::new(),
            checkpoints_in_flight: HashMap::new(),
            inserts_pending: std::collections::VecDeque::new(),
            checkpoint_seq: 0,
            reads: None,
            finishing: Default::default(),
            dedup_complete: false,
            status_key: None,
        }
    }

    fn on_shutdown_signal(&mut self) {
        if self.shutting_down.is_none() {
            tracing::info!("shutting down: stopping running tasks, keeping the queue");
            crate::notify::stopping();
            self.shutting_down = Some(Instant::now());
            // They end `interrupted`, for the watchers now as in the store.
            let actions = self.dispatcher.stop_for_shutdown(now_millis());
            self.execute(actions);
        } else {
            tracing::warn!("second shutdown signal: killing every agent now");
            let ids: Vec<TaskId> = self.agents.keys().copied().collect();
            for task_id in ids {
                self.signal_tree(task_id, StopStep::Sigkill);
            }
        }
    }
}

/// Makes orphaned descendants of agents come back to agentd (see [`agentd_proc`]).
pub fn become_subreaper() -> nix::Result<()> {
    agentd_proc::become_subreaper()
}
