//! The guardian: a small process that outlives agentd, however agentd dies, and
//! then kills what is left in agentd's task cgroups.
//!
//! It is `/bin/sh` in a session and a cgroup of its own ([`crate::Cgroups::guardian_dir`],
//! entered before exec like an agent's), reading a pipe whose only writer is agentd
//! (close-on-exec, so no agent holds it). When agentd exits, even by SIGKILL,
//! the read ends: the guardian writes `cgroup.kill` of the instance directory (every
//! task cgroup below it dies at once), waits for `populated 0` (at most 5 s; each
//! look also SIGKILLs, with kill(2), a listed process whose main thread exited, which
//! `cgroup.kill` cannot reach), and
//! removes the empty task cgroups and the instance directory. The agents' own
//! parent-death signal and the EOF on their channels are the first line; the
//! guardian catches the descendants that detached. At the end it moves itself out of
//! its own cgroup (to agentd's leaf, else the delegation point) and removes it, so a
//! crash leaves no empty cgroup behind. A next agentd's
//! [`crate::Procs::start_guardian`] first waits until the old guardian's cgroup is
//! empty (so it cannot kill the new agentd's tasks) and starts the new guardian in
//! it; then [`crate::Procs::recover`] is the last line (e.g. if the guardian was
//! killed too), covered by the new guardian should agentd die meanwhile.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{self, SigSet, SigmaskHow};

use crate::cgroup::{mkdir_ok, wait_empty};

/// What the guardian runs: `$1` is the instance directory.
const SCRIPT: &str = r#"
while read -r _; do :; done
echo 1 > "$1/cgroup.kill" 2>/dev/null
i=0
while [ $i -lt 50 ] && grep -q '^populated 1' "$1/cgroup.events" 2>/dev/null; do
    # cgroup.kill signals a process through its main thread alone: one whose main
    # thread exited (a zombie while other threads run, and not reapable, so its pid
    # stays its own) takes kill(2), which signals the whole process.
    for f in "$1"/*/cgroup.procs; do
        while read -r p; do
            case $(cat "/proc/$p/stat" 2>/dev/null) in
                *") Z "*) kill -9 "$p" 2>/dev/null ;;
            esac
        done < "$f"
    done 2>/dev/null
    sleep 0.1; i=$((i+1))
done
for d in "$1"/*/; do [ -d "$d" ] && rmdir "$d" 2>/dev/null; done
rmdir "$1" 2>/dev/null
# Leave no empty cgroup behind: move out of our own (to agentd's leaf under the
# delegation point, else the delegation point itself), then remove it.
p=${1%/*}
for dst in "$p/agentd-daemon" "$p"; do
    [ -d "$dst" ] && echo $$ > "$dst/cgroup.procs" 2>/dev/null && break
done
rmdir "$1.guardian" 2>/dev/null
exit 0
"#;

/// agentd's end of the guardian's pipe. Dropping it (or agentd's death) sets the
/// guardian off; on a clean exit drop it only after every task has ended.
#[derive(Debug)]
pub struct Guardian {
    pid: u32,
    _pipe: OwnedFd,
}

impl Guardian {
    /// Starts a guardian for the instance directory `root`, inside the cgroup `dir`
    /// (created if needed).
    pub(crate) fn start(root: &Path, dir: &Path) -> io::Result<Guardian> {
        mkdir_ok(dir)?;
        let procs = File::options().write(true).open(dir.join("cgroup.procs"))?;
        let procs_fd = procs.as_raw_fd();
        if procs_fd <= 2 {
            return Err(io::Error::other(
                "cgroup.procs opened as a standard descriptor",
            ));
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", SCRIPT, "agentd-guardian"])
            .arg(root)
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let restore_thp = agentd_spawn::children_get_thp();
        // SAFETY: write, setsid, sigprocmask and prctl are async-signal-safe; nothing
        // is allocated.
        unsafe {
            command.pre_exec(move || {
                // A forked copy of agentd's memory: what it runs gets transparent huge
                // pages as agentd was started (agentd_spawn::disable_thp_for_this_process).
                if restore_thp {
                    libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
                }
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                // Its own session: a terminal's signals for agentd do not reach it.
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(procs);
        let pid = child.id();
        // The reaper collects it, like every child (it exits only after agentd).
        drop(child);
        Ok(Guardian { pid, _pipe: write })
    }

    /// The guardian's pid, so the reaper can tell it from an agent.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// Ends a guardian on a clean exit: closes its pipe and waits (bounded) until its
/// cgroup is empty, then removes that cgroup.
pub(crate) fn stop(guardian: Guardian, dir: &Path) {
    drop(guardian);
    if wait_empty(dir, Duration::from_secs(5)) {
        let _ = std::fs::remove_dir(dir);
    }
}
