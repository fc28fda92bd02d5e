//! Reaping. **Invariant:** [`reap_children`] is the only `wait` in agentd. Nothing else
//! (no `std::process::Child::wait`, no `tokio::process`) waits for a child, so no exit
//! is ever stolen. Because agentd is a subreaper, this also reaps orphaned
//! descendants of agents, which come back to agentd when their parent dies.
//!
//! The one exception is the spawn's own child whose exec failed: it never became an
//! agent, and the spawn reaps it by its pid before returning the error (holding
//! [`REAP_LOCK`] from the clone on, so no other thread can have reaped it first).
//!
//! **PID safety:** [`reap_children`] holds [`REAP_LOCK`] while it waits. A
//! process-group signal holds it while it checks that the group leader is still
//! unreaped, so no pid is reaped (and freed for reuse) between "it is ours" and
//! "signal it", whatever thread each of these runs on. The agent's pidfd needs no
//! lock: it comes from the clone itself.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::sync::{Mutex, MutexGuard};

/// Held by whoever must know that no child is reaped meanwhile (see the module doc).
pub(crate) static REAP_LOCK: Mutex<()> = Mutex::new(());

/// Takes [`REAP_LOCK`]; a panic elsewhere while holding it does not poison reaping.
pub(crate) fn reap_lock() -> MutexGuard<'static, ()> {
    REAP_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A child that was reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: u32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Reaps every child that has exited, without blocking.
pub fn reap_children() -> Vec<Reaped> {
    let mut reaped = Vec::new();
    let _guard = reap_lock();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => reaped.push(Reaped {
                pid: pid.as_raw() as u32,
                code: Some(code),
                signal: None,
            }),
            Ok(WaitStatus::Signaled(pid, sig, _)) => reaped.push(Reaped {
                pid: pid.as_raw() as u32,
                code: None,
                signal: Some(sig as i32),
            }),
            Ok(WaitStatus::StillAlive) => break,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            // ECHILD: no children at all.
            Err(_) => break,
        }
    }
    reaped
}

/// Makes orphaned descendants of our children re-parent to us instead of init.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}
