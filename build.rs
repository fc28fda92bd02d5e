//! Links agent-exec's unwinder statically (libgcc_eh) instead of loading libgcc_s.
//!
//! agentd starts one agent-exec per task, so its start-up is part of every task's
//! CPU (scripts/bench-tasks.sh). Loading libgcc_s costs its mapping, its symbol
//! lookups and its constructor, which probes the CPU with `cpuid`, an instruction
//! that traps to the hypervisor in a VM (about 5 µs a call): about a tenth of
//! agent-exec's own CPU per task. With libgcc_eh linked in whole, nothing refers to
//! libgcc_s any more and `--as-needed` (rustc's default) drops it; unwinding
//! (panics, `catch_unwind`) works the same. Only on linux-gnu with a C toolchain
//! that has libgcc_eh.a; otherwise agent-exec links as every other binary does.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let static_crt = var("CARGO_CFG_TARGET_FEATURE")
        .split(',')
        .any(|f| f == "crt-static");
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" || static_crt {
        return;
    }
    // `cc -print-file-name` answers the bare name when it has no such file.
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let found = Command::new(cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .is_some_and(|path| path != "libgcc_eh.a" && std::path::Path::new(&path).is_file());
    if !found {
        return;
    }
    for arg in ["-Wl,--whole-archive", "-lgcc_eh", "-Wl,--no-whole-archive"] {
        println!("cargo:rustc-link-arg-bin=agent-exec={arg}");
    }
    println!("cargo:rustc-env=AGENT_EXEC_STATIC_UNWINDER=1");
}
