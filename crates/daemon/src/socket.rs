//! The control socket: a private directory, a stale-socket check, the listener.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};
use interprocess::local_socket::{tokio::Listener, GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;

/// Creates the socket's directory (mode 0700) if needed and refuses one that other
/// users could enter or that belongs to someone else.
pub fn prepare_socket_dir(socket: &Path) -> anyhow::Result<()> {
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
        // `recursive` applies the mode to every new level, but the umask may narrow it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let meta =
        std::fs::metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        bail!(
            "refusing socket directory {}: it belongs to uid {}, not to you (uid {euid})",
            dir.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "refusing socket directory {}: its mode is {mode:04o}, it must be 0700 (run: chmod 700 {})",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Binds the control socket (mode 0600). A socket file left by a dead agentd is
/// replaced; a live agentd at the same path is an error.
pub fn bind(socket: &Path) -> anyhow::Result<Listener> {
    prepare_socket_dir(socket)?;
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                socket.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("agentd is already running at {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
    }
    let name = socket
        .to_fs_name::<GenericFilePath>()
        .context("invalid socket path")?;
    let listener = ListenerOptions::new()
        .name(name)
        .mode(0o600)
        .create_tokio()
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare_socket_dir(&open.join("s.sock"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be 0700"), "{err}");
    }

    #[test]
    fn missing_directories_are_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        prepare_socket_dir(&nested.join("s.sock")).unwrap();
        assert_eq!(std::fs::metadata(&nested).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn non_sockets_are_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("s.sock");
        std::fs::write(&path, "precious").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(async { bind(&path).map(|_| ()) })
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
