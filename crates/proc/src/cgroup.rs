//! cgroup v2 containment: one cgroup per task, created before the agent runs.
//!
//! Layout, under the *delegation point* (the part of the cgroup v2 hierarchy agentd may
//! write):
//!
//! ```text
//! <delegation point>/            own cgroup (systemd Delegate=yes), or <mount>/agentd as root
//!   agentd-daemon/               agentd itself, when it had to leave its own cgroup
//!   <instance>/                  Cgroups::root(): one per agentd instance (one per socket)
//!     task-<task id>/            TaskCgroup: the agent and every descendant it ever has
//! ```
//!
//! The agent enters its task cgroup *in the spawned child, before exec* (it writes
//! itself into `cgroup.procs` through a descriptor opened by the parent), so every
//! process the agent starts is born inside it: `setsid`, double forks and scrubbed
//! environments change nothing. The tree is killed with `cgroup.kill` (atomic: no fork
//! can slip out), is empty when `cgroup.events` says `populated 0` (zombies do not
//! count), and the directory is removed after. Where the `pids` (or `memory`)
//! controller is delegated, each task gets `pids.max` (and `memory.max`), so a fork
//! bomb fails inside its own task.
//!
//! cgroup v2's no-internal-processes rule: a non-root cgroup that holds processes
//! cannot hand controllers to its children, so when agentd's own cgroup is the
//! delegation point agentd first moves itself into the `agentd-daemon` leaf. The
//! hierarchy root is exempt and agentd stays where it is.
//!
//! **Recovery:** an instance directory that already exists when agentd starts was left
//! by a previous agentd of the same instance that died (the daemon holds the socket
//! lock, so no other is running): [`Cgroups::recover`] kills what is left in it.
//!
//! This is containment against agents that wander off, not a security boundary: an
//! agent running as root can write itself into another cgroup.
//!
//! As root, agentd's own cgroup is writable even when nobody delegated it (a login
//! session's scope, a service without `Delegate=yes`); agentd then uses it all the
//! same, but systemd considers such a subtree its own and may rearrange it: run agentd
//! as a service with `Delegate=yes` to make the arrangement official.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How agentd's cgroups are set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupOptions {
    /// Names this agentd's directory under the delegation point. It must be stable for
    /// one socket (so the next agentd on that socket finds and recovers it) and differ
    /// between agentds that run at the same time. One path component of
    /// `[A-Za-z0-9._-]`.
    pub instance: String,
    /// `pids.max` of each task cgroup, applied where the `pids` controller is delegated.
    pub pids_max: Option<u64>,
    /// `memory.max` of each task cgroup in bytes, where `memory` is delegated.
    pub memory_max: Option<u64>,
}

impl CgroupOptions {
    /// Default limits: at most 4096 processes per task, no memory limit.
    pub fn new(instance: impl Into<String>) -> CgroupOptions {
        CgroupOptions {
            instance: instance.into(),
            pids_max: Some(4096),
            memory_max: None,
        }
    }

    /// Options whose instance name is derived from the control socket's path and the
    /// user (`agentd-<uid>-<hash>`): stable across restarts on that socket, distinct
    /// for agentds on different sockets.
    pub fn for_socket(socket: &Path) -> CgroupOptions {
        // FNV-1a: a hash that, unlike std's, stays the same across Rust versions.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in socket.as_os_str().as_encoded_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        CgroupOptions::new(format!("agentd-{uid}-{hash:016x}"))
    }
}

/// The name of the leaf agentd moves itself into when its own cgroup is the
/// delegation point.
pub const DAEMON_LEAF: &str = "agentd-daemon";

/// An agentd instance's cgroup directory, under which task cgroups are created.
#[derive(Debug)]
pub struct Cgroups {
    root: PathBuf,
    /// Controllers enabled for task cgroups (in `root/cgroup.subtree_control`).
    controllers: Vec<String>,
    pids_max: Option<u64>,
    memory_max: Option<u64>,
    /// The instance directory opened (`O_PATH`) at the first task cgroup, after
    /// [`Cgroups::recover`] may have made it again: task cgroups are made, opened and
    /// removed relative to it, so the kernel walks one path component for each
    /// instead of the whole path from `/` (measured: the walk was about 5% of the
    /// loop's CPU per trivial task).
    root_dir: OnceLock<Option<Arc<OwnedFd>>>,
}

