//! An agent's own stdout and stderr, kept in `logs/<task id>.log` up to a cap.
//!
//! The agent writes into a pipe; one thread per agent (off the event loop) copies
//! the first `cap` bytes into the log, then writes a truncation marker once and only
//! counts (and discards) the rest, so an agent that prints gigabytes neither fills the
//! disk nor blocks on a full pipe. At the end of the output a closing line says how
//! much was not kept. An agent that prints nothing leaves no log file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use agentd_proto::text;

/// Starts copying `output` into the log at `path`.
pub fn start(output: File, path: PathBuf, cap: u64) {
    let spawned = std::thread::Builder::new()
        .name("agent-log".into())
        .spawn(move || {
            if let Err(e) = copy_capped(output, &path, cap) {
                tracing::warn!("agent log {}: {e}", path.display());
            }
        });
    if let Err(e) = spawned {
        // Without the thread the pipe closes, and the agent's writes fail (EPIPE):
        // its output is lost, nothing else.
        tracing::warn!("cannot start the agent log thread: {e}");
    }
}

/// Copies `input` to the file at `path` (created at the first byte), keeping at most
/// `cap` bytes plus the truncation lines. Returns at the end of `input`. A log that
/// cannot be written (a full disk) does not stop the copy: the rest is read and
/// discarded, so the agent never meets a closed pipe; the error is returned at the end.
pub fn copy_capped(mut input: impl Read, path: &std::path::Path, cap: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut log = Log {
        path,
        cap,
        file: None,
        written: 0,
        dropped: 0,
        failed: None,
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if log.failed.is_none() {
            if let Err(e) = log.append(&buf[..n]) {
                log.failed = Some(e);
            }
        }
    }
    if log.failed.is_none() && log.dropped > 0 {
        if let Some(f) = &mut log.file {
            f.write_all(text::log_dropped(log.dropped).as_bytes())?;
        }
    }
    match log.failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct Log<'a> {
    path: &'a std::path::Path,
    cap: u64,
    file: Option<File>,
    written: u64,
    dropped: u64,
    failed: Option<io::Error>,
}

impl Log<'_> {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.dropped > 0 {
            self.dropped += bytes.len() as u64;
            return Ok(());
        }
        let f = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(self.path)?,
            ),
        };
        let room = self.cap.saturating_sub(self.written);
        let keep = (bytes.len() as u64).min(room) as usize;
        f.write_all(&bytes[..keep])?;
        self.written += keep as u64;
        if keep < bytes.len() {
            self.dropped = (bytes.len() - keep) as u64;
            f.write_all(text::log_truncated(self.cap).as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_cap_bytes_and_says_how_much_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.log");
        let input = vec![b'x'; 100_000];
        copy_capped(&input[..], &path, 1000).unwrap();
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.starts_with(&"x".repeat(1000)));
        assert!(!log.starts_with(&"x".repeat(1001)));
        assert!(log.contains(&text::log_truncated(1000)));
        assert!(log.ends_with(&text::log_dropped(99_000)));
    }

    /// A log that cannot be written does not close the pipe: everything is still read.
    #[test]
    fn an_unwritable_log_still_drains_its_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("t.log");
        let input = vec![b'x'; 300_000];
        let mut reader = &input[..];
        assert!(copy_capped(&mut reader, &path, 1000).is_err());
        assert!(reader.is_empty(), "{} bytes left unread", reader.len());
    }

    #[test]
    fn output_under_the_cap_is_kept_whole_and_no_output_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.log");
        copy_capped(&b"hello\n"[..], &path, 1000).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\n");
        let empty = dir.path().join("e.log");
        copy_capped(&b""[..], &empty, 1000).unwrap();
        assert!(!empty.exists());
    }
}
