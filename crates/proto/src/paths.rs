//! Where the control socket lives, shared by agentd and its clients.
//!
//! `$AGENTD_SOCKET`, else `$XDG_RUNTIME_DIR/agentd/agentd.sock`, else
//! `/tmp/agentd-$UID/agentd.sock`. An explicit `--socket` flag wins over all three.

use std::path::PathBuf;

/// Environment variable that names the control socket.
pub const ENV_SOCKET: &str = "AGENTD_SOCKET";

/// The control socket path when no `--socket` flag is given.
pub fn default_socket_path() -> PathBuf {
    socket_path_from(
        std::env::var_os(ENV_SOCKET).map(PathBuf::from),
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        current_uid(),
    )
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The owner of our own /proc entry is our uid (no libc call needed here).
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// Pure form of [`default_socket_path`], for tests.
pub fn socket_path_from(
    env_socket: Option<PathBuf>,
    xdg_runtime_dir: Option<PathBuf>,
    uid: u32,
) -> PathBuf {
    if let Some(p) = env_socket.filter(|p| !p.as_os_str().is_empty()) {
        return p;
    }
    if let Some(dir) = xdg_runtime_dir.filter(|p| p.is_absolute()) {
        return dir.join("agentd").join("agentd.sock");
    }
    PathBuf::from(format!("/tmp/agentd-{uid}")).join("agentd.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            socket_path_from(p("/x/s.sock"), p("/run/user/1"), 5),
            PathBuf::from("/x/s.sock")
        );
        assert_eq!(
            socket_path_from(None, p("/run/user/1"), 5),
            PathBuf::from("/run/user/1/agentd/agentd.sock")
        );
        assert_eq!(
            socket_path_from(p(""), None, 5),
            PathBuf::from("/tmp/agentd-5/agentd.sock")
        );
        assert_eq!(
            socket_path_from(None, p("relative"), 5),
            PathBuf::from("/tmp/agentd-5/agentd.sock")
        );
    }
}