/// What [`Cgroups::recover`] found in an old task cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub cgroup: PathBuf,
    /// The processes that were still in it and were killed.
    pub pids: Vec<u32>,
    /// False if the cgroup could not be emptied and removed within the deadline.
    pub removed: bool,
}

impl Cgroups {
    /// Finds a cgroup v2 subtree agentd can write and creates its instance directory
    /// in it. Tried in order: agentd's own cgroup (a systemd service with
    /// `Delegate=yes`, or any cgroup root may write; agentd moves itself into the
    /// [`DAEMON_LEAF`] first), or, when agentd is in the hierarchy root and may write
    /// it (root on a host like these, `/sys/fs/cgroup/unified`), `<mount>/agentd`.
    /// The error says why none could be had, for `agentctl status`.
    pub fn detect(opts: &CgroupOptions) -> Result<Cgroups, String> {
        let mounts = cgroup2_mounts();
        if mounts.is_empty() {
            return Err("no cgroup v2 hierarchy is mounted".into());
        }
        let own = own_cgroup().ok_or("agentd is not in a cgroup v2 hierarchy")?;
        let (mount, own_dir) = mounts
            .iter()
            .find_map(|m| m.dir_of(&own).map(|dir| (m.point.clone(), dir)))
            .ok_or_else(|| format!("agentd's cgroup {own} is not visible in any cgroup2 mount"))?;
        if !writable(&own_dir.join("cgroup.procs")) || !writable(&own_dir) {
            return Err(format!(
                "agentd's cgroup {} is not writable (run agentd as a systemd service with Delegate=yes)",
                own_dir.display()
            ));
        }
        let chain_top = own_dir.clone();
        let parent = if own_dir == mount {
            let parent = own_dir.join("agentd");
            mkdir_ok(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            parent
        } else {
            // Leave our own cgroup for a leaf so it may delegate controllers. If that
            // fails we go on: task cgroups work, only without controllers.
            let leaf = own_dir.join(DAEMON_LEAF);
            if let Err(e) =
                mkdir_ok(&leaf).and_then(|()| write_file(&leaf.join("cgroup.procs"), "0"))
            {
                tracing::warn!(
                    "cannot move agentd into {}: {e}; task cgroups get no controllers",
                    leaf.display()
                );
            }
            own_dir
        };
        let created = match Cgroups::create(&chain_top, &parent, opts) {
            // `<mount>/agentd` is shared: another agentd may have removed it just now.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                mkdir_ok(&parent).and_then(|()| Cgroups::create(&chain_top, &parent, opts))
            }
            other => other,
        };
        created.map_err(|e| {
            format!(
                "cannot create a cgroup under {}: {e}",
                parent.join(&opts.instance).display()
            )
        })
    }

    /// Uses `parent` (an existing, writable cgroup v2 directory) as the delegation
    /// point: creates `parent/<instance>` and enables what controllers `parent` offers.
    /// For tests and for an explicitly configured cgroup.
    pub fn under(parent: &Path, opts: &CgroupOptions) -> io::Result<Cgroups> {
        Cgroups::create(parent, parent, opts)
    }

