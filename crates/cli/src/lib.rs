//! `agentctl`, the command-line client of agentd, and a reusable control-socket client.
//!
//! - [`client`]: [`Client`], a blocking client for the control socket (connect,
//!   `hello`, requests matched by id). Integration tests and bridges can use it.
//! - [`args`]: the command line as clap types.
//! - [`render`]: pure functions that turn answers into the human-readable output.
//! - [`main`] / [`run`] / [`execute`]: the program itself; `bin/agentctl.rs` only calls
//!   [`main`].
//!
//! Output: on success the human-readable answer (or, with `--json`, exactly the
//! response's `result` as one compact JSON line) on stdout. On failure one line
//! `agentctl: <error>` on stderr and a non-zero exit code, one of the `EXIT_*`
//! constants; with `--json`, an error answered by agentd is also printed on stdout as
//! `{"code":…,"message":…}`. A closed stdout (broken pipe) ends agentctl quietly with
//! [`EXIT_OK`].

pub mod args;
pub mod client;
pub mod render;

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use agentd_proto::control::{PingReply, RequestBody, SendReply, StatusReply, StopReply, TaskView};
use clap::Parser;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use args::{Cli, Command};
pub use client::{Client, ClientError};

/// Success (also when stdout was closed early).
pub const EXIT_OK: u8 = 0;
/// agentd answered with an error (not found, queue full, unsupported protocol…).
pub const EXIT_DAEMON_ERROR: u8 = 1;
/// The command line is wrong (clap's usage errors).
pub const EXIT_USAGE: u8 = 2;
/// agentd is not running or its socket cannot be connected to.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Anything else: no answer in time, connection lost, an answer that cannot be
/// understood, output that cannot be written.
pub const EXIT_FAILURE: u8 = 4;

/// The entry point of the `agentctl` binary: [`run`] with the process arguments.
pub fn main() -> ExitCode {
    run(std::env::args_os())
}

/// Parses `args` (program name first) and runs the command on the real stdout and
/// stderr. Usage errors, `--help` and `--version` are printed by clap.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout; a closed stdout is not an error.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    let code = execute(&cli, &mut io::stdout().lock(), &mut io::stderr().lock());
    ExitCode::from(code)
}

/// Runs a parsed command line, writing output to `out` and the error line to `err`;
/// returns the exit code.
pub fn execute(cli: &Cli, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let result = dispatch(cli, out).and_then(|()| out.flush().map_err(RunError::Output));
    match result {
        Ok(()) => EXIT_OK,
        Err(RunError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(RunError::Client(e)) => {
            if cli.json {
                if let Some(body) = e.error_body() {
                    if let Ok(json) = serde_json::to_string(body) {
                        let _ = writeln!(out, "{json}").and_then(|()| out.flush());
                    }
                }
            }
            let _ = writeln!(err, "agentctl: {e}");
            e.exit_code()
        }
        Err(e @ RunError::Output(_)) => {
            let _ = writeln!(err, "agentctl: {e}");
            EXIT_FAILURE
        }
    }
}

/// Why [`execute`] failed.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot write output: {0}")]
    Output(#[source] io::Error),
}

fn dispatch(cli: &Cli, out: &mut dyn Write) -> Result<(), RunError> {
    let socket = cli.socket_path();
    let ctx = Ctx {
        socket: &socket,
        json: cli.json,
    };
    let now = SystemTime::now;
    match &cli.command {
        Command::Send(_) => ctx.one_shot(&cli.command, out, |r: SendReply| render::render_send(&r)),
        Command::Status(a) if a.task_id.is_some() => {
            ctx.one_shot(&cli.command, out, |t: TaskView| {
                render::render_task(&t, now())
            })
        }
        Command::Status(_) => ctx.one_shot(&cli.command, out, |s: StatusReply| {
            render::render_status(&s, now())
        }),
        Command::Tasks(_) => ctx.one_shot(&cli.command, out, |t: Vec<TaskView>| {
            render::render_tasks(&t, now())
        }),
        Command::Stop(_) => ctx.one_shot(&cli.command, out, |s: StopReply| render::render_stop(&s)),
        Command::Ping => ctx.one_shot(&cli.command, out, |p: PingReply| {
            render::render_ping(&p, &socket)
        }),
    }
}

/// What every command needs.
struct Ctx<'a> {
    socket: &'a Path,
    json: bool,
}

