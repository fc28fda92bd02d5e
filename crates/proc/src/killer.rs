//! The Killer: one worker thread that signals and empties task trees, so that the
//! daemon's event loop never sleeps between kill rounds and never scans `/proc`.
//!
//! The daemon sends requests ([`Killer::track`], [`Killer::signal`], [`Killer::kill`],
//! [`Killer::agent_exited`]; each returns at once; [`Killer::untracked_exited`] answers
//! a normal exit in a task cgroup on the caller's thread with one `rmdir`) and receives [`TreeReport`]s through
//! the sink it gave to [`Killer::start`]. Kill rounds are timer-driven inside the
//! worker: with a cgroup a round is one write of `cgroup.kill` and emptiness is one
//! read of `cgroup.events`; without one a round is a tree search. After an agent that
//! exited normally the worker reads `cgroup.events` once (cgroups) or, as a subreaper
//! with no orphaned children, lists agentd's own children (fallback), and only
//! searches `/proc` when something may be left.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::contain::TaskProcs;
use crate::pidfd::open_verified;
use crate::tree::read_stat;

/// What the Killer tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeReport {
    /// `signal` (a SIGTERM is followed by SIGCONT) reached `processes` processes of
    /// the task; answers [`Killer::signal`] and each [`Killer::kill`].
    Signalled {
        task_id: String,
        signal: Signal,
        processes: usize,
    },
    /// Answers [`Killer::agent_exited`]: nothing of the task runs any more (its
    /// cgroup is removed), or, if `survivors` is not empty, these pids outlived
    /// every kill round until the give-up deadline. `killed` is the most processes
    /// one SIGKILL round of this task reached (by [`Killer::kill`], or because the
    /// agent exited and left processes behind); 0 when none was needed. The task is
    /// forgotten after this report; its slot may be freed.
    Empty {
        task_id: String,
        killed: usize,
        survivors: Vec<u32>,
    },
}

/// Timing of kill rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillerOptions {
    /// The first pause between two kill rounds; it doubles up to `max_pause`.
    pub first_pause: Duration,
    pub max_pause: Duration,
    /// How long kill rounds go on before survivors are reported.
    pub give_up_after: Duration,
}

impl Default for KillerOptions {
    fn default() -> KillerOptions {
        KillerOptions {
            first_pause: Duration::from_millis(1),
            max_pause: Duration::from_millis(20),
            give_up_after: Duration::from_secs(5),
        }
    }
}

enum Request {
    Track(Box<TaskProcs>),
    Signal(String, Signal),
    Kill(String),
    Exited(String),
    Shutdown,
}

/// Handle on the worker thread. Dropping it stops the worker (tracked tasks are not
/// killed by that: stop them first).
pub struct Killer {
    tx: mpsc::Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Killer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Killer").finish_non_exhaustive()
    }
}

impl Killer {
    /// Starts the worker; `sink` is called on the worker thread for every report
    /// (forward it to the event loop, e.g. into a tokio `mpsc::UnboundedSender`).
    pub fn start(sink: impl FnMut(TreeReport) + Send + 'static) -> io::Result<Killer> {
        Killer::with_options(KillerOptions::default(), sink)
    }

