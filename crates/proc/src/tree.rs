//! Finding and signalling a task's process tree.
//!
//! A task's processes are: its agent's process group; every descendant of the agent
//! (found through parent links, so a tool that called `setsid` or `setpgid` is still
//! found while its ancestors live); and every process whose environment carries the
//! task's `AGENTD_TASK_ID` (orphans that double-forked away and were re-parented to
//! agentd, the subreaper). A process that both left the tree and scrubbed its
//! environment is out of reach; a cgroup per task would close that gap.

use std::collections::{HashMap, HashSet};
use std::fs;

use agentd_proto::ipc::ENV_TASK_ID;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// The processes of one task, identified by its agent and its task id.
#[derive(Debug, Clone)]
pub struct TaskTree {
    /// The agent's pid, which is also its process group id.
    pub agent_pid: u32,
    pub task_id: String,
}

#[derive(Debug, Clone, Copy)]
struct Stat {
    ppid: u32,
    pgid: u32,
    zombie: bool,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    Some(Stat {
        ppid,
        pgid,
        zombie: state == "Z" || state == "X",
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

fn carries_marker(pid: u32, marker: &[u8]) -> bool {
    match fs::read(format!("/proc/{pid}/environ")) {
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
        }
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
        let procs = all_processes();
        let me = std::process::id();
        let marker = format!("{ENV_TASK_ID}={}", self.task_id).into_bytes();

        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&pid, stat) in &procs {
            children.entry(stat.ppid).or_default().push(pid);
        }
        let mut found: HashSet<u32> = HashSet::new();
        if through_agent {
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
        for &pid in procs.keys() {
            if pid != me && !found.contains(&pid) && carries_marker(pid, &marker) {
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
        found.remove(&me);
        let mut members: Vec<u32> = found
            .into_iter()
            .filter(|pid| procs.get(pid).is_some_and(|s| !s.zombie))
            .collect();
        members.sort_unstable();
        members
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
        assert!(!stat.zombie);
        assert_eq!(stat.ppid, std::os::unix::process::parent_id());
    }

    #[test]
    fn process_exists_for_self_and_not_for_a_free_pid() {
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(u32::MAX / 2));
    }
}
