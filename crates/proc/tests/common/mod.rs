//! Helpers shared by the containment tests: guards that kill what a test started and
//! remove the cgroups it made, even when an assertion fails.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentd_proc::{AgentCommand, CgroupOptions, Cgroups, PidFd, TreeReport};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub const UNIFIED: &str = "/sys/fs/cgroup/unified";

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cgroup v2 directory this test may use as a delegation point, removed on drop
/// with everything in it (processes killed first).
pub struct TestCgroupParent {
    pub path: PathBuf,
}

impl TestCgroupParent {
    /// `None` (and a note on stderr) where no writable cgroup v2 hierarchy exists.
    pub fn new(name: &str) -> Option<TestCgroupParent> {
        let base = Path::new(UNIFIED);
        let path = base.join(format!("agentd-proc-test-{}-{name}", std::process::id()));
        match fs::create_dir(&path) {
            Ok(()) => Some(TestCgroupParent { path }),
            Err(e) => {
                eprintln!("SKIPPED: cannot create {}: {e}", path.display());
                None
            }
        }
    }

    pub fn cgroups(&self, instance: &str) -> Cgroups {
        Cgroups::under(&self.path, &CgroupOptions::new(instance)).unwrap()
    }
}

impl Drop for TestCgroupParent {
    fn drop(&mut self) {
        kill_and_remove(&self.path);
    }
}

fn kill_and_remove(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                kill_and_remove(&entry.path());
            }
        }
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|e| e.contains("populated 1"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = fs::remove_dir(dir);
}

/// Processes a test started, killed on drop through pidfds opened while they were
/// known to be ours (reported by the process itself, alive).
#[derive(Default)]
pub struct ProcGuard {
    fds: Vec<PidFd>,
    children: Vec<u32>,
}

impl ProcGuard {
    pub fn watch(&mut self, pid: u32) {
        if let Ok(fd) = PidFd::open(pid) {
            self.fds.push(fd);
        }
    }

    /// A direct child of the test process: also reaped on drop.
    pub fn child(&mut self, pid: u32) {
        self.watch(pid);
        self.children.push(pid);
    }

    /// Reaps a child of the test: true once it was reaped now or before.
    pub fn try_reap(pid: u32) -> bool {
        !matches!(
            waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive)
        )
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        for fd in &self.fds {
            let _ = fd.signal(Signal::SIGKILL);
        }
        for &pid in &self.children {
            let _ = waitpid(Pid::from_raw(pid as i32), None);
        }
    }
}

/// Task id `name`, made this test process's own: the process-tree fallback finds a
/// task's orphans by the task id in their environment, and another run of the same
/// tests on the machine (another checkout, say) must not find ours, nor we theirs.
pub fn tid(name: &str) -> &'static str {
    Box::leak(format!("{name}-{}", std::process::id()).into_boxed_str())
}

pub fn command(task_id: &str, script: &str) -> AgentCommand {
    AgentCommand {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        task_id: task_id.into(),
        session: "s".into(),
        log_path: None,
        capture_output: false,
        env: Vec::new(),
    }
}

/// A tree with every kind of escapee, each reporting `<kind> <pid>` on the channel:
/// the agent, a `setsid` child, a double-forked child, and a double-forked
/// `setsid env -i` grandchild whose environment carries no task id.
pub const ESCAPEES: &str = r#"
    echo "agent $$" >&3
    setsid sh -c 'echo "setsid $$" >&3; exec sleep 300' &
    (sh -c 'echo "double $$" >&3; exec sleep 300' &)
    (setsid env -i sh -c 'echo "scrubbed $$" >&3; exec sleep 300' &)
    exec sleep 300
"#;

/// Reads `<kind> <pid>` lines from the channel until `kinds` are all seen.
pub fn read_pids(channel: UnixStream, kinds: &[&str]) -> Vec<(String, u32)> {
    channel
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut lines = BufReader::new(channel).lines();
    let mut seen: Vec<(String, u32)> = Vec::new();
    while !kinds.iter().all(|k| seen.iter().any(|(s, _)| s == k)) {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("channel closed; saw {seen:?}"))
            .unwrap();
        let (kind, pid) = line.split_once(' ').unwrap();
        seen.push((kind.to_owned(), pid.trim().parse().unwrap()));
    }
    seen
}

pub fn pid_of(pids: &[(String, u32)], kind: &str) -> u32 {
    pids.iter().find(|(k, _)| k == kind).unwrap().1
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces and
/// parentheses): the state first, then the parent pid.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The state letter of `pid` (`R`, `S`, `T` stopped, `Z` zombie…), while it exists.
pub fn state_of(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The parent of `pid`, while `pid` exists.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Whether `ancestor` is one of `pid`'s ancestors now.
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut pid = pid;
    while let Some(parent) = parent_of(pid) {
        if parent == ancestor {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

/// True while `pid` runs (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    agentd_proc::process_exists(pid)
}

pub fn cgroup_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned()
}

pub fn next_report(rx: &std::sync::mpsc::Receiver<TreeReport>) -> TreeReport {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the killer reported nothing")
}

/// The next `Empty` report, skipping `Signalled` ones.
pub fn next_empty(rx: &std::sync::mpsc::Receiver<TreeReport>) -> TreeReport {
    loop {
        let report = next_report(rx);
        if matches!(report, TreeReport::Empty { .. }) {
            return report;
        }
    }
}
