//! Finding and signalling a task's process tree.
//!
//! A task's processes are: its agent's process group; every descendant of the agent
//! (found through parent links, so a tool that called `setsid` or `setpgid` is still
//! found while its ancestors live); and every process whose environment carries the
//! task's `AGENTD_TASK_ID` (orphans that double-forked away and were re-parented to
//! agentd, the subreaper). A process that both left the tree and scrubbed its
//! environment is out of reach: that is the limit of this fallback, which only holds
//! where agentd cannot have a cgroup per task (see [`crate::cgroup`]).
//!
//! A scan costs a read of `/proc/*/stat` and `/proc/*/environ` of every process on the
//! machine: run it off the event loop ([`crate::Killer`] does). Members found by a
//! scan are signalled through pidfds whose identity was checked after they were
//! opened ([`TaskTree::signal_verified`]), never by a pid that may have been reused.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::Path;

use agentd_proto::ipc::ENV_TASK_ID;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::pidfd::{open_verified, PidFd};
use crate::reap::reap_lock;

/// The processes of one task, identified by its agent and its task id.
#[derive(Debug, Clone)]
pub struct TaskTree {
    /// The agent's pid, which is also its process group id.
    pub agent_pid: u32,
    pub task_id: String,
    /// The agent's start time, when known: a process found at `agent_pid` with another
    /// start time is a stranger that reused the pid, and neither it, its descendants
    /// nor its group are taken for the task's.
    agent_start: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    ppid: u32,
    pgid: u32,
    /// No thread of the process runs any more (see [`read_stat`]).
    pub(crate) zombie: bool,
    /// Exiting (`PF_EXITING`), not yet a zombie: it runs no more code of its own
    /// but may still be freeing its memory and hold its files.
    exiting: bool,
    /// Clock ticks after boot: with the pid, names one process for good.
    pub(crate) start: u64,
    /// A thread that still runs when the thread group leader (whose state
    /// `/proc/PID/stat` shows) is a zombie: the process is read through it.
    through: Option<u32>,
}

/// Reads a small pseudo-file (a `/proc` or cgroup file) whole into `buf` with plain
/// reads: `fs::read_to_string` would first `statx` it for a size these files do not
/// have. At most `buf.len()` bytes.
pub(crate) fn read_small<'b>(path: &Path, buf: &'b mut [u8]) -> io::Result<&'b str> {
    let mut file = fs::File::open(path)?;
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    std::str::from_utf8(&buf[..len]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The kernel's task flag for "getting shut down" (include/linux/sched.h).
const PF_EXITING: u64 = 0x4;

impl Stat {
    /// The thread group leader exited while other threads run on.
    pub(crate) fn leader_exited(&self) -> bool {
        self.through.is_some()
    }
}

/// The process at `pid`. `/proc/PID/stat` shows the thread group leader, and a leader
/// that exited on its own (`pthread_exit`, the `exit` system call) is a zombie while
/// the process's other threads run on: its pid stays, signals to it reach the whole
/// group, it holds its files, and it is not reaped until its last thread exits. So a
/// zombie leader is looked behind: the process is a zombie only if none of its threads
/// runs, and is otherwise read through a thread that does (its `PF_EXITING`, and its
/// environment: the leader's cannot be read once it exited).
pub(crate) fn read_stat(pid: u32) -> Option<Stat> {
    let mut stat = parse_stat(Path::new(&format!("/proc/{pid}/stat")))?;
    if stat.zombie {
        if let Some((tid, thread)) = live_thread(pid) {
            stat.zombie = false;
            stat.exiting = thread.exiting;
            stat.through = Some(tid);
        }
    }
    Some(stat)
}

/// A thread of `pid` other than its leader that is no zombie, and its stat.
fn live_thread(pid: u32) -> Option<(u32, Stat)> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&tid| tid != pid)
        .find_map(|tid| {
            let stat = parse_stat(Path::new(&format!("/proc/{pid}/task/{tid}/stat")))?;
            (!stat.zombie).then_some((tid, stat))
        })
}

/// One `stat` file (of a process or of one of its threads).
fn parse_stat(path: &Path) -> Option<Stat> {
    let mut buf = [0u8; 2048];
    let text = read_small(path, &mut buf).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    // Field 9 (the kernel's PF_* flags), the 7th after the command name.
    let flags: u64 = fields.nth(3)?.parse().ok()?;
    // Field 22 of stat, the 20th after the command name.
    let start = fields.nth(12)?.parse().ok()?;
    Some(Stat {
        ppid,
        pgid,
        zombie: state == "Z" || state == "X",
        exiting: flags & PF_EXITING != 0,
        start,
        through: None,
    })
}

fn all_processes() -> HashMap<u32, Stat> {
    let mut procs = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return procs;
    };
    for entry in dir.flatten() {
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        {
            if let Some(stat) = read_stat(pid) {
                procs.insert(pid, stat);
            }
        }
    }
    procs
}

