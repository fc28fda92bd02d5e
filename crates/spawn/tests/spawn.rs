//! agentd-spawn on its own: descriptors land where they are asked for (even when a
//! source's number is one of the targets), the death signal is the one asked for,
//! and the environment edits apply in order.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use agentd_spawn::{dev_null, Command};

fn pipe() -> (std::fs::File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors, which we own from here on.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: as above.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// How `pid` (our child) ended: (exit code, signal).
fn wait(pid: u32) -> (Option<i32>, Option<i32>) {
    let mut status = 0;
    // SAFETY: waitpid for our own child with a valid status pointer.
    while unsafe { libc::waitpid(pid as i32, &mut status, 0) } < 0 {
        assert_eq!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::Interrupted
        );
    }
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else {
        (None, Some(libc::WTERMSIG(status)))
    }
}

#[test]
fn descriptors_land_where_asked_even_over_their_sources() {
    // Pipe k's write end is to become the descriptor whose number pipe k+1's write
    // end has now (the last one's, one above them all): copying them in order, as
    // they are, would overwrite pipe k+1's before it is copied.
    let mut pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
    pipes.sort_by_key(|(_, w)| w.as_raw_fd());
    let nums: Vec<RawFd> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
    assert!(nums[0] > 2);
    let last = nums[3] + 1;
    let targets: Vec<RawFd> = nums[1..].iter().copied().chain([last]).collect();
    let null = dev_null().unwrap();
    let mut fds: Vec<BorrowedFd<'_>> = vec![null; last as usize + 1];
    for ((_, write), &target) in pipes.iter().zip(&targets) {
        fds[target as usize] = write.as_fd();
    }
    let script: String = targets
        .iter()
        .map(|t| format!("echo {t} > /proc/$$/fd/{t}; "))
        .collect();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    let child = cmd.spawn(&fds, None).unwrap();
    drop(fds);
    let mut reads = Vec::new();
    for (read, write) in pipes {
        drop(write);
        reads.push(read);
    }
    assert_eq!(wait(child.pid), (Some(0), None));
    for (mut read, target) in reads.into_iter().zip(targets) {
        let mut out = String::new();
        read.read_to_string(&mut out).unwrap();
        assert_eq!(out, format!("{target}\n"), "fd {target}");
    }
}

#[test]
fn the_death_signal_is_the_one_asked_for() {
    let pid = std::thread::spawn(|| {
        let null = dev_null().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.args(["300"]).death_signal(libc::SIGKILL);
        cmd.spawn(&[null, null, null], None).unwrap().pid
    })
    .join()
    .unwrap();
    assert_eq!(wait(pid), (None, Some(libc::SIGKILL)));
}

#[test]
fn environment_edits_apply_in_order() {
    let (mut read, write) = pipe();
    let null = dev_null().unwrap();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"echo "a=${SPAWN_A-unset} b=${SPAWN_B-unset} home=${HOME-unset}""#,
    ])
    .env("SPAWN_A", "1")
    .env("SPAWN_B", "2")
    .env_remove("SPAWN_A")
    .env("SPAWN_B", "3")
    .env_remove("HOME");
    let child = cmd
        .spawn(&[null, write.as_fd(), write.as_fd()], None)
        .unwrap();
    drop(write);
    let mut out = String::new();
    read.read_to_string(&mut out).unwrap();
    assert_eq!(wait(child.pid), (Some(0), None));
    assert_eq!(out, "a=unset b=3 home=unset\n");
}

#[test]
fn a_captured_environment_gives_the_child_what_the_live_one_does() {
    // The same edits from the process's environment read at the spawn and from one
    // captured earlier: the child sees the same variables in the same order (an
    // edited variable moves to the end, a later edit wins, a removal removes), and
    // the program is looked up on the edited PATH either way.
    let run = |captured: bool| {
        let (mut read, write) = pipe();
        let null = dev_null().unwrap();
        let mut cmd = Command::new("env");
        if captured {
            cmd.environment(std::sync::Arc::new(
                agentd_spawn::Environment::capture().unwrap(),
            ));
        }
        cmd.env("SPAWN_A", "1")
            .env("PATH", "/nonexistent:/usr/bin:/bin")
            .env("SPAWN_B", "2")
            .env_remove("SPAWN_A")
            .env("SPAWN_B", "3")
            .env("HOME", "/elsewhere")
            .env_remove("SHELL");
        let child = cmd
            .spawn(&[null, write.as_fd(), write.as_fd()], None)
            .unwrap();
        drop(write);
        let mut out = String::new();
        read.read_to_string(&mut out).unwrap();
        assert_eq!(wait(child.pid), (Some(0), None));
        out
    };
    let live = run(false);
    let captured = run(true);
    assert_eq!(captured, live);
    let lines: Vec<&str> = captured.lines().collect();
    assert!(
        lines.ends_with(&[
            "PATH=/nonexistent:/usr/bin:/bin",
            "SPAWN_B=3",
            "HOME=/elsewhere"
        ]),
        "{captured}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("SPAWN_A=") || l.starts_with("SHELL=")),
        "{captured}"
    );
    assert_eq!(
        lines.len(),
        std::env::vars_os()
            .filter(|(k, _)| !["PATH", "HOME", "SHELL"].contains(&k.to_str().unwrap_or("")))
            .count()
            + 3,
        "{captured}"
    );
}
