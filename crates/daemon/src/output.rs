//! Agents' output (their stdout and stderr, and their tools') into the per-task log,
//! capped (see [`agentd_store::TaskLog`]). [`agentd_proc::Procs::spawn`] with
//! `capture_output` hands agentd the read end of the agent's output pipe; one pump
//! thread for all agents (`agentd-log`, off the event loop, started with the first
//! agent) copies what arrives into each capped log until every writer has closed its
//! pipe. No thread is made per agent. The loop registers a new pipe in the pump's
//! poller itself (an `epoll_ctl` on the pump's epoll, which is safe while the pump
//! waits in it), so a new agent does not wake the pump: a task whose agent says
//! nothing costs the pump one wake-up, at the pipe's end. The progress lines the agent reports over IPC are appended to the same
//! log by the loop, through the [`TaskOutput`] it keeps.
//!
//! The log file is made only once there is something to keep, so an agent that says
//! nothing leaves no log. It is finished (the closing "not kept" line of a truncated
//! log) once both the pipe is at its end and the loop has let go of its
//! [`TaskOutput`]; until then the task is in [`Pumps`] (its log may still grow).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use agentd_core::TaskId;
use agentd_store::TaskLog;

/// Tasks whose log may still grow.
pub(crate) type Pumps = Arc<Mutex<HashSet<TaskId>>>;

/// One task's log, shared by its pump (on the pump thread) and the loop.
struct Shared {
    state_dir: PathBuf,
    task_id: TaskId,
    cap: u64,
    /// Opened at the first byte kept.
    log: Option<TaskLog>,
    /// A write failed (a full disk): the rest is read and discarded, so the agent
    /// never meets a closed pipe.
    failed: bool,
    /// Sides still open: the pipe's pump and the loop's [`TaskOutput`].
    open: u8,
    pumps: Pumps,
}

impl Shared {
    fn append(&mut self, bytes: &[u8]) {
        if self.failed || bytes.is_empty() {
            return;
        }
        let result = match &mut self.log {
            Some(log) => log.append(bytes),
            None => TaskLog::open(&self.state_dir, self.task_id, self.cap).and_then(|log| {
                let log = self.log.insert(log);
                log.append(bytes)
            }),
        };
        if let Err(e) = result {
            tracing::warn!(task_id = %self.task_id, "task log: {e}; the rest of its output is not kept");
            self.failed = true;
        }
    }

