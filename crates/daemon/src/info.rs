//! What the control connections answer without a trip through the supervisor loop:
//! agentd's pid and uptime (`hello`, `ping`) and the `status` snapshot the loop keeps
//! current.
//!
//! **Invariant:** the snapshot is what the loop would answer. The loop refreshes it
//! at the end of every step, before it awaits anything, so nothing a client can read
//! (an answer, an event) is newer than the snapshot; and a connection that has a
//! request on its way to the loop ([`Handed`]) sends its `status` through the loop,
//! behind that request, so a `status` pipelined after a `send` counts it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agentd_proto::control::{Capacity, StatusReply};

/// Facts the connections answer without asking the supervisor: `hello`, `ping`,
/// and `status` (without a task id) from the supervisor's snapshot.
#[derive(Debug)]
pub struct ServerInfo {
    pub started: Instant,
    /// agentd's pid (read once: `ping` and `status` need no `getpid` each).
    pub pid: u32,
    /// What `status` answers, kept current by the supervisor loop at the end of
    /// every step (before it awaits anything), so a connection can answer `status`
    /// without a trip through the loop: it then never waits behind other clients'
    /// work in the loop's request queue. `None` until the loop's first step.
    status: Mutex<Option<StatusSnapshot>>,
}

/// The parts of a [`StatusReply`] that change with every message (the counts) and
/// the rest, which changes only with the active tasks (shared, not rebuilt per
/// message).
#[derive(Debug, Clone)]
pub struct StatusSnapshot {
    pub capacity: Capacity,
    pub queued: u32,
    pub sessions: u32,
    /// Everything else (its counts and `uptime_ms` are overwritten when answered).
    pub rest: Arc<StatusReply>,
}

impl ServerInfo {
    pub fn new() -> ServerInfo {
        ServerInfo {
            started: Instant::now(),
            pid: std::process::id(),
            status: Mutex::new(None),
        }
    }

    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Replaces the status snapshot (the supervisor loop only).
    pub fn set_status(&self, snapshot: StatusSnapshot) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
    }

    /// Sets the latest progress of active task `task_id` in the snapshot (in place
    /// unless a connection is copying the snapshot right now); false if the snapshot
    /// does not show that task.
    pub fn set_status_progress(&self, task_id: &str, progress: Option<&String>) -> bool {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let Some(snapshot) = status.as_mut() else {
            return false;
        };
        let Some(i) = snapshot
            .rest
            .active
            .iter()
            .position(|t| t.task_id == task_id)
        else {
            return false;
        };
        Arc::make_mut(&mut snapshot.rest).active[i].progress = progress.cloned();
        true
    }

    /// Updates the snapshot's counts; false if there is no snapshot yet.
    pub fn set_status_counts(&self, capacity: Capacity, queued: u32, sessions: u32) -> bool {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let Some(snapshot) = status.as_mut() else {
            return false;
        };
        snapshot.capacity = capacity;
        snapshot.queued = queued;
        snapshot.sessions = sessions;
        true
    }

    /// The `status` answer as of the loop's last step.
    pub fn status(&self) -> Option<StatusReply> {
        let snapshot = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let mut reply = StatusReply::clone(&snapshot.rest);
        reply.capacity = snapshot.capacity;
        reply.queued = snapshot.queued;
        reply.sessions = snapshot.sessions;
        reply.uptime_ms = self.uptime_ms();
        Some(reply)
    }
}

impl Default for ServerInfo {
    fn default() -> ServerInfo {
        ServerInfo::new()
    }
}

/// A request of one connection that the supervisor has not handled yet. While a
/// connection has one, its `status` goes through the loop too (behind it), so a
/// `status` pipelined after a `send` still sees that send.
#[derive(Debug)]
pub struct Handed(Arc<AtomicUsize>);

impl Handed {
    pub fn new(count: &Arc<AtomicUsize>) -> Handed {
        count.fetch_add(1, Ordering::SeqCst);
        Handed(count.clone())
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
