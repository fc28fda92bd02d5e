//! The thread the control connections run on: a current-thread tokio runtime of
//! their own, beside the supervisor loop's.
//!
//! Accepting, reading and parsing request lines, answering `hello`, `ping` and
//! `status` (from the loop's snapshot), the outboxes' writers and the [`Relay`]
//! (the store's acknowledgements) run here; the loop's thread keeps the requests,
//! the agents, the timers and the reaper. Under a flood of sends a `status` then
//! waits for this thread only, not behind the loop's burst of requests.
//!
//! The thread is started from `main` after SIGCHLD was blocked, so it inherits the
//! mask like every other thread of agentd (SIGCHLD is read from a signalfd on the
//! loop's runtime).
//!
//! [`Relay`]: crate::replier::Relay

use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The connections' thread and runtime; dropped, it stops the runtime (its tasks
/// are dropped: unanswered requests answer `shutting_down` into outboxes no one
/// writes any more) and joins the thread.
pub struct ConnectionThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The thread's name (`/proc/PID/task/TID/comm`: the benchmarks split CPU by it).
pub const THREAD_NAME: &str = "agentd-conn";

impl ConnectionThread {
    pub fn start() -> std::io::Result<ConnectionThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(ConnectionThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where connection tasks are spawned (and the socket bound, so that its
    /// listener is in this runtime's reactor).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for ConnectionThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
