//! agentd-spawn on its own: descriptors land where they are asked for (even when a
//! source's number is one of the targets), the death signal is the one asked for,
//! and the environment edits apply in order.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

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
    // Seven pipes: their write ends have low numbers (some below 8, the number of
    // targets), so copying them onto 1..=7 in order would overwrite later sources
    // unless the spawn moves them out of the way first.
    let pipes: Vec<_> = (0..7).map(|_| pipe()).collect();
    let null = dev_null().unwrap();
    let mut fds: Vec<BorrowedFd<'_>> = vec![null];
    fds.extend(pipes.iter().map(|(_, w)| w.as_fd()));
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "for i in 1 2 3 4 5 6 7; do echo $i >&$i; done; ls /proc/self/fd >&1",
    ]);
    let child = cmd.spawn(&fds, None).unwrap();
    drop(fds);
    let mut reads = Vec::new();
    for (read, write) in pipes {
        drop(write);
        reads.push(read);
    }
    assert_eq!(wait(child.pid), (Some(0), None));
    for (i, mut read) in reads.into_iter().enumerate() {
        let mut out = String::new();
        read.read_to_string(&mut out).unwrap();
        let first = out.lines().next().unwrap_or_default();
        assert_eq!(first, (i + 1).to_string(), "fd {}: {out:?}", i + 1);
        if i == 0 {
            // ls's own descriptors: 0-7, and its directory (8 or above).
            let fds: Vec<i32> = out.lines().skip(1).map(|l| l.parse().unwrap()).collect();
            assert!(
                fds.starts_with(&[0, 1, 2, 3, 4, 5, 6, 7]) && fds.len() <= 9,
                "{fds:?}"
            );
        }
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
