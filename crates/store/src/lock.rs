//! The single-instance lock: an exclusive `flock` on `agentd.lock` in the state dir,
//! taken before the socket or the store is touched and held for the life of the
//! process (the kernel releases it when agentd exits, however it exits).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Name of the lock file in the state dir.
pub const LOCK_FILE: &str = "agentd.lock";

/// Exit code of an agentd that found another agentd holding its state dir
/// (`EX_TEMPFAIL` from sysexits.h: try again once the other one has stopped).
pub const EXIT_ALREADY_RUNNING: u8 = 75;

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another agentd{} is already using the state dir {}", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), .dir.display())]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The held lock. Dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock on `state_dir` (which must exist) without waiting, and writes
    /// this process's pid into the lock file for the message another agentd prints.
    pub fn acquire(state_dir: &Path) -> Result<InstanceLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: state_dir.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err((_, errno)) => return Err(io_err(errno.into())),
        };
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(InstanceLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holders_pid_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = InstanceLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open in the
        // same process conflicts just as another process would.
        match InstanceLock::acquire(dir.path()) {
            Err(LockError::Held { pid, dir: d }) => {
                assert_eq!(pid, Some(std::process::id()));
                assert_eq!(d, dir.path());
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(held);
        InstanceLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn held_by_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK_FILE);
        std::fs::write(&lock, "").unwrap();
        // A shell that takes the lock with flock(1) and then becomes `sleep`, so the
        // holder is one process that the test kills by pid.
        let mut child = match std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"exec 9>>"$0" && flock -x 9 && exec sleep 60"#)
            .arg(&lock)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("cannot run sh: {e}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match InstanceLock::acquire(dir.path()) {
                Err(LockError::Held { .. }) => break,
                Ok(l) => {
                    drop(l);
                    assert!(
                        std::time::Instant::now() < deadline,
                        "flock(1) never took the lock"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        InstanceLock::acquire(dir.path()).unwrap();
    }
}
