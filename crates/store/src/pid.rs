//! Pid trust: a pid written to disk names a process again only while its start time
//! (field 22 of `/proc/PID/stat`, clock ticks since boot) and the boot id
//! (`/proc/sys/kernel/random/boot_id`) both still match. A pid that the kernel has
//! handed to another process, or any pid from an earlier boot, is never trusted.

use std::fs;
use std::io;

/// Where the kernel publishes the id of the current boot.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// A process as it can be recognised later: its pid, when it started, and in which boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: start time in clock ticks since boot.
    pub start_time: u64,
    /// `/proc/sys/kernel/random/boot_id` when the identity was taken.
    pub boot_id: String,
}

/// What became of a recorded process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The same process is still there (same pid, start time and boot): it may be signalled.
    Same,
    /// No process has that pid now.
    Gone,
    /// The pid exists but belongs to another process (reused, or another boot): never
    /// signal it.
    Reused,
}

impl ProcessIdentity {
    /// The identity of the running process `pid`, read from `/proc`.
    pub fn capture(pid: u32) -> io::Result<ProcessIdentity> {
        ProcessIdentity::started(pid, start_time(pid)?)
    }

    /// The identity of the running process `pid` whose start time the caller has just
    /// read (the spawn does), in this boot.
    pub fn started(pid: u32, start_time: u64) -> io::Result<ProcessIdentity> {
        Ok(ProcessIdentity {
            pid,
            start_time,
            boot_id: this_boot_id()?,
        })
    }

    /// Whether `pid` is still the process this identity was taken from.
    pub fn check(&self) -> Liveness {
        match boot_id() {
            Ok(current) if current == self.boot_id => {}
            // Another boot (or no way to tell): whatever has this pid now is not ours.
            _ => {
                return if process_exists(self.pid) {
                    Liveness::Reused
                } else {
                    Liveness::Gone
                }
            }
        }
        match start_time(self.pid) {
            Ok(t) if t == self.start_time => Liveness::Same,
            Ok(_) => Liveness::Reused,
            Err(_) if process_exists(self.pid) => Liveness::Reused,
            Err(_) => Liveness::Gone,
        }
    }
}

fn process_exists(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}")).is_ok()
}

/// The boot id this process runs in (it cannot change while the process runs), read
/// once.
fn this_boot_id() -> io::Result<String> {
    static THIS_BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(id) = THIS_BOOT.get() {
        return Ok(id.clone());
    }
    let id = boot_id()?;
    Ok(THIS_BOOT.get_or_init(|| id).clone())
}

/// The current boot id, without its trailing newline.
pub fn boot_id() -> io::Result<String> {
    Ok(fs::read_to_string(BOOT_ID_PATH)?.trim().to_string())
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot).
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat format"),
        )
    })
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) is in parentheses
/// and may itself hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the command come field 3 (state) onwards: field 22 is the 20th of them.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_field_22_past_a_hostile_command_name() {
        let fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        let stat = format!("1234 (a) b (c) {}\n", fields.join(" "));
        assert_eq!(parse_start_time(&stat), Some(22));
        assert_eq!(parse_start_time("1 (x) S 1 2"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_process_is_same_and_a_changed_identity_is_not() {
        let me = ProcessIdentity::capture(std::process::id()).unwrap();
        assert_eq!(me.check(), Liveness::Same);
        let reused = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert_eq!(reused.check(), Liveness::Reused);
        let other_boot = ProcessIdentity {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..me.clone()
        };
        assert_eq!(other_boot.check(), Liveness::Reused);
    }

    #[test]
    fn a_reaped_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessIdentity::capture(child.id()).unwrap();
        child.wait().unwrap();
        // The pid may be reused by now, but never with the same start time.
        assert_ne!(id.check(), Liveness::Same);
    }
}