    /// One side is done; the last one finishes the log.
    fn close_one(&mut self) {
        self.open = self.open.saturating_sub(1);
        if self.open > 0 {
            return;
        }
        if let Some(log) = self.log.take() {
            if let Err(e) = log.finish() {
                tracing::warn!(task_id = %self.task_id, "task log: {e}");
            }
        }
        lock(&self.pumps).remove(&self.task_id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The loop's hold on a live agent's log: progress lines go in through it; dropping
/// it (once the agent is reaped) lets the log finish.
pub(crate) struct TaskOutput {
    shared: Arc<Mutex<Shared>>,
}

impl TaskOutput {
    /// Appends a progress line. The lock is held by the pump only while it appends
    /// one read (at most 64 KiB to a local file).
    pub(crate) fn write_line(&self, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        lock(&self.shared).append(&bytes);
    }
}

impl Drop for TaskOutput {
    fn drop(&mut self) {
        lock(&self.shared).close_one();
    }
}

/// Starts keeping task `task_id`'s log: a pump for `output` (the read end of
/// the agent's stdout and stderr, if it has one), and the loop's [`TaskOutput`].
pub(crate) fn start(
    output: Option<File>,
    state_dir: PathBuf,
    task_id: TaskId,
    cap: u64,
    pumps: Pumps,
) -> TaskOutput {
    lock(&pumps).insert(task_id);
    let shared = Arc::new(Mutex::new(Shared {
        state_dir,
        task_id,
        cap,
        log: None,
        failed: false,
        open: 1,
        pumps,
    }));
    if let Some(output) = output {
        match pump() {
            Some(pump) => {
                lock(&shared).open += 1;
                if let Err(e) = pump.add(output, shared.clone()) {
                    // The pipe's read end is dropped: the agent's writes fail (EPIPE);
                    // its output is lost, nothing else.
                    tracing::warn!(%task_id, "task log: cannot watch the agent's output: {e}");
                    lock(&shared).close_one();
                }
            }
            None => drop(output),
        }
    }
    TaskOutput { shared }
}

/// The pump thread's poller and the pipes it watches, shared with the loop.
struct Pump {
    registry: Registry,
    pipes: Mutex<HashMap<usize, Arc<Pipe>>>,
    next: AtomicUsize,
}

/// One agent's output pipe (non-blocking read end) and the log it goes into.
struct Pipe {
    file: File,
    shared: Arc<Mutex<Shared>>,
}

/// Bytes read at a time; also what one pipe may take per turn before the others.
const CHUNK: usize = 64 * 1024;
const CHUNKS_PER_TURN: usize = 16;

impl Pump {
    /// Watches `output` (on the calling thread: the pump is not woken for it).
    fn add(&self, output: File, shared: Arc<Mutex<Shared>>) -> io::Result<()> {
        set_nonblocking(&output)?;
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let fd = output.as_raw_fd();
        // In the table before the poller can report it.
        lock(&self.pipes).insert(
            token,
            Arc::new(Pipe {
                file: output,
                shared,
            }),
        );
        if let Err(e) = self
            .registry
            .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
        {
            lock(&self.pipes).remove(&token);
            return Err(e);
        }
        Ok(())
    }

    /// The pump thread: copies each readable pipe into its log until its end. The
    /// log's file writes are made right here: a slow disk delays the logs, never the
    /// loop.
    fn run(&self, mut poll: Poll) {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; CHUNK];
        // Pipes that had more to read when their turn ended (edge-triggered: no new
        // event comes for what is already there).
        let mut again: Vec<usize> = Vec::new();
        loop {
            let timeout = (!again.is_empty()).then_some(std::time::Duration::ZERO);
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("task logs: the pump cannot wait for output: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            let mut ready: Vec<usize> = std::mem::take(&mut again);
            ready.extend(events.iter().map(|e| e.token().0));
            ready.sort_unstable();
            ready.dedup();
            for token in ready {
                let Some(pipe) = lock(&self.pipes).get(&token).cloned() else {
                    continue;
                };
                match self.drain(&pipe, &mut buf) {
                    Drained::Blocked => {}
                    Drained::More => again.push(token),
                    Drained::End(error) => {
                        if let Some(e) = error {
                            let task_id = lock(&pipe.shared).task_id;
                            tracing::warn!(%task_id, "task log: cannot read the agent's output: {e}");
                        }
                        let fd = pipe.file.as_raw_fd();
                        let _ = self.registry.deregister(&mut SourceFd(&fd));
                        lock(&self.pipes).remove(&token);
                        lock(&pipe.shared).close_one();
                    }
                }
            }
        }
    }

    /// Reads one turn's worth of `pipe` into its log.
    fn drain(&self, pipe: &Pipe, buf: &mut [u8]) -> Drained {
        for _ in 0..CHUNKS_PER_TURN {
            match (&pipe.file).read(buf) {
                Ok(0) => return Drained::End(None),
                Ok(n) => lock(&pipe.shared).append(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Drained::End(Some(e)),
            }
        }
        Drained::More
    }
}

enum Drained {
    /// Everything there was is read.
    Blocked,
    /// The turn ended with more to read.
    More,
    /// Every writer closed the pipe (or reading failed).
    End(Option<io::Error>),
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pump, its thread started at the first call; `None` (logged once) if it cannot
/// be started.
fn pump() -> Option<&'static Pump> {
    static PUMP: OnceLock<Option<Arc<Pump>>> = OnceLock::new();
    PUMP.get_or_init(|| {
        let started = Poll::new().and_then(|poll| {
            let pump = Arc::new(Pump {
                registry: poll.registry().try_clone()?,
                pipes: Mutex::new(HashMap::new()),
                next: AtomicUsize::new(0),
            });
            let theirs = Arc::clone(&pump);
            std::thread::Builder::new()
                .name("agentd-log".into())
                .spawn(move || theirs.run(poll))
                .map(|_| pump)
        });
        match started {
            Ok(pump) => Some(pump),
            Err(e) => {
                tracing::warn!("cannot start the log thread: {e}; agents' output is not kept");
                None
            }
        }
    })
    .as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn wait_done(pumps: &Pumps, id: TaskId) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while lock(pumps).contains(&id) {
            assert!(
                std::time::Instant::now() < deadline,
                "the log never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (File::from(r), File::from(w))
    }

    #[test]
    fn output_and_progress_lines_share_one_capped_log() {
        let dir = tempfile::tempdir().unwrap();
        let id = TaskId::now_v7();
        let pumps = Pumps::default();
        let (r, mut w) = pipe();
        let out = start(Some(r), dir.path().to_path_buf(), id, 1000, pumps.clone());
        out.write_line("progress one");
        w.write_all(&vec![b'x'; 5000]).unwrap();
        drop(w);
        // The pipe ended, but the loop still holds the log: it may still grow.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(lock(&pumps).contains(&id));
        drop(out);
        wait_done(&pumps, id);
        let log = std::fs::read_to_string(agentd_store::output::log_path(dir.path(), id)).unwrap();
        assert!(log.starts_with("progress one\nxxx"), "{log}");
        assert!(log.contains(&agentd_store::output::truncation_marker(1000)));
        assert!(
            log.ends_with(&agentd_store::output::dropped_line(5013 - 1000)),
            "{log}"
        );
    }

    #[test]
    fn an_agent_that_says_nothing_leaves_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let id = TaskId::now_v7();
        let pumps = Pumps::default();
        let (r, w) = pipe();
        let out = start(Some(r), dir.path().to_path_buf(), id, 1000, pumps.clone());
        drop(w);
        drop(out);
        wait_done(&pumps, id);
        assert!(!agentd_store::output::log_path(dir.path(), id).exists());
    }

    /// Many agents at once share the one pump thread, and each log gets its own
    /// agent's output.
    #[test]
    fn one_pump_thread_serves_every_agent() {
        let dir = tempfile::tempdir().unwrap();
        let pumps = Pumps::default();
        let mut open = Vec::new();
        for i in 0..20 {
            let id = TaskId::now_v7();
            let (r, w) = pipe();
            let out = start(Some(r), dir.path().to_path_buf(), id, 1000, pumps.clone());
            open.push((id, w, out, format!("agent {i}\n")));
        }
        let pump_threads = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|name| name.trim() == "agentd-log")
            })
            .count();
        assert_eq!(pump_threads, 1, "one pump thread for 20 agents");
        for (id, mut w, out, text) in open {
            w.write_all(text.as_bytes()).unwrap();
            drop(w);
            drop(out);
            wait_done(&pumps, id);
            let log =
                std::fs::read_to_string(agentd_store::output::log_path(dir.path(), id)).unwrap();
            assert_eq!(log, text);
        }
    }

    /// A log that cannot be written does not close the pipe: everything is still read.
    #[test]
    fn an_unwritable_log_still_drains_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("state");
        std::fs::write(&blocker, b"not a directory").unwrap();
        let id = TaskId::now_v7();
        let pumps = Pumps::default();
        let (r, mut w) = pipe();
        let out = start(Some(r), blocker, id, 1000, pumps.clone());
        // Far more than a pipe buffer: blocks forever unless the pump keeps reading.
        w.write_all(&vec![b'x'; 1 << 20]).unwrap();
        drop(w);
        drop(out);
        wait_done(&pumps, id);
    }
}