fn carries_marker(pid: u32, stat: &Stat, marker: &[u8]) -> bool {
    let path = match stat.through {
        Some(tid) => format!("/proc/{pid}/task/{tid}/environ"),
        None => format!("/proc/{pid}/environ"),
    };
    match fs::read(path) {
        Ok(env) => env.split(|b| *b == 0).any(|var| var == marker),
        Err(_) => false,
    }
}

/// True if a process with this pid exists and is not a zombie.
pub fn process_exists(pid: u32) -> bool {
    read_stat(pid).is_some_and(|s| !s.zombie)
}

impl TaskTree {
    pub fn new(agent_pid: u32, task_id: impl Into<String>) -> TaskTree {
        TaskTree {
            agent_pid,
            task_id: task_id.into(),
            agent_start: None,
        }
    }

    /// A tree whose agent is known by pid *and* start time (read while it was an
    /// unreaped child), so that a later reuse of its pid is recognised.
    pub(crate) fn with_agent_start(mut self, start: Option<u64>) -> TaskTree {
        self.agent_start = start;
        self
    }

    /// Live (non-zombie) processes of the task, agent included, agentd excluded, while
    /// the agent is not yet reaped (see [`TaskTree::find`]).
    pub fn members(&self) -> Vec<u32> {
        self.find(true)
    }

    /// Live (non-zombie) processes of the task, agentd excluded. With `through_agent`
    /// (the agent's pid is still ours: alive, or a zombie not yet reaped) they are the
    /// agent's descendants, its process group and the processes carrying the task's
    /// marker; without it, since a reaped pid may have been reused by a stranger (and
    /// its group id with it), only the processes carrying the marker and their
    /// descendants.
    pub fn find(&self, through_agent: bool) -> Vec<u32> {
        self.scan_with(through_agent)
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Like [`TaskTree::members`], with each member's start time, and with every
    /// child of agentd younger than the agent that is still exiting: an orphan of
    /// the task (reparented to agentd, the subreaper) that was killed (by agent-exec,
    /// say) has no environment left to read while it frees its memory, so nothing
    /// else tells whose it is; it may be the task's, and it will soon be gone. (Its
    /// exiting is read after its environment, so that one that began to exit
    /// between the two reads is not missed.)
    pub(crate) fn scan(&self) -> Vec<(u32, u64)> {
        self.search(true, true)
    }

    /// Like [`TaskTree::find`], with each member's start time.
    fn scan_with(&self, through_agent: bool) -> Vec<(u32, u64)> {
        self.search(through_agent, false)
    }

    fn search(&self, through_agent: bool, dying_orphans: bool) -> Vec<(u32, u64)> {
        let procs = all_processes();
        let me = std::process::id();
        let marker = format!("{ENV_TASK_ID}={}", self.task_id).into_bytes();

        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&pid, stat) in &procs {
            children.entry(stat.ppid).or_default().push(pid);
        }
        let mut found: HashSet<u32> = HashSet::new();
        let reused = match (self.agent_start, procs.get(&self.agent_pid)) {
            (Some(start), Some(stat)) => stat.start != start,
            _ => false,
        };
        if through_agent && !reused {
            let mut stack = vec![self.agent_pid];
            while let Some(pid) = stack.pop() {
                if procs.contains_key(&pid) && found.insert(pid) {
                    stack.extend(children.get(&pid).into_iter().flatten().copied());
                }
            }
            for (&pid, stat) in &procs {
                if stat.pgid == self.agent_pid {
                    found.insert(pid);
                }
            }
        }
        for (&pid, stat) in &procs {
            if pid != me && !found.contains(&pid) && carries_marker(pid, stat, &marker) {
                found.insert(pid);
                // Its descendants belong to the task too, marker or not.
                let mut stack: Vec<u32> = children.get(&pid).cloned().unwrap_or_default();
                while let Some(child) = stack.pop() {
                    if found.insert(child) {
                        stack.extend(children.get(&child).into_iter().flatten().copied());
                    }
                }
            }
        }
        if dying_orphans {
            // Read again, after the environments: one killed while they were read
            // may have lost its environment after its stat above was taken.
            for (&pid, stat) in &procs {
                if stat.ppid == me
                    && !found.contains(&pid)
                    && read_stat(pid).is_some_and(|now| now.start == stat.start && now.exiting)
                {
                    found.insert(pid);
                }
            }
        }
        found.remove(&me);
        let mut members: Vec<(u32, u64)> = found
            .into_iter()
            .filter_map(|pid| {
                procs
                    .get(&pid)
                    // Nothing older than the agent can be one of its task's processes.
                    .filter(|s| !s.zombie && self.agent_start.map_or(true, |a| s.start >= a))
                    .map(|s| (pid, s.start))
            })
            .collect();
        members.sort_unstable();
        members
    }

