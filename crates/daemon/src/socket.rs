//! The control socket: a private directory, a stale-socket check, the listener, and
//! its re-creation when the file is removed while agentd runs.
//!
//! **Invariant:** only the agentd that bound a socket file re-creates or removes it.
//! [`SocketFile`] remembers the file's device and inode; a path that now holds a
//! different file (another agentd took over after a tmp cleaner removed ours) is left
//! alone.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// A bound control socket: its listener and its file.
pub struct Bound {
    pub listener: Listener,
    pub file: SocketFile,
}

/// The socket file this agentd bound, by path and identity. Clones share the
/// identity, so the one that removes the file at exit knows a re-created one.
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    /// (device, inode) of the file we bound last.
    ident: Arc<Mutex<(u64, u64)>>,
    /// Whether we already said that someone else's file is at our path.
    foreign_logged: bool,
}

fn ident(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ours(&self) -> (u64, u64) {
        *self.ident.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the file at the path is still the one we bound.
    pub fn is_ours(&self) -> bool {
        ident(&self.path).is_ok_and(|id| id == self.ours())
    }

    /// Checks the socket file; if it is gone (with or without its directory), creates
    /// the directory (0700) and binds a new listener, which the caller serves from
    /// now on. A different file at the path is left alone.
    pub fn ensure(&mut self) -> Option<Listener> {
        match ident(&self.path) {
            Ok(id) if id == self.ours() => None,
            Ok(_) => {
                if !self.foreign_logged {
                    self.foreign_logged = true;
                    tracing::warn!(
                        "the control socket {} was replaced by another file (another agentd?); leaving it alone. This agentd is reachable only through connections already open",
                        self.path.display()
                    );
                }
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match bind(&self.path) {
                Ok(bound) => {
                    tracing::warn!(
                        "the control socket {} was removed; re-created it",
                        self.path.display()
                    );
                    *self.ident.lock().unwrap_or_else(|e| e.into_inner()) = bound.file.ours();
                    self.foreign_logged = false;
                    Some(bound.listener)
                }
                Err(e) => {
                    tracing::warn!(
                        "the control socket {} was removed and cannot be re-created yet: {e:#}",
                        self.path.display()
                    );
                    None
                }
            },
            Err(e) => {
                tracing::debug!(
                    "cannot check the control socket {}: {e}",
                    self.path.display()
                );
                None
            }
        }
    }

    /// Removes the socket file if it is still ours (at exit).
    pub fn remove_if_ours(&self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the control socket (mode 0600). A socket file left by a dead agentd is
/// replaced; a live agentd at the same path is an error. Dropping the listener does
/// not remove the file (see [`SocketFile::remove_if_ours`]).
pub fn bind(socket: &Path) -> anyhow::Result<Bound> {
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
        // A replaced listener must not unlink the file that replaced it.
        .reclaim_name(false)
        .create_tokio()
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let ident = ident(socket).with_context(|| format!("cannot inspect {}", socket.display()))?;
    Ok(Bound {
        listener,
        file: SocketFile {
            path: socket.to_path_buf(),
            ident: Arc::new(Mutex::new(ident)),
            foreign_logged: false,
        },
    })
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
