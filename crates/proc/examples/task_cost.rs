//! agentd's own CPU per trivial task (spawn, track, reap, "tree empty"), for each way
//! of ending a task, against plain `std::process::Command` spawns of the same program
//! measured in the same run. Not a test: run it once, by hand or through
//! `scripts/proc-cost.sh`.
//!
//! Usage: `task_cost [N]` (default 300). Needs root for the cgroup figure.

use std::time::Instant;

use agentd_proc::{
    reap_children, AgentCommand, CgroupOptions, Cgroups, Killer, KillerOptions, Procs, TaskTree,
    TreeReport,
};

fn cpu_self_us() -> u64 {
    // SAFETY: getrusage fills the struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

fn cmd(i: usize) -> AgentCommand {
    AgentCommand {
        program: "/bin/true".into(),
        args: vec![],
        task_id: format!("cost-{i}"),
        session: "s".into(),
        log_path: None,
    }
}

/// Blocks until `pid` exits, then reaps it through the one reaper.
fn wait_reaped(pid: u32) {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with WNOWAIT waits without reaping and fills `info`.
    unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
    assert!(reap_children().iter().any(|r| r.pid == pid));
}

/// spawn_agent and the reap only: what a task costs before any tree check.
fn spawn_only(n: usize) -> (f64, f64) {
    let (cpu, wall) = (cpu_self_us(), Instant::now());
    for i in 0..n {
        let agent = agentd_proc::spawn_agent(&cmd(i)).unwrap();
        wait_reaped(agent.pid);
    }
    per_task(cpu, wall, n)
}

/// Runs n tasks one after another through Procs and the Killer; CPU µs per task.
fn through_killer(procs: &Procs, n: usize) -> (f64, f64) {
    let (killer, reports) = Killer::with_channel(KillerOptions::default()).unwrap();
    let (cpu, wall) = (cpu_self_us(), Instant::now());
    for i in 0..n {
        let spawned = procs.spawn(&cmd(i)).unwrap();
        killer.track(spawned.procs);
        wait_reaped(spawned.pid);
        killer.agent_exited(&format!("cost-{i}"));
        match reports.recv().unwrap() {
            TreeReport::Empty { survivors, .. } => assert!(survivors.is_empty()),
            other => panic!("{other:?}"),
        }
    }
    per_task(cpu, wall, n)
}

/// The daemon's path of today: spawn_agent, then kill_all after the reap.
fn legacy(n: usize) -> (f64, f64) {
    let (cpu, wall) = (cpu_self_us(), Instant::now());
    for i in 0..n {
        let agent = agentd_proc::spawn_agent(&cmd(i)).unwrap();
        wait_reaped(agent.pid);
        TaskTree::new(agent.pid, format!("cost-{i}")).kill_all(false, 10);
    }
    per_task(cpu, wall, n)
}

fn plain(n: usize) -> (f64, f64) {
    let (cpu, wall) = (cpu_self_us(), Instant::now());
    for _ in 0..n {
        std::process::Command::new("/bin/true").status().unwrap();
    }
    per_task(cpu, wall, n)
}

fn per_task(cpu: u64, wall: Instant, n: usize) -> (f64, f64) {
    (
        (cpu_self_us() - cpu) as f64 / n as f64,
        wall.elapsed().as_secs_f64() * 1e6 / n as f64,
    )
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    agentd_proc::become_subreaper().unwrap();
    let (base_cpu, base_wall) = plain(n);
    println!("{n} tasks of /bin/true, one at a time; agentd's own CPU per task (user+sys)");
    println!(
        "  std::process::Command     cpu {base_cpu:7.0} us  wall {base_wall:7.0} us  (baseline)"
    );
    let report = |name: &str, (cpu, wall): (f64, f64)| {
        println!(
            "  {name:<25} cpu {cpu:7.0} us  wall {wall:7.0} us  cpu x{:.2} of baseline",
            cpu / base_cpu
        );
    };
    report("spawn_agent + reap only", spawn_only(n));
    report("legacy kill_all", legacy(n));
    report(
        "Killer, process tree",
        through_killer(&Procs::process_tree("forced"), n),
    );
    let instance = format!("task-cost-{}", std::process::id());
    match Cgroups::detect(&CgroupOptions::new(instance)) {
        Ok(cgroups) => {
            let mut procs = Procs::with_cgroups(cgroups);
            report("Killer, cgroup", through_killer(&procs, n));
            let root = procs.cgroups().unwrap().root().to_path_buf();
            let _ = procs.shutdown();
            // <mount>/agentd is shared by every agentd: remove it only if now empty.
            if let Some(parent) = root.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        Err(reason) => println!("  Killer, cgroup            unavailable: {reason}"),
    }
}