    /// Sends `signal` to every member a scan finds, each through a pidfd checked to
    /// name the scanned process (same start time) after it was opened. The agent
    /// itself is signalled through `agent` (its pidfd from the spawn) when given,
    /// and its process group as a whole only while `agent` proves the group leader
    /// unreaped (under the reap lock, so it cannot be reaped meanwhile). A SIGTERM is
    /// followed by SIGCONT. Returns the number of processes signalled.
    pub fn signal_verified(&self, signal: Signal, agent: Option<&PidFd>) -> usize {
        self.signal_scanned(&self.scan(), signal, agent)
    }

    /// The signalling half of [`TaskTree::signal_verified`], for members a scan found.
    pub(crate) fn signal_scanned(
        &self,
        members: &[(u32, u64)],
        signal: Signal,
        agent: Option<&PidFd>,
    ) -> usize {
        let pids: Vec<u32> = members.iter().map(|(pid, _)| *pid).collect();
        let fds = open_verified(&pids, |opened| {
            opened
                .iter()
                .copied()
                .filter(|pid| {
                    let start = members.iter().find(|(p, _)| p == pid).map(|(_, s)| *s);
                    read_stat(*pid).is_some_and(|s| Some(s.start) == start)
                })
                .collect()
        });
        let mut sigs = vec![signal];
        if signal == Signal::SIGTERM {
            sigs.push(Signal::SIGCONT);
        }
        for sig in sigs {
            if let Some(agent) = agent {
                let _guard = reap_lock();
                if agent.signal(sig).is_ok() {
                    // The leader is unreaped, so its pid is its group's and nobody else's.
                    let _ = killpg(Pid::from_raw(agent.pid() as i32), sig);
                }
            }
            for fd in &fds {
                let _ = fd.signal(sig);
            }
        }
        fds.len()
    }

    /// Sends `signal` to every process of the task. `agent_unreaped` says whether the
    /// agent's pid is still ours (alive or a zombie not yet reaped): only then is the
    /// process group signalled as a whole and are the agent's descendants and group
    /// members looked up, since a reaped pid may be reused. A SIGTERM
    /// is followed by SIGCONT, so a stopped process can act on it. Returns how many
    /// processes were signalled one by one.
    pub fn signal(&self, signal: Signal, agent_unreaped: bool) -> usize {
        self.send(signal, agent_unreaped, agent_unreaped)
    }

    /// [`TaskTree::signal`], with the group signalled as a whole only if `killpg_too`.
    fn send(&self, signal: Signal, killpg_too: bool, agent_unreaped: bool) -> usize {
        let send = |sig: Signal, members: &[u32]| {
            if killpg_too {
                let _ = killpg(Pid::from_raw(self.agent_pid as i32), sig);
            }
            for &pid in members {
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
        };
        let members = self.find(agent_unreaped);
        send(signal, &members);
        if signal == Signal::SIGTERM {
            send(Signal::SIGCONT, &members);
        }
        members.len()
    }
}

impl TaskTree {
    /// SIGKILLs the task's processes until none is left, scanning again after each
    /// round: a process that forks while it is being killed can put a child out of
    /// the first round's reach. Gives up after `max_rounds` and returns what is left.
    pub fn kill_all(&self, agent_unreaped: bool, max_rounds: u32) -> Vec<u32> {
        for round in 0..max_rounds {
            if self.send(
                Signal::SIGKILL,
                agent_unreaped && round == 0,
                agent_unreaped,
            ) == 0
            {
                return Vec::new();
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.find(agent_unreaped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_of_self_parses() {
        let stat = read_stat(std::process::id()).unwrap();
        assert!(!stat.zombie && !stat.exiting);
        assert_eq!(stat.ppid, std::os::unix::process::parent_id());
        let parent = read_stat(stat.ppid).unwrap();
        assert!(
            stat.start >= parent.start && stat.start > 0,
            "{stat:?} {parent:?}"
        );
    }

    #[test]
    fn a_process_at_the_agents_pid_with_another_start_time_is_not_the_agent() {
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Kill(
            std::process::Command::new("sleep")
                .arg("300")
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        let start = read_stat(pid).unwrap().start;
        let tree = TaskTree::new(pid, "t-reuse");
        assert_eq!(
            tree.clone().with_agent_start(Some(start)).members(),
            vec![pid]
        );
        // As if the agent had been reaped and `sleep` had been given its pid later.
        assert_eq!(
            tree.clone().with_agent_start(Some(start - 1)).members(),
            Vec::<u32>::new()
        );
        let none = tree
            .with_agent_start(Some(start - 1))
            .signal_verified(Signal::SIGTERM, None);
        assert_eq!(none, 0);
        assert!(process_exists(pid), "a stranger was signalled");
    }

    #[test]
    fn process_exists_for_self_and_not_for_a_free_pid() {
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(u32::MAX / 2));
    }
}