impl Ctx<'_> {
    /// Connects, sends the command's one request, and prints its result: as JSON, or
    /// decoded as `T` and rendered.
    fn one_shot<T: DeserializeOwned>(
        &self,
        command: &Command,
        out: &mut dyn Write,
        render: impl FnOnce(T) -> String,
    ) -> Result<(), RunError> {
        let body = command.request().ok_or_else(|| {
            ClientError::BadResponse("this command is not a single request".into())
        })?;
        let value = self.request(body)?;
        let text = if self.json {
            serde_json::to_string(&value).map_err(|e| ClientError::BadResponse(e.to_string()))?
        } else {
            let typed: T = serde_json::from_value(value)
                .map_err(|e| ClientError::BadResponse(e.to_string()))?;
            render(typed)
        };
        writeln!(out, "{text}").map_err(RunError::Output)
    }

    fn request(&self, body: RequestBody) -> Result<Value, ClientError> {
        Client::connect(self.socket)?.request(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::control::{
        Capacity, ErrorCode, HelloReply, Request, Response, TaskState, CONTROL_PROTOCOL_VERSION,
    };
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::thread;

    /// A fake agentd that answers `hello` and then one request with `answer`.
    fn fake_agentd(
        answer: impl FnOnce(Request) -> Response + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut next = || -> Request {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                serde_json::from_str(&line).unwrap()
            };
            let hello = next();
            let reply = Response::ok(
                hello.id,
                HelloReply {
                    protocol: CONTROL_PROTOCOL_VERSION,
                    server: "agentd 0.1.0".into(),
                },
            );
            writeln!(writer, "{}", serde_json::to_string(&reply).unwrap()).unwrap();
            let request = next();
            let reply = answer(request);
            writeln!(writer, "{}", serde_json::to_string(&reply).unwrap()).unwrap();
        });
        (dir, path, handle)
    }

    /// Runs agentctl with `args` against `socket`; returns (exit code, stdout, stderr).
    fn agentctl(socket: &Path, args: &[&str]) -> (u8, String, String) {
        let mut argv: Vec<OsString> = vec!["agentctl".into(), "--socket".into()];
        argv.push(socket.into());
        argv.extend(args.iter().map(OsString::from));
        let cli = Cli::try_parse_from(argv).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = execute(&cli, &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn not_running_is_one_line_and_exit_3() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agentd.sock");
        let (code, out, err) = agentctl(&socket, &["status"]);
        assert_eq!(code, EXIT_UNREACHABLE);
        assert_eq!(out, "");
        assert_eq!(
            err,
            format!(
                "agentctl: agentd is not running at {} (no socket)\n",
                socket.display()
            )
        );
    }

    #[test]
    fn stop_with_nothing_to_stop() {
        let (_dir, socket, server) = fake_agentd(|request| {
            assert_eq!(
                request.body,
                RequestBody::Stop {
                    task_id: None,
                    session: None,
                    all: true
                }
            );
            Response::ok(request.id, StopReply { stopped: vec![] })
        });
        let (code, out, err) = agentctl(&socket, &["stop", "--all"]);
        server.join().unwrap();
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (0, "nothing to stop\n", "")
        );
    }

    #[test]
    fn send_prints_the_task_line() {
        let (_dir, socket, server) = fake_agentd(|request| {
            let RequestBody::Send { session, text, .. } = &request.body else {
                panic!("not a send: {request:?}");
            };
            assert_eq!(
                (session.as_str(), text.as_str()),
                ("alice", "fix the build")
            );
            let task = TaskView {
                task_id: "t-1".into(),
                session: session.clone(),
                state: TaskState::Queued,
                position: Some(2),
                pid: None,
                created_at: "2024-05-01T10:00:00Z".into(),
                started_at: None,
                finished_at: None,
                text: text.clone(),
                progress: None,
                result: None,
                exit: None,
            };
            Response::ok(
                request.id,
                SendReply {
                    reply: "queued".into(),
                    accepted: true,
                    task: Some(task),
                    capacity: Some(Capacity { busy: 2, max: 2 }),
                    command: None,
                    data: None,
                },
            )
        });
        let (code, out, _) = agentctl(
            &socket,
            &["send", "--session", "alice", "fix", "the", "build"],
        );
        server.join().unwrap();
        assert_eq!(code, EXIT_OK);
        assert_eq!(out, "task t-1  queued: position 2 (2/2 agents busy)\n");
    }

    #[test]
    fn json_prints_the_result_verbatim() {
        let (_dir, socket, server) = fake_agentd(|request| {
            Response::ok(
                request.id,
                serde_json::json!({"pong": true, "version": "0.1.0", "pid": 9, "uptime_ms": 5}),
            )
        });
        let (code, out, err) = agentctl(&socket, &["ping", "--json"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_OK, "{err}");
        let printed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            printed,
            serde_json::json!({"pong": true, "version": "0.1.0", "pid": 9, "uptime_ms": 5})
        );
        assert!(out.ends_with("}\n") && out.lines().count() == 1, "{out}");
    }

    #[test]
    fn daemon_errors_exit_1_and_json_prints_the_error_object() {
        for json in [false, true] {
            let (_dir, socket, server) = fake_agentd(|request| {
                Response::err(Some(request.id), ErrorCode::NotFound, "no task t-9")
            });
            let args: &[&str] = if json {
                &["status", "t-9", "--json"]
            } else {
                &["status", "t-9"]
            };
            let (code, out, err) = agentctl(&socket, args);
            server.join().unwrap();
            assert_eq!(code, EXIT_DAEMON_ERROR);
            assert_eq!(err, "agentctl: no task t-9\n");
            let expected_out = if json {
                "{\"code\":\"not_found\",\"message\":\"no task t-9\"}\n"
            } else {
                ""
            };
            assert_eq!(out, expected_out);
        }
    }

    #[test]
    fn an_unexpected_answer_exits_4() {
        let (_dir, socket, server) =
            fake_agentd(|request| Response::ok(request.id, "not a status"));
        let (code, out, err) = agentctl(&socket, &["status"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_FAILURE);
        assert_eq!(out, "");
        assert!(
            err.starts_with("agentctl: unexpected answer from agentd: "),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);
    }

    /// A stdout that is closed.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_closed_stdout_exits_0_quietly() {
        let (_dir, socket, server) =
            fake_agentd(|request| Response::ok(request.id, serde_json::json!([])));
        let cli = Cli::try_parse_from(
            ["agentctl", "tasks", "--socket"]
                .into_iter()
                .map(OsString::from)
                .chain([socket.clone().into_os_string()]),
        )
        .unwrap();
        let mut err = Vec::new();
        let code = execute(&cli, &mut ClosedPipe, &mut err);
        server.join().unwrap();
        assert_eq!(code, EXIT_OK);
        assert!(err.is_empty());
    }
}
