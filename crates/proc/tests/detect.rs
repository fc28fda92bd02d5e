//! `Procs::detect` on a real host: as root in the hierarchy root it uses
//! `<mount>/agentd/<instance>`; inside a delegated (writable, non-root) cgroup it moves
//! itself into the `agentd-daemon` leaf and nests the instance beside it. The second
//! case runs in a re-executed copy of this test binary started inside such a cgroup.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use agentd_proc::{CgroupOptions, Cgroups, Containment, Procs, DAEMON_LEAF};
use common::*;

const CHILD_ENV: &str = "AGENTD_PROC_DETECT_CHILD";

fn in_hierarchy_root() -> bool {
    cgroup_of(std::process::id()) == "/"
}

#[test]
fn detect_in_the_hierarchy_root_uses_mount_agentd() {
    if std::env::var_os(CHILD_ENV).is_some() || !in_hierarchy_root() {
        eprintln!("SKIPPED: this process is not in the cgroup v2 root");
        return;
    }
    let opts = CgroupOptions::new(format!("test-detect-{}", std::process::id()));
    let procs = Procs::detect(&opts);
    let Containment::Cgroup { root, .. } = procs.containment() else {
        // Not root, or no writable hierarchy: the reason must say so.
        let Containment::ProcessTree { reason } = procs.containment() else {
            unreachable!()
        };
        assert!(!reason.is_empty());
        eprintln!("SKIPPED: no writable cgroup: {reason}");
        return;
    };
    let cgroups = procs.cgroups().unwrap();
    let expected = Path::new(UNIFIED).join("agentd").join(&opts.instance);
    let cleanup = Cleanup(vec![root.clone()]);
    assert_eq!(root, expected);
    assert!(root.join("cgroup.kill").exists());
    // agentd stayed where it was: the root is exempt from the no-internal-processes rule.
    assert_eq!(cgroup_of(std::process::id()), "/");
    let task = cgroups.create_task("t1").unwrap();
    assert!(task.path().starts_with(&root));
    task.remove().unwrap();
    drop(cleanup);
}

#[test]
fn detect_in_a_delegated_cgroup_moves_agentd_into_a_leaf() {
    if let Some(instance) = std::env::var_os(CHILD_ENV) {
        // The re-executed child, started inside the "delegated" cgroup.
        let opts = CgroupOptions::new(instance.to_str().unwrap());
        let procs = Procs::detect(&opts);
        match procs.containment() {
            Containment::Cgroup { root, .. } => {
                println!("ROOT={}", root.display());
                println!("SELF={}", cgroup_of(std::process::id()));
            }
            Containment::ProcessTree { reason } => println!("FALLBACK={reason}"),
        }
        return;
    }
    let Some(parent) = TestCgroupParent::new("delegated") else {
        return;
    };
    let service = parent.path.join("agentd.service");
    std::fs::create_dir(&service).unwrap();
    let procs_file = std::fs::File::options()
        .write(true)
        .open(service.join("cgroup.procs"))
        .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&procs_file);
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "detect_in_a_delegated_cgroup_moves_agentd_into_a_leaf",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "inst")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: write(2) only, in the forked child.
    unsafe {
        child.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = KillOnDrop(child.spawn().unwrap());
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.0.wait().unwrap().success(), "{out}");
    let rel = |p: &Path| format!("/{}", p.strip_prefix(UNIFIED).unwrap().display());
    assert!(
        out.contains(&format!("ROOT={}", service.join("inst").display())),
        "{out}"
    );
    assert!(
        out.contains(&format!("SELF={}", rel(&service.join(DAEMON_LEAF)))),
        "{out}"
    );
    // A later instance in the same service finds the layout in place.
    let again = Cgroups::under(&service, &CgroupOptions::new("inst")).unwrap();
    assert!(again.recover(Duration::from_secs(5)).is_empty());
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the cgroups a test created (and `<mount>/agentd` if it is then empty).
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
            if let Some(parent) = dir.parent() {
                // Shared by every agentd on the host: only removed when empty.
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

#[test]
fn task_cgroups_are_made_in_the_instance_directory_even_after_it_was_made_again() {
    // Task cgroups are made relative to the instance directory held open: when that
    // directory is removed and made again (as recovery does after an old guardian
    // removed it), they must still land in the directory the path names now.
    if std::env::var_os(CHILD_ENV).is_some() || !in_hierarchy_root() {
        eprintln!("SKIPPED: this process is not in the cgroup v2 root");
        return;
    }
    let opts = CgroupOptions::new(format!("test-remade-{}", std::process::id()));
    let procs = Procs::detect(&opts);
    let Containment::Cgroup { root, .. } = procs.containment() else {
        eprintln!("SKIPPED: no writable cgroup");
        return;
    };
    let cleanup = Cleanup(vec![root.clone()]);
    let cgroups = procs.cgroups().unwrap();
    let first = cgroups.create_task("t1").unwrap();
    assert!(first.path().is_dir());
    assert!(first.remove_if_empty().unwrap());
    assert!(!first.path().exists());
    drop(first);
    std::fs::remove_dir(&root).unwrap();
    std::fs::create_dir(&root).unwrap();
    let second = cgroups.create_task("t2").unwrap();
    assert_eq!(second.path(), root.join("task-t2"));
    assert!(second.path().join("cgroup.procs").is_file());
    assert!(second.remove_if_empty().unwrap());
    assert!(!second.path().exists());
    drop(cleanup);
}
