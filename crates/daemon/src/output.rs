//! Agents' output (their stdout and stderr, and their tools') into the per-task log,
//! capped (see [`agentd_store::TaskLog`]). The agent writes into a FIFO whose name
//! agentd removes once the agent has it open; a pump thread per agent copies what
//! arrives into the capped log until every writer has closed it.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agentd_core::TaskId;
use agentd_store::TaskLog;

/// Tasks whose output is still being copied.
pub(crate) type Pumps = Arc<Mutex<HashSet<TaskId>>>;

/// A FIFO for one agent's output, open for reading, and agentd's own write end
/// (for the progress lines the agent reports over IPC).
pub(crate) struct LogPipe {
    path: PathBuf,
    reader: File,
    writer: File,
}

impl LogPipe {
    /// Makes `logs/<id>.pipe` and opens its read end (without waiting for a writer).
    pub(crate) fn create(logs: &Path, task_id: TaskId) -> io::Result<LogPipe> {
        std::fs::create_dir_all(logs)?;
        let path = logs.join(format!("{task_id}.pipe"));
        let _ = std::fs::remove_file(&path);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)?;
        // With a reader open, this does not wait; writes never block the loop.
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)?;
        Ok(LogPipe {
            path,
            reader,
            writer,
        })
    }

    /// Where the agent's output goes (give it to the spawn).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The agent has its write end: removes the name and copies until EOF (every
    /// writer closed, including the returned one, agentd's).
    pub(crate) fn start(self, state_dir: PathBuf, task_id: TaskId, cap: u64, pumps: Pumps) -> File {
        let _ = std::fs::remove_file(&self.path);
        // Blocking reads from here on: the pump is its own thread.
        if let Ok(flags) = nix::fcntl::fcntl(&self.reader, nix::fcntl::FcntlArg::F_GETFL) {
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
            let _ = nix::fcntl::fcntl(&self.reader, nix::fcntl::FcntlArg::F_SETFL(flags));
        }
        pumps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(task_id);
        let mut reader = self.reader;
        let spawned = std::thread::Builder::new()
            .name("agentd-log".into())
            .spawn({
                let pumps = pumps.clone();
                move || {
                    if let Err(e) = pump(&mut reader, &state_dir, task_id, cap) {
                        tracing::warn!(%task_id, "task log: {e}");
                    }
                    pumps
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&task_id);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(%task_id, "cannot start the log thread: {e}");
            pumps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&task_id);
        }
        self.writer
    }
}

/// Copies until EOF; the log file is made only once there is output.
fn pump(reader: &mut File, state_dir: &Path, task_id: TaskId, cap: u64) -> io::Result<()> {
    let mut log: Option<TaskLog> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // No writer has opened it yet (cannot happen after the spawn).
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e),
        };
        let log = match &mut log {
            Some(log) => log,
            None => log.insert(TaskLog::open(state_dir, task_id, cap)?),
        };
        log.append(&buf[..n])?;
    }
    if let Some(log) = log {
        log.finish()?;
    }
    Ok(())
}

/// Appends a progress line to the task's log through agentd's write end. Never
/// blocks: a line that does not fit in the pipe now is left out of the log.
pub(crate) fn write_line(writer: &mut File, line: &str) {
    use std::io::Write;
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    if let Err(e) = writer.write_all(&bytes) {
        tracing::debug!("a progress line was left out of the task log: {e}");
    }
}
