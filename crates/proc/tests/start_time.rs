//! The start time a spawn tells from the clock (without reading `/proc`) is the one
//! `/proc/PID/stat` shows, for every spawn that tells one.

use std::io::Read;

use agentd_proc::{spawn_agent, AgentCommand};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

fn proc_start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 1..];
    after_comm
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_start_time_told_by_the_spawn_is_the_one_proc_shows() {
    let command = AgentCommand {
        program: "sh".into(),
        // Waits for agentd's end of the channel to close, so it is an unreaped
        // child (its pid its own) while /proc is read.
        args: vec!["-c".into(), "read x <&3".into()],
        task_id: "t-start".into(),
        session: "s".into(),
        log_path: None,
        capture_output: false,
        env: Vec::new(),
    };
    let mut told = 0;
    for _ in 0..100 {
        let spawned = spawn_agent(&command).unwrap();
        let from_proc = proc_start_time(spawned.pid);
        if let Some(start) = spawned.start_time {
            told += 1;
            assert_eq!(start, from_proc, "pid {}", spawned.pid);
        }
        let mut channel = spawned.channel;
        channel.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = channel.read(&mut [0u8; 1]);
        waitpid(Pid::from_raw(spawned.pid as i32), None).unwrap();
    }
    // The two clock readings are microseconds apart against a 10 ms clock tick: most
    // spawns tell (a loaded machine may delay the child's first step now and then).
    eprintln!("{told} of 100 spawns told their start time");
    assert!(
        told >= 50,
        "only {told} of 100 spawns told their start time"
    );
}
