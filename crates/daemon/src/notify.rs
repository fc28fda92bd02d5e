//! systemd's readiness protocol (`sd_notify`): under a `Type=notify` unit, systemd
//! passes `$NOTIFY_SOCKET`, a Unix datagram socket (a path, or an abstract name written
//! `@name`), and waits for `READY=1` before it counts the service as started.
//! agentd sends `READY=1` once its control socket accepts requests, and `STOPPING=1`
//! when its stop sequence begins. Without `$NOTIFY_SOCKET` these do nothing.
//!
//! [`take_socket_from_env`] moves the variable out of the environment at start, so
//! that agents (and their tools) do not inherit agentd's channel to systemd.

use std::ffi::OsString;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

/// The environment variable systemd sets for `Type=notify` services.
pub const ENV_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

static SOCKET: OnceLock<Option<OsString>> = OnceLock::new();

/// Takes `$NOTIFY_SOCKET` out of the environment and keeps it for [`ready`] and
/// [`stopping`]. Call it first thing in `main`, while agentd has a single thread
/// (changing the environment is not thread-safe).
pub fn take_socket_from_env() {
    let socket = std::env::var_os(ENV_NOTIFY_SOCKET);
    if socket.is_some() {
        std::env::remove_var(ENV_NOTIFY_SOCKET);
    }
    let _ = SOCKET.set(socket);
}

/// The socket to notify: the one taken at start, else the environment's.
fn socket() -> Option<OsString> {
    match SOCKET.get() {
        Some(socket) => socket.clone(),
        None => std::env::var_os(ENV_NOTIFY_SOCKET),
    }
}

/// Tells the service manager that agentd is ready (its control socket answers).
pub fn ready() {
    send_logged(&format!("READY=1\nMAINPID={}\n", std::process::id()));
}

/// Tells the service manager that agentd has begun its stop sequence.
pub fn stopping() {
    send_logged("STOPPING=1\n");
}

fn send_logged(state: &str) {
    if let Err(e) = notify(socket(), state) {
        tracing::warn!("cannot notify the service manager through ${ENV_NOTIFY_SOCKET}: {e}");
    }
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to `socket`, the value of
/// `$NOTIFY_SOCKET`. `Ok(false)` when there is no socket to notify.
pub fn notify(socket: Option<OsString>, state: &str) -> io::Result<bool> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let addr = address(&socket)?;
    let datagram = UnixDatagram::unbound()?;
    datagram.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

fn address(socket: &OsString) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(socket),
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path nor an abstract socket name (@name)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        assert!(notify(Some(path.into_os_string()), "READY=1\n").unwrap());
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("agentd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        assert!(notify(Some(format!("@{name}").into()), "STOPPING=1\n").unwrap());
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }

    #[test]
    fn no_socket_is_no_op_and_a_bad_one_an_error() {
        assert!(!notify(None, "READY=1\n").unwrap());
        assert!(!notify(Some("".into()), "READY=1\n").unwrap());
        assert!(notify(Some("relative".into()), "READY=1\n").is_err());
        assert!(notify(Some("/nonexistent/notify".into()), "READY=1\n").is_err());
    }
}