    fn create(chain_top: &Path, parent: &Path, opts: &CgroupOptions) -> io::Result<Cgroups> {
        if !valid_name(&opts.instance) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cgroup instance name {:?}", opts.instance),
            ));
        }
        let root = parent.join(&opts.instance);
        mkdir_ok(&root)?;
        if !root.join("cgroup.kill").exists() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel has no cgroup.kill (Linux 5.14 or later is needed)",
            ));
        }
        let mut wanted = Vec::new();
        if opts.pids_max.is_some() {
            wanted.push("pids");
        }
        if opts.memory_max.is_some() {
            wanted.push("memory");
        }
        // Enable the wanted controllers on the way down from the delegation point.
        let mut chain = vec![chain_top.to_path_buf()];
        if let Ok(rest) = root.strip_prefix(chain_top) {
            let mut dir = chain_top.to_path_buf();
            let comps: Vec<_> = rest.components().collect();
            // Every directory on the way, except the instance (handled below) itself.
            for comp in &comps[..comps.len().saturating_sub(1)] {
                dir.push(comp);
                chain.push(dir.clone());
            }
        }
        chain.push(root.clone());
        for dir in &chain {
            let offered = read_words(&dir.join("cgroup.controllers"));
            let enabled = read_words(&dir.join("cgroup.subtree_control"));
            for c in &wanted {
                if offered.iter().any(|o| o == c) && !enabled.iter().any(|e| e == c) {
                    let _ = write_file(&dir.join("cgroup.subtree_control"), &format!("+{c}"));
                }
            }
        }
        let controllers = read_words(&root.join("cgroup.subtree_control"));
        Ok(Cgroups {
            root,
            controllers,
            pids_max: opts.pids_max,
            memory_max: opts.memory_max,
            root_dir: OnceLock::new(),
        })
    }

    /// The instance directory as an `O_PATH` descriptor (`None` if it cannot be
    /// opened: then task cgroups go by their paths).
    fn root_dir(&self) -> Option<Arc<OwnedFd>> {
        self.root_dir
            .get_or_init(|| {
                let path = CString::new(self.root.as_os_str().as_bytes()).ok()?;
                // SAFETY: open of a NUL-terminated path; returns a new descriptor or -1.
                let fd = unsafe {
                    libc::open(
                        path.as_ptr(),
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                };
                // SAFETY: the kernel just returned this descriptor; nothing else owns it.
                (fd >= 0).then(|| Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
            })
            .clone()
    }

    /// The instance directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Controllers task cgroups get (e.g. `pids`); empty where none is delegated.
    pub fn controllers(&self) -> &[String] {
        &self.controllers
    }

    /// Creates the task's cgroup, applies the limits the delegated controllers allow,
    /// and opens its `cgroup.procs` for the spawn.
    pub fn create_task(&self, task_id: &str) -> io::Result<TaskCgroup> {
        if !valid_name(task_id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("task id {task_id:?} cannot name a cgroup"),
            ));
        }
        let name = format!("task-{task_id}");
        let path = self.root.join(&name);
        // Relative to the instance directory when it is open; by path otherwise, or
        // when that directory was removed since it was opened (the path may name a
        // new one).
        let at = self
            .root_dir()
            .and_then(|dir| Some((dir, CString::new(name).ok()?)))
            .and_then(|(dir, name)| match mkdir_at(&dir, &name) {
                Ok(()) => Some(Ok(RelativeTo { dir, name })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => Some(Err(e)),
            })
            .transpose()?;
        if at.is_none() {
            fs::create_dir(&path)?;
        }
        let procs = match &at {
            Some(at) => at.open_procs(),
            None => File::options().write(true).open(path.join("cgroup.procs")),
        };
        let cgroup = TaskCgroup {
            procs: match procs {
                Ok(f) => f,
                Err(e) => {
                    let _ = match &at {
                        Some(at) => at.rmdir(),
                        None => fs::remove_dir(&path),
                    };
                    return Err(e);
                }
            },
            path,
            at,
        };
        let has = |c: &str| self.controllers.iter().any(|x| x == c);
        if let (Some(max), true) = (self.pids_max, has("pids")) {
            write_file(&cgroup.path.join("pids.max"), &max.to_string())?;
        }
        if let (Some(max), true) = (self.memory_max, has("memory")) {
            write_file(&cgroup.path.join("memory.max"), &max.to_string())?;
        }
        Ok(cgroup)
    }

    /// The cgroup of this instance's [`crate::Guardian`], beside the instance
    /// directory (inside it, the guardian's own `cgroup.kill` would kill it).
    pub fn guardian_dir(&self) -> PathBuf {
        let name = self.root.file_name().unwrap_or_default().to_string_lossy();
        self.root.with_file_name(format!("{name}.guardian"))
    }

    /// Kills whatever is left in task cgroups of a previous agentd of this instance
    /// and removes them. Call it once at startup, after the daemon holds its socket
    /// (so the previous agentd is known to be dead) and before the first spawn.
    /// First waits (up to `deadline`) for the previous agentd's guardian to finish,
    /// so that it cannot kill tasks of this agentd. Blocks for at most about
    /// `deadline` per cgroup that does not empty. [`crate::Procs`] starts its own
    /// guardian between the two ([`Cgroups::wait_for_previous_guardian`], then
    /// [`Cgroups::kill_leftovers`]), so that an agentd killed while it recovers
    /// leaves nothing behind either.
    pub fn recover(&self, deadline: Duration) -> Vec<Leftover> {
        self.wait_for_previous_guardian(deadline);
        self.kill_leftovers(deadline)
    }

    /// Waits (up to `deadline`) until the previous agentd's guardian has finished
    /// (its cgroup, [`Cgroups::guardian_dir`], is empty), so that it cannot kill tasks
    /// of this agentd; then makes the instance directory again if that guardian
    /// removed it.
    pub fn wait_for_previous_guardian(&self, deadline: Duration) {
        if !wait_empty(&self.guardian_dir(), deadline) {
            tracing::warn!(
                "the previous guardian in {} is still running",
                self.guardian_dir().display()
            );
        }
        // The old guardian's last act removes the instance directory, maybe after
        // this agentd found it: make it again, with the controllers it had.
        if !self.root.exists() {
            match mkdir_ok(&self.root) {
                Ok(()) => {
                    for c in &self.controllers {
                        let _ =
                            write_file(&self.root.join("cgroup.subtree_control"), &format!("+{c}"));
                    }
                }
                Err(e) => tracing::warn!("cannot re-create {}: {e}", self.root.display()),
            }
        }
    }

    /// Kills what is left in the instance's task cgroups (a previous agentd's: call it
    /// before the first spawn) and removes them, blocking for at most about
    /// `deadline` per cgroup that does not empty.
    pub fn kill_leftovers(&self, deadline: Duration) -> Vec<Leftover> {
        self.kill_tasks(deadline)
    }

    /// Kills and removes every task cgroup of this instance.
    fn kill_tasks(&self, deadline: Duration) -> Vec<Leftover> {
        let mut found = Vec::new();
        let Ok(dir) = fs::read_dir(&self.root) else {
            return found;
        };
        for entry in dir.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let pids = read_pids(&path);
            let _ = write_file(&path.join("cgroup.kill"), "1");
            let removed = kill_until_empty(&path, deadline) && rmdir_tree(&path).is_ok();
            found.push(Leftover {
                cgroup: path,
                pids,
                removed,
            });
        }
        found
    }

    /// Kills every task cgroup of this instance and removes them and the instance
    /// directory (shutdown, tests). Blocks like [`Cgroups::recover`], but does not
    /// wait for a guardian.
    pub fn remove_all(&self, deadline: Duration) -> io::Result<()> {
        self.kill_tasks(deadline);
        fs::remove_dir(&self.root)
    }
}

