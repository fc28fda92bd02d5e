//! A fast-lane connection's socket, registered with the fast lane's reactor for
//! readability only.
//!
//! tokio's `UnixStream` registers every socket for reading and writing
//! (edge-triggered). A Unix socket signals its writer's side each time the peer
//! reads what was written (the freed buffer wakes its waiters with `EPOLLOUT`), so
//! every answer a client read woke the fast lane's thread once more, for nothing
//! (`strace`: two `epoll_wait` returns per `status`, the second with `EPOLLOUT`
//! alone; `schedstat`: two runs per request). Here a write is tried at once, and
//! only when the socket is full (a client that does not read its answers) is the
//! socket registered for writability as well, for the rest of the connection.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

pub(super) struct FastStream {
    /// `None` only while being registered anew.
    fd: Option<AsyncFd<UnixStream>>,
    /// Registered for writability too (a write found the socket full once).
    writable: bool,
}

impl FastStream {
    /// Takes over a connection accepted on the fast lane's reactor (in its runtime).
    pub(super) fn new(stream: tokio::net::UnixStream) -> std::io::Result<FastStream> {
        let stream = stream.into_std()?;
        Ok(FastStream {
            fd: Some(register(stream, Interest::READABLE)?),
            writable: false,
        })
    }

    /// The socket, out of the fast lane's reactor (non-blocking).
    pub(super) fn into_std(mut self) -> std::io::Result<UnixStream> {
        Ok(self.fd()?.into_inner())
    }

    fn fd(&mut self) -> std::io::Result<AsyncFd<UnixStream>> {
        self.fd
            .take()
            .ok_or_else(|| std::io::Error::other("a fast-lane socket lost in registration"))
    }

    fn registered(&self) -> &AsyncFd<UnixStream> {
        self.fd
            .as_ref()
            .expect("a fast-lane socket is registered between calls")
    }

    /// Registers the socket for writability as well (its readiness comes back with
    /// the new registration: `epoll_ctl` reports what is ready at once).
    fn register_writable(&mut self) -> std::io::Result<()> {
        let stream = self.fd()?.into_inner();
        self.fd = Some(register(stream, Interest::READABLE | Interest::WRITABLE)?);
        self.writable = true;
        Ok(())
    }
}

impl AsyncRead for FastStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let fd = self.registered();
        loop {
            let mut guard = ready!(fd.poll_read_ready(cx))?;
            let space = buf.remaining();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|socket| socket.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read drained the socket (as tokio's own streams take
                    // it): the next read waits for the next edge instead of paying
                    // a read that ends in EAGAIN.
                    if n > 0 && n < space {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FastStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            if !self.writable {
                match send(self.registered().get_ref(), data) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.register_writable()?;
                        continue;
                    }
                    written => return Poll::Ready(written),
                }
            }
            let fd = self.registered();
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            match guard.try_io(|socket| send(socket.get_ref(), data)) {
                Ok(written) => return Poll::Ready(written),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self
            .registered()
            .get_ref()
            .shutdown(std::net::Shutdown::Write);
        Poll::Ready(Ok(()))
    }
}

/// One non-blocking `send`, without SIGPIPE for a peer that has gone.
fn send(socket: &UnixStream, data: &[u8]) -> std::io::Result<usize> {
    use nix::sys::socket::{send, MsgFlags};
    send(socket.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL).map_err(std::io::Error::from)
}

/// `stream` in the current runtime's reactor, for `interest`.
fn register(stream: UnixStream, interest: Interest) -> std::io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the stream owns its descriptor, which stays open and the same until
    // the `AsyncFd` gives the stream back (`into_inner`) or drops it.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn pair() -> (FastStream, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = tokio::net::UnixStream::from_std(ours).unwrap();
        (FastStream::new(ours).unwrap(), peer)
    }

    /// Reads that drain the socket in short reads still see what comes later
    /// (the readiness cleared after a short read is set again by the next edge).
    #[test]
    fn reads_what_arrives_in_pieces() {
        runtime().block_on(async {
            let (mut ours, peer) = pair();
            let writer = std::thread::spawn(move || {
                let mut peer = peer;
                for i in 0..50u8 {
                    peer.write_all(&[i]).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
                peer
            });
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < 50 {
                let n = tokio::time::timeout(Duration::from_secs(10), ours.read(&mut buf))
                    .await
                    .expect("a read woken by what the peer wrote")
                    .unwrap();
                assert!(n > 0, "no EOF before the peer closes");
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, (0..50u8).collect::<Vec<_>>());
            drop(writer.join().unwrap());
            let n = tokio::time::timeout(Duration::from_secs(10), ours.read(&mut buf))
                .await
                .expect("EOF once the peer closed")
                .unwrap();
            assert_eq!(n, 0);
        });
    }

    /// A write that finds the socket full waits for the peer to read (the socket
    /// registered for writability then) and goes on reading requests after it.
    #[test]
    fn a_write_to_a_full_socket_completes_once_the_peer_reads() {
        runtime().block_on(async {
            let (mut ours, peer) = pair();
            // Far more than a socket's buffer holds.
            let data: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
            let expected = data.clone();
            let reader;
            {
                let mut write = Box::pin(ours.write_all(&data));
                let pending = std::future::poll_fn(|cx| {
                    Poll::Ready(std::future::Future::poll(write.as_mut(), cx).is_pending())
                })
                .await;
                assert!(pending, "the write waits for the peer");
                reader = std::thread::spawn(move || {
                    let mut peer = peer;
                    let mut got = vec![0u8; expected.len()];
                    peer.read_exact(&mut got).unwrap();
                    assert!(got == expected, "the bytes arrive whole and in order");
                    peer.write_all(b"next\n").unwrap();
                    peer
                });
                tokio::time::timeout(Duration::from_secs(30), write)
                    .await
                    .expect("the write woken by the peer's reads")
                    .unwrap();
            }
            assert!(
                ours.writable,
                "the full socket was registered for writability"
            );
            let mut line = [0u8; 5];
            tokio::time::timeout(Duration::from_secs(10), ours.read_exact(&mut line))
                .await
                .expect("a read after the writable registration")
                .unwrap();
            assert_eq!(&line, b"next\n");
            drop(reader.join().unwrap());
        });
    }

    /// Handed over, the socket leaves this reactor intact: what the peer sent is
    /// still there to read.
    #[test]
    fn into_std_keeps_the_connection() {
        runtime().block_on(async {
            let (ours, mut peer) = pair();
            peer.write_all(b"ping\n").unwrap();
            let mut std = ours.into_std().unwrap();
            std.set_nonblocking(false).unwrap();
            let mut line = [0u8; 5];
            std.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"ping\n");
        });
    }
}
