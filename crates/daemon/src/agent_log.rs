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
/// `cap` bytes plus the truncation lines. Returns at the end of `input`.
pub fn copy_capped(mut input: impl Read, path: &std::path::Path, cap: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut file: Option<File> = None;
    let mut written: u64 = 0;
    let mut dropped: u64 = 0;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if dropped > 0 {
            dropped += n as u64;
            continue;
        }
        let f = match &mut file {
            Some(f) => f,
            None => file.insert(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)?,
            ),
        };
        let room = cap.saturating_sub(written);
        let keep = (n as u64).min(room) as usize;
        f.write_all(&buf[..keep])?;
        written += keep as u64;
        if keep < n {
            dropped = (n - keep) as u64;
            f.write_all(text::log_truncated(cap).as_bytes())?;
        }
    }
    if let Some(f) = &mut file {
        if dropped > 0 {
            f.write_all(text::log_dropped(dropped).as_bytes())?;
        }
    }
    Ok(())
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