    pub fn with_options(
        opts: KillerOptions,
        sink: impl FnMut(TreeReport) + Send + 'static,
    ) -> io::Result<Killer> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("agentd-killer".into())
            .spawn(move || Worker::new(opts, Box::new(sink)).run(rx))?;
        Ok(Killer {
            tx,
            thread: Some(thread),
        })
    }

    /// A Killer whose reports arrive on a std channel.
    pub fn with_channel(opts: KillerOptions) -> io::Result<(Killer, mpsc::Receiver<TreeReport>)> {
        let (tx, rx) = mpsc::channel();
        let killer = Killer::with_options(opts, move |report| {
            let _ = tx.send(report);
        })?;
        Ok((killer, rx))
    }

    /// Starts keeping a task's processes: right after [`crate::Procs::spawn`], or
    /// (with a cgroup) at the latest before the first [`Killer::signal`] or
    /// [`Killer::kill`] of the task; see [`Killer::untracked_exited`].
    pub fn track(&self, procs: TaskProcs) {
        let _ = self.tx.send(Request::Track(Box::new(procs)));
    }

    /// Sends `signal` to every process of the task (SIGTERM is followed by SIGCONT,
    /// so a stopped process acts on it). Answered by [`TreeReport::Signalled`] (0
    /// processes for an unknown task).
    pub fn signal(&self, task_id: &str, signal: Signal) {
        let _ = self.tx.send(Request::Signal(task_id.to_owned(), signal));
    }

    /// SIGKILLs the task's tree in rounds until it is empty (`cgroup.kill` with a
    /// cgroup). Answered by one [`TreeReport::Signalled`] for the first round (0
    /// processes for a task that is empty or unknown).
    pub fn kill(&self, task_id: &str) {
        let _ = self.tx.send(Request::Kill(task_id.to_owned()));
    }

    /// The task's agent was reaped: kill whatever it left behind, remove its cgroup,
    /// and answer [`TreeReport::Empty`] (at once for an unknown task).
    pub fn agent_exited(&self, task_id: &str) {
        let _ = self.tx.send(Request::Exited(task_id.to_owned()));
    }

    /// The agent of a task whose processes were never handed to [`Killer::track`]
    /// was reaped (a caller may keep a task's [`TaskProcs`] until a signal needs them,
    /// and hand them over then). With a cgroup that the kernel lets one `rmdir`
    /// remove (or that is gone), nothing of the task is left (see
    /// [`crate::TaskCgroup::remove_if_empty`]): the [`TreeReport::Empty`] is returned
    /// at once, without a round trip through the worker. Otherwise (something may be
    /// left, a sub-cgroup, or no cgroup) the processes go to the worker as
    /// [`Killer::track`] and [`Killer::agent_exited`] would send them, and the report
    /// comes through the sink as usual: `None`.
    pub fn untracked_exited(&self, procs: TaskProcs) -> Option<TreeReport> {
        if let Some(cgroup) = &procs.cgroup {
            if let Ok(true) = cgroup.remove_if_empty() {
                return Some(TreeReport::Empty {
                    task_id: procs.task_id,
                    killed: 0,
                    survivors: Vec::new(),
                });
            }
        }
        let task_id = procs.task_id.clone();
        self.track(procs);
        self.agent_exited(&task_id);
        None
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.tx.send(Request::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Entry {
    procs: TaskProcs,
    exited: bool,
    rounds: Option<Rounds>,
    /// The most processes one SIGKILL round reached.
    killed: usize,
    /// Without a cgroup: every process a tree search found to be the task's (pid and
    /// start time), kept until it is a zombie or gone. A search alone cannot tell
    /// when a member is gone: a killed process keeps running in the kernel while its
    /// memory is freed (a large address space takes a good part of a second), and
    /// meanwhile its environment reads as nothing, so a detached member found by its
    /// `AGENTD_TASK_ID` alone would no longer be found while its files are still
    /// open. Members stay members until they have finished dying.
    seen: HashMap<u32, u64>,
}

impl Entry {
    /// Without a cgroup: the task's live processes, with their start times. A tree
    /// search, plus every process an earlier search found that is still that process
    /// (same start time) and not yet a zombie.
    fn tree_members(&mut self) -> Vec<(u32, u64)> {
        let mut members = self.procs.tree().scan();
        for &(pid, start) in &members {
            self.seen.insert(pid, start);
        }
        self.seen.retain(|&pid, &mut start| {
            if members.iter().any(|&(p, _)| p == pid) {
                return true;
            }
            let dying = read_stat(pid).is_some_and(|s| s.start == start && !s.zombie);
            if dying {
                members.push((pid, start));
            }
            dying
        });
        members.sort_unstable();
        members
    }
}

#[derive(Clone, Copy)]
struct Rounds {
    next: Instant,
    until: Instant,
    pause: Duration,
    first: bool,
}

struct Worker {
    opts: KillerOptions,
    sink: Box<dyn FnMut(TreeReport) + Send>,
    tasks: HashMap<String, Entry>,
}

impl Worker {
    fn new(opts: KillerOptions, sink: Box<dyn FnMut(TreeReport) + Send>) -> Worker {
        Worker {
            opts,
            sink,
            tasks: HashMap::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Request>) {
        loop {
            let next = self
                .tasks
                .values()
                .filter_map(|e| e.rounds.map(|r| r.next))
                .min();
            let request = match next {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match request {
                Ok(Request::Track(procs)) => {
                    self.tasks.insert(
                        procs.task_id.clone(),
                        Entry {
                            procs: *procs,
                            exited: false,
                            rounds: None,
                            killed: 0,
                            seen: HashMap::new(),
                        },
                    );
                }
                Ok(Request::Signal(task_id, signal)) => self.signal(&task_id, signal),
                Ok(Request::Kill(task_id)) => match self.tasks.get_mut(&task_id) {
                    Some(entry) => match &mut entry.rounds {
                        // Rounds already run (the agent exited and left processes): the
                        // next one answers.
                        Some(rounds) => rounds.first = true,
                        None => entry.rounds = Some(new_rounds(&self.opts, true)),
                    },
                    None => (self.sink)(TreeReport::Signalled {
                        task_id,
                        signal: Signal::SIGKILL,
                        processes: 0,
                    }),
                },
                Ok(Request::Exited(task_id)) => self.exited(task_id),
                Ok(Request::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.run_due_rounds();
        }
    }

    fn exited(&mut self, task_id: String) {
        let agents = self.tasks_starts();
        let Some(entry) = self.tasks.get_mut(&task_id) else {
            (self.sink)(TreeReport::Empty {
                task_id,
                killed: 0,
                survivors: Vec::new(),
            });
            return;
        };
        entry.exited = true;
        if entry.rounds.is_some() {
            // Kill rounds are under way; the last of them reports.
            return;
        }
        if is_empty_after_exit(entry, &agents) {
            let killed = entry.killed;
            self.finish(&task_id, killed, Vec::new());
        } else {
            entry.rounds = Some(new_rounds(&self.opts, false));
        }
    }

    /// (pid, start time) of every tracked agent, to tell them from orphans.
    fn tasks_starts(&self) -> Vec<(u32, Option<u64>)> {
        self.tasks
            .values()
            .map(|e| (e.procs.pid, e.procs.start))
            .collect()
    }

    fn signal(&mut self, task_id: &str, signal: Signal) {
        let processes = match self.tasks.get_mut(task_id) {
            Some(entry) => signal_tree(entry, signal),
            None => 0,
        };
        (self.sink)(TreeReport::Signalled {
            task_id: task_id.to_owned(),
            signal,
            processes,
        });
    }

    fn run_due_rounds(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, e)| e.rounds.is_some_and(|r| r.next <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for task_id in due {
            self.round(&task_id, now);
        }
    }

    fn round(&mut self, task_id: &str, now: Instant) {
        let opts = self.opts;
        let Some(entry) = self.tasks.get_mut(task_id) else {
            return;
        };
        let Some(mut rounds) = entry.rounds else {
            return;
        };
        let (left, scanned) = live_members(entry);
        if left.is_empty() {
            entry.rounds = None;
            if rounds.first {
                (self.sink)(TreeReport::Signalled {
                    task_id: task_id.to_owned(),
                    signal: Signal::SIGKILL,
                    processes: 0,
                });
            }
            if entry.exited {
                let killed = entry.killed;
                self.finish(task_id, killed, Vec::new());
            }
            return;
        }
        if now >= rounds.until {
            entry.rounds = None;
            tracing::warn!(%task_id, survivors = ?left, "processes survived every kill round");
            if entry.exited {
                let killed = entry.killed;
                self.finish(task_id, killed, left);
            }
            return;
        }
        let n = kill_round(&entry.procs, &scanned);
        entry.killed = entry.killed.max(n);
        let report_first = rounds.first;
        rounds.first = false;
        rounds.next = now + rounds.pause;
        rounds.pause = (rounds.pause * 2).min(opts.max_pause);
        entry.rounds = Some(rounds);
        if report_first {
            (self.sink)(TreeReport::Signalled {
                task_id: task_id.to_owned(),
                signal: Signal::SIGKILL,
                processes: n,
            });
        }
    }

    fn finish(&mut self, task_id: &str, killed: usize, survivors: Vec<u32>) {
        if let Some(entry) = self.tasks.remove(task_id) {
            if let Some(cgroup) = &entry.procs.cgroup {
                if survivors.is_empty() {
                    if let Err(e) = cgroup.remove() {
                        tracing::warn!(%task_id, "cannot remove {}: {e}", cgroup.path().display());
                    }
                }
                // Else the cgroup stays, and the next agentd's recovery removes it.
            }
        }
        (self.sink)(TreeReport::Empty {
            task_id: task_id.to_owned(),
            killed,
            survivors,
        });
    }
}

fn new_rounds(opts: &KillerOptions, first: bool) -> Rounds {
    let now = Instant::now();
    Rounds {
        next: now,
        until: now + opts.give_up_after,
        pause: opts.first_pause,
        first,
    }
}

/// The task's processes that still run (zombies excluded), and for the tree search
/// the scan they came from: with a cgroup, its `cgroup.procs` if `cgroup.events`
/// says populated (an unreadable cgroup counts as populated, except one that is
/// gone); else one tree search.
fn live_members(entry: &mut Entry) -> (Vec<u32>, Vec<(u32, u64)>) {
    let procs = &entry.procs;
    match &procs.cgroup {
        Some(cgroup) => match cgroup.populated() {
            Ok(false) => (Vec::new(), Vec::new()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), Vec::new()),
            _ => {
                let pids = cgroup.pids();
                // Populated yet listed empty: its processes are dying right now. Not
                // empty until cgroup.events says so; the agent's pid stands for them.
                if pids.is_empty() {
                    (vec![procs.pid], Vec::new())
                } else {
                    (pids, Vec::new())
                }
            }
        },
        None => {
            let scanned = entry.tree_members();
            (scanned.iter().map(|(pid, _)| *pid).collect(), scanned)
        }
    }
}

/// One SIGKILL round; returns how many processes it reached.
fn kill_round(procs: &TaskProcs, scanned: &[(u32, u64)]) -> usize {
    match &procs.cgroup {
        Some(cgroup) => {
            let pids = cgroup.pids();
            if let Err(e) = cgroup.kill() {
                tracing::warn!(task_id = %procs.task_id, "cgroup.kill failed: {e}");
                if let Some(fd) = &procs.pidfd {
                    let _ = fd.signal(Signal::SIGKILL);
                }
            }
            // cgroup.kill misses a process whose main thread exited.
            crate::cgroup::kill_leaderless(cgroup.path(), &pids);
            pids.len()
        }
        None => procs
            .tree()
            .signal_scanned(scanned, Signal::SIGKILL, procs.pidfd.as_ref()),
    }
}

/// Sends `signal` (and SIGCONT after a SIGTERM) to every process of the task.
fn signal_tree(entry: &mut Entry, signal: Signal) -> usize {
    let Some(cgroup) = &entry.procs.cgroup else {
        let members = entry.tree_members();
        let procs = &entry.procs;
        return procs
            .tree()
            .signal_scanned(&members, signal, procs.pidfd.as_ref());
    };
    let procs = &entry.procs;
    let agent = procs.pidfd.as_ref();
    let others: Vec<u32> = cgroup
        .pids()
        .into_iter()
        .filter(|&pid| agent.map_or(true, |a| a.pid() != pid))
        .collect();
    // Still in the cgroup after the pidfds were opened: ours (see open_verified).
    let fds = open_verified(&others, |opened| {
        let now = cgroup.pids();
        opened.iter().copied().filter(|p| now.contains(p)).collect()
    });
    let mut sigs = vec![signal];
    if signal == Signal::SIGTERM {
        sigs.push(Signal::SIGCONT);
    }
    let mut reached = 0;
    for sig in sigs {
        reached = 0;
        if let Some(agent) = agent {
            reached += usize::from(agent.signal(sig).is_ok());
        }
        for fd in &fds {
            reached += usize::from(fd.signal(sig).is_ok());
        }
    }
    reached
}

/// After the agent was reaped: is nothing of the task left? With a cgroup, one read
/// of `cgroup.events`. Without, cheaply when agentd is a subreaper: every process
/// the task left behind then descends from a child of agentd that is not an agent, so
/// if agentd's only children are tracked agents (checked by pid and start time)
/// nothing is left (unless an earlier search found members that may still be dying).
/// Otherwise a tree search.
fn is_empty_after_exit(entry: &mut Entry, agents: &[(u32, Option<u64>)]) -> bool {
    if entry.procs.cgroup.is_some() {
        return live_members(entry).0.is_empty();
    }
    if entry.seen.is_empty() && only_agents_are_children(agents) == Some(true) {
        return true;
    }
    entry.tree_members().is_empty()
}

/// `Some(true)` if agentd is a subreaper and each of its children is a tracked agent;
/// `None` when that cannot be told (not a subreaper, no `children` files, or a thread
/// came or went while they were read).
fn only_agents_are_children(agents: &[(u32, Option<u64>)]) -> Option<bool> {
    let mut subreaper: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes an int through the pointer.
    let rc = unsafe {
        libc::prctl(
            libc::PR_GET_CHILD_SUBREAPER,
            &mut subreaper as *mut _,
            0,
            0,
            0,
        )
    };
    if rc != 0 || subreaper == 0 {
        return None;
    }
    let threads = || -> Option<Vec<String>> {
        let mut t: Vec<String> = fs::read_dir("/proc/self/task")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        t.sort();
        Some(t)
    };
    let before = threads()?;
    let mut children = Vec::new();
    for tid in &before {
        let text = fs::read_to_string(format!("/proc/self/task/{tid}/children")).ok()?;
        children.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    if threads()? != before {
        return None;
    }
    Some(children.iter().all(|&child| {
        agents.iter().any(|&(pid, start)| {
            pid == child && start.is_some() && read_stat(child).map(|s| s.start) == start
        })
    }))
}
