//! What the socket benchmarks share (`bench_enqueue`, `bench_status`): a line
//! connection, the bare echo server that is their baseline, and which of agentd's
//! threads answers `status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Conn {
    pub fn connect(path: &Path) -> Conn {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
        Conn {
            reader: BufReader::new(stream.try_clone().expect("clone the stream")),
            writer: stream,
            line: String::new(),
        }
    }

    /// Sends one line and reads one line back.
    pub fn round_trip(&mut self, request: &str) -> &str {
        self.writer
            .write_all(request.as_bytes())
            .expect("write a request");
        self.line.clear();
        self.reader.read_line(&mut self.line).expect("read a reply");
        &self.line
    }
}

/// The echo server: a process of its own (this program, run with `--serve-echo`),
/// so that it is scheduled like agentd is (a thread of the benchmark would share
/// the client's CPU and wake up faster than any other process can). One thread per
/// connection echoes lines.
pub struct EchoServer(std::process::Child);

impl EchoServer {
    pub fn start(path: &Path) -> EchoServer {
        EchoServer::start_as("--serve-echo", path)
    }

    /// The echo server that waits in `epoll` (one current-thread tokio runtime, a
    /// task per connection), as agentd does: the kernel wakes a process blocked in
    /// `read` on the waker's CPU more readily than one blocked in `epoll_wait`.
    #[allow(dead_code)] // bench_enqueue's figures
    pub fn start_epoll(path: &Path) -> EchoServer {
        EchoServer::start_as("--serve-echo-epoll", path)
    }

    fn start_as(mode: &str, path: &Path) -> EchoServer {
        let child = std::process::Command::new(std::env::current_exe().expect("own path"))
            .arg(mode)
            .arg(path)
            .spawn()
            .expect("start the echo server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(path).is_err() {
            assert!(Instant::now() < deadline, "the echo server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        EchoServer(child)
    }
}

impl EchoServer {
    #[allow(dead_code)] // bench_enqueue's placed figures
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// Pins every thread of process `pid` (the calling thread with `None`) to the CPUs
/// in `cpus`; false if the machine would not.
#[allow(dead_code)] // bench_enqueue's placed figures
pub fn pin(pid: Option<u32>, cpus: &[usize]) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it (checked).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let set_one = |tid: i32| {
        // SAFETY: a valid set of the size passed.
        unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
    };
    let Some(pid) = pid else {
        return set_one(0);
    };
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok())
        .all(set_one)
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn serve_echo(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind the echo socket");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { return };
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut writer = stream;
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if writer.write_all(line.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// The `epoll` echo server ([`EchoServer::start_epoll`]).
#[allow(dead_code)] // bench_enqueue's figures
pub fn serve_echo_epoll(path: &Path) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let listener = tokio::net::UnixListener::bind(path).expect("bind the echo socket");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (reader, mut writer) = stream.into_split();
                let mut reader = tokio::io::BufReader::new(reader);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            if writer.write_all(line.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// The thread of agentd `pid` that answers `status`: its fast lane (`agentd-fast`)
/// or connections' thread (`agentd-conn`) if it has one, else its main thread (a
/// build whose connections share the loop's current-thread runtime).
pub fn status_thread(pid: u32) -> u32 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| task.file_name().to_str()?.parse::<u32>().ok())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|comm| matches!(comm.trim(), "agentd-fast" | "agentd-conn"))
        })
        .unwrap_or(pid)
}
