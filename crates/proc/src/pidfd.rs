//! Process file descriptors: a handle on one process that can never refer to another.
//!
//! A pid number is reused once its process is reaped; a pidfd is not. A signal sent
//! through a pidfd reaches the process it was opened for or fails with `ESRCH`, so
//! holding one removes the "signalled a reused pid" race. agentd gets the agent's
//! pidfd from the spawn itself (`CLONE_PIDFD`), and signals the agent only through it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::signal::Signal;

/// An open pidfd (close-on-exec).
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: u32,
}

impl PidFd {
    /// Opens a pidfd for `pid`. Only PID-safe if the caller knows `pid` still names the
    /// process it means: its own unreaped child, or a process whose identity it checks
    /// after opening (see [`PidFd::is_alive`]).
    pub fn open(pid: u32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us; we own it. pidfds are
        // always close-on-exec.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(PidFd { fd, pid })
    }

    /// A pidfd the kernel handed over for `pid` (`CLONE_PIDFD`).
    pub(crate) fn from_owned(fd: OwnedFd, pid: u32) -> PidFd {
        PidFd { fd, pid }
    }

    /// The pid the descriptor was opened for (informational: never signal it directly).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to the process. `Err(ESRCH)` once it has been reaped (a zombie
    /// still accepts signals and ignores them).
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        self.raw_signal(signal as i32)
    }

    /// True while the process exists (running, stopped or a zombie not yet reaped), that
    /// is, while its pid number cannot have been given to another process.
    pub fn is_alive(&self) -> bool {
        self.raw_signal(0).is_ok()
    }

    fn raw_signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a NULL siginfo and no flags behaves like kill(2)
        // on the process the descriptor refers to.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Opens pidfds for `pids`, then keeps only those that `still_ours` confirms *after*
/// the descriptors were opened and that are alive after that check. A process alive
/// after the check held its pid number during the check, so the check was about it and
/// not about a process that reused the number. This is how members found by reading
/// `/proc` or `cgroup.procs` (which may be stale by the time they are signalled) are
/// signalled without a pid race.
pub fn open_verified(pids: &[u32], still_ours: impl Fn(&[u32]) -> Vec<u32>) -> Vec<PidFd> {
    let opened: Vec<PidFd> = pids
        .iter()
        .filter_map(|&pid| PidFd::open(pid).ok())
        .collect();
    if opened.is_empty() {
        return opened;
    }
    let confirmed = still_ours(&opened.iter().map(PidFd::pid).collect::<Vec<_>>());
    opened
        .into_iter()
        .filter(|fd| confirmed.contains(&fd.pid) && fd.is_alive())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_through_its_pidfd() {
        let fd = PidFd::open(std::process::id()).unwrap();
        assert!(fd.is_alive());
        assert_eq!(fd.pid(), std::process::id());
    }

    #[test]
    fn a_free_pid_cannot_be_opened() {
        assert!(PidFd::open(u32::MAX / 2).is_err());
    }
}