/// One task's cgroup.
#[derive(Debug)]
pub struct TaskCgroup {
    path: PathBuf,
    /// `cgroup.procs`, opened for writing: the spawned child writes "0" to it.
    procs: File,
    /// Where it was made relative to the instance directory: removed the same way.
    at: Option<RelativeTo>,
}

/// A task cgroup's name in the instance directory, held open.
#[derive(Debug)]
struct RelativeTo {
    dir: Arc<OwnedFd>,
    name: CString,
}

impl RelativeTo {
    /// Its `cgroup.procs`, for writing (close-on-exec, as `File::open` makes it).
    fn open_procs(&self) -> io::Result<File> {
        let mut path = self.name.as_bytes().to_vec();
        path.extend_from_slice(b"/cgroup.procs");
        let path = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: openat on a descriptor we hold and a NUL-terminated relative path;
        // returns a new descriptor or -1.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn rmdir(&self) -> io::Result<()> {
        // SAFETY: unlinkat on a descriptor we hold and a NUL-terminated name.
        let rc =
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), libc::AT_REMOVEDIR) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `mkdir` of `name` (mode 0777, as `fs::create_dir`) in the directory `dir`.
fn mkdir_at(dir: &OwnedFd, name: &CString) -> io::Result<()> {
    // SAFETY: mkdirat on a descriptor we hold and a NUL-terminated name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o777) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl TaskCgroup {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn procs_fd(&self) -> BorrowedFd<'_> {
        self.procs.as_fd()
    }

    /// SIGKILLs every process in the cgroup, atomically with respect to forks.
    pub fn kill(&self) -> io::Result<()> {
        write_file(&self.path.join("cgroup.kill"), "1")
    }

    /// True while any process (not counting zombies) is in the cgroup or below it.
    /// One read of `cgroup.events`.
    pub fn populated(&self) -> io::Result<bool> {
        populated(&self.path)
    }

    /// The processes in the cgroup now (may be stale as soon as it is read).
    pub fn pids(&self) -> Vec<u32> {
        read_pids(&self.path)
    }

    /// Removes the (empty) cgroup, and any sub-cgroup an agent created in it.
    pub fn remove(&self) -> io::Result<()> {
        rmdir_tree(&self.path)
    }

    /// Removes the cgroup if nothing is left in it: one `rmdir`, which the kernel
    /// refuses (`EBUSY`) while the cgroup is populated (the flag `cgroup.events`
    /// shows: any process but zombies, in it or below) or has a sub-cgroup. `true`:
    /// removed, or gone already; `false`: refused, something may be left.
    pub fn remove_if_empty(&self) -> io::Result<bool> {
        let removed = match &self.at {
            Some(at) => at.rmdir(),
            None => fs::remove_dir(&self.path),
        };
        match removed {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn populated(path: &Path) -> io::Result<bool> {
    let mut buf = [0u8; 256];
    let events = crate::tree::read_small(&path.join("cgroup.events"), &mut buf)?;
    Ok(events
        .lines()
        .any(|l| l.split_whitespace().eq(["populated", "1"]))
        || !events.lines().any(|l| l.starts_with("populated ")))
}

/// SIGKILLs, through pidfds, the processes of `pids` (listed in the cgroup at `path`)
/// whose thread group leader exited while other threads run on (`pthread_exit`):
/// `cgroup.kill` signals each process through its leader as a signal to that thread
/// alone, which a leader that has exited never takes, so such a process lives on
/// (and the cgroup stays populated) however often the cgroup is killed. A pidfd's
/// signal goes to the whole thread group. One `stat` read per listed process.
pub(crate) fn kill_leaderless(path: &Path, pids: &[u32]) {
    let leaderless: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&pid| crate::tree::read_stat(pid).is_some_and(|s| s.leader_exited()))
        .collect();
    if leaderless.is_empty() {
        return;
    }
    // Still in the cgroup after the pidfds were opened: ours (see open_verified).
    let fds = crate::pidfd::open_verified(&leaderless, |opened| {
        let now = read_pids(path);
        opened.iter().copied().filter(|p| now.contains(p)).collect()
    });
    for fd in &fds {
        let _ = fd.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// [`wait_empty`] for a cgroup that was just killed, SIGKILLing on each look what
/// `cgroup.kill` cannot reach ([`kill_leaderless`]).
fn kill_until_empty(path: &Path, deadline: Duration) -> bool {
    let until = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        match populated(path) {
            Ok(false) => return true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
            _ => {}
        }
        kill_leaderless(path, &read_pids(path));
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

pub(crate) fn wait_empty(path: &Path, deadline: Duration) -> bool {
    let until = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        match populated(path) {
            Ok(false) => return true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
            _ => {}
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn read_pids(path: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    // Sub-cgroups an agent made (possible only for an agent that may write cgroupfs).
    if let Ok(dir) = fs::read_dir(path) {
        for entry in dir.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(read_pids(&entry.path()));
            }
        }
    }
    pids
}

fn rmdir_tree(path: &Path) -> io::Result<()> {
    // Most task cgroups have no sub-cgroups: one rmdir, no listing.
    match fs::remove_dir(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    if let Ok(dir) = fs::read_dir(path) {
        for entry in dir.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&entry.path())?;
            }
        }
    }
    match fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.starts_with("cgroup.")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub(crate) fn mkdir_ok(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// cgroupfs files take one write each, so write the whole value at once.
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    File::options()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

fn read_words(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn writable(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: access reads a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// A cgroup2 mount: where it is mounted and which cgroup its root shows.
#[derive(Debug, Clone)]
struct Mount {
    point: PathBuf,
    root: String,
}

impl Mount {
    /// The directory of cgroup `path` (as /proc/self/cgroup names it) in this mount.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path.strip_prefix('/')?
        } else {
            let rest = path.strip_prefix(self.root.as_str())?;
            if !rest.is_empty() && !rest.starts_with('/') {
                return None;
            }
            rest.trim_start_matches('/')
        };
        Some(if rel.is_empty() {
            self.point.clone()
        } else {
            self.point.join(rel)
        })
    }
}

fn cgroup2_mounts() -> Vec<Mount> {
    parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        if fields.len() < 5 {
            continue;
        }
        mounts.push(Mount {
            root: unescape(fields[3]),
            point: PathBuf::from(unescape(fields[4])),
        });
    }
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup v2 path, from the `0::` line of /proc/self/cgroup.
fn own_cgroup() -> Option<String> {
    parse_own_cgroup(&fs::read_to_string("/proc/self/cgroup").ok()?)
}

fn parse_own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/') && !p.ends_with(" (deleted)"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_cgroup2_mounts_only() {
        let text = "\
35 24 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n\
36 24 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n\
37 24 0:32 /user.slice /mnt/with\\040space rw - cgroup2 none rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[1].point, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[1].root, "/user.slice");
        assert_eq!(
            mounts[0].dir_of("/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a/b"))
        );
        assert_eq!(
            mounts[0].dir_of("/"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mounts[1].dir_of("/user.slice/x"),
            Some(PathBuf::from("/mnt/with space/x"))
        );
        assert_eq!(mounts[1].dir_of("/user.slicex"), None);
        assert_eq!(mounts[1].dir_of("/system.slice"), None);
    }

    #[test]
    fn own_cgroup_is_the_unified_line() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/user.slice/agentd.service\n";
        assert_eq!(
            parse_own_cgroup(text).as_deref(),
            Some("/user.slice/agentd.service")
        );
        assert_eq!(parse_own_cgroup("4:memory:/x\n"), None);
        assert_eq!(parse_own_cgroup("0::/gone (deleted)\n"), None);
    }

    #[test]
    fn socket_instances_are_stable_valid_and_distinct() {
        let a = CgroupOptions::for_socket(Path::new("/run/user/1000/agentd/agentd.sock"));
        let b = CgroupOptions::for_socket(Path::new("/tmp/x/agentd.sock"));
        assert_eq!(
            a,
            CgroupOptions::for_socket(Path::new("/run/user/1000/agentd/agentd.sock"))
        );
        assert_ne!(a.instance, b.instance);
        assert!(valid_name(&a.instance), "{}", a.instance);
        assert!(a.instance.starts_with("agentd-"));
    }

    #[test]
    fn names_that_could_escape_or_clash_are_refused() {
        assert!(valid_name("0193f1c2-7a5b-7c3d-9e1f-123456789abc"));
        for bad in ["", ".", "..", "a/b", "cgroup.procs", "x y", "a\n"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
