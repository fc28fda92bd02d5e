//! `agentd`: the supervisor daemon. Parses flags and the config file, binds the control
//! socket, installs signal handling, and runs [`agentd_daemon::run`].

use std::process::ExitCode;
use std::time::Duration;

use agentd_daemon::args::Args;
use agentd_daemon::config::{self, ControlSettings, DaemonConfig, FileConfig};
use agentd_daemon::control::{Endpoint, Limits};
use agentd_daemon::supervisor::DaemonSignal;
use anyhow::{bail, Context};
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::mpsc;

// mimalloc rather than glibc malloc: after a large queue came and went, glibc's free
// lists made every small reply pay for consolidating them (scripts/bench-enqueue.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The resolved config, and how to log.
struct Resolved {
    config: DaemonConfig,
    log_format: config::LogFormat,
}

fn resolve(args: Args) -> anyhow::Result<Resolved> {
    let file_path = config::config_file(args.config.as_deref());
    let file = match &file_path {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let log_format = match (args.log_format, &file.log_format) {
        (Some(format), _) => format,
        (None, Some(text)) => config::LogFormat::parse(text)?,
        (None, None) => config::LogFormat::default(),
    };
    let duration = |flag: Option<Duration>,
                    key: &Option<String>,
                    default: Duration|
     -> anyhow::Result<Duration> {
        match (flag, key) {
            (Some(d), _) => Ok(d),
            (None, Some(text)) => config::parse_duration(text),
            (None, None) => Ok(default),
        }
    };
    let control = control_settings(&args.max_connections, &args.request_timeout, &file)?;
    let agent_command = |line: &str| {
        let words = config::parse_agent_command(line)?;
        config::check_agent_program(&words).map_err(anyhow::Error::msg)?;
        anyhow::Ok(words)
    };
    let agent = match (&args.agent, &file.agent, &file_path) {
        (Some(line), _, _) => agent_command(line).context("invalid --agent")?,
        (None, Some(line), Some(path)) => {
            agent_command(line).map_err(|e| config::key_error(path, "agent", e))?
        }
        (None, Some(line), None) => agent_command(line).context("invalid agent")?,
        (None, None, _) => {
            let words = config::default_agent_command();
            config::check_agent_program(&words)
                .map_err(anyhow::Error::msg)
                .context(agentd_proto::text::DEFAULT_AGENT)?;
            words
        }
    };
    let max_concurrent = args.max_concurrent.or(file.max_concurrent).unwrap_or(2);
    if max_concurrent == 0 {
        bail!("--max-concurrent must be at least 1");
    }
    let defaults = agentd_core::QueueSettings::default();
    let queue = agentd_core::QueueSettings {
        mode: match (args.queue_mode, &file.queue_mode) {
            (Some(mode), _) => mode,
            (None, Some(text)) => config::parse_mode(text)?,
            (None, None) => defaults.mode,
        },
        debounce: duration(args.debounce, &file.debounce, defaults.debounce)?,
        cap: args.cap.or(file.cap).unwrap_or(defaults.cap),
        drop: match (args.drop, &file.drop) {
            (Some(drop), _) => drop,
            (None, Some(text)) => config::parse_drop(text)?,
            (None, None) => defaults.drop,
        },
    };
    if queue.cap == 0 {
        bail!("--cap must be at least 1");
    }
    let queue_timeout = match (args.queue_timeout, &file.queue_timeout) {
        (Some(d), _) => Some(d),
        (None, Some(text)) => Some(config::parse_duration(text)?),
        (None, None) => None,
    };
    let dispatch = agentd_core::Config {
        max_concurrent,
        max_background: args.max_background.or(file.max_background),
        cancel_grace: duration(
            args.cancel_grace,
            &file.cancel_grace,
            Duration::from_secs(5),
        )?,
        term_grace: duration(args.term_grace, &file.term_grace, Duration::from_secs(5))?,
        queue,
        max_queued: args.max_queued.or(file.max_queued).unwrap_or(1000),
        queue_timeout,
        dedup_window: 10_000,
        collected_prompts: config::agent_wants_collected_prompts(&agent),
    };
    let limits = config::AgentLimits::default();
    let heartbeat = duration(args.heartbeat, &file.heartbeat, limits.heartbeat)?;
    if heartbeat.is_zero() {
        bail!("--heartbeat must be more than 0");
    }
    let limit = |flag: Option<config::Limit>,
                 key: &Option<String>,
                 default: Option<Duration>|
     -> anyhow::Result<Option<Duration>> {
        match (flag, key) {
            (Some(d), _) => Ok(d.0),
            (None, Some(text)) => config::parse_limit(text).map(|l| l.0),
            (None, None) => Ok(default),
        }
    };
    let hung_after = limit(
        args.hung_after,
        &file.hung_after,
        Some(agentd_core::Liveness::default_hung_after(heartbeat)),
    )?;
    if let Some(hung_after) = hung_after {
        agentd_core::Liveness::check_hung_after(heartbeat, hung_after).map_err(|e| {
            match (&args.hung_after, &file.hung_after, &file_path) {
                (None, Some(_), Some(path)) => config::key_error(path, "hung-after", e),
                _ => anyhow::anyhow!("--hung-after: {e}"),
            }
        })?;
    }
    let agents = config::AgentLimits {
        no_cgroup: args.no_cgroup || file.no_cgroup.unwrap_or(false),
        heartbeat,
        hung_after,
        task_timeout: limit(args.task_timeout, &file.task_timeout, None)?,
        frame_timeout: duration(
            args.frame_timeout,
            &file.frame_timeout,
            limits.frame_timeout,
        )?,
    };
    if agents.frame_timeout.is_zero() {
        bail!("--frame-timeout must be more than 0");
    }
    if agents.task_timeout.is_some_and(|d| d.is_zero()) {
        bail!("--task-timeout must be more than 0 (or off)");
    }
    let config = DaemonConfig {
        agents,
        socket: args
            .socket
            .or(file.socket)
            .unwrap_or_else(agentd_proto::paths::default_socket_path),
        state_dir: args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(config::default_state_dir),
        dispatch,
        handshake_timeout: duration(
            args.handshake_timeout,
            &file.handshake_timeout,
            Duration::from_secs(10),
        )?,
        agent,
        history: file.history.unwrap_or(1000),
        log_cap: args
            .log_cap
            .or(file.log_cap)
            .unwrap_or(agentd_store::output::DEFAULT_LOG_CAP),
        retention: agentd_store::Retention {
            max_age: Some(duration(
                args.retention_age,
                &file.retention_age,
                Duration::from_secs(30 * 24 * 3600),
            )?),
            max_finished: Some(
                args.retention_count
                    .or(file.retention_count)
                    .unwrap_or(10_000),
            ),
        },
        control,
    };
    Ok(Resolved { config, log_format })
}

fn control_settings(
    max_connections: &Option<usize>,
    request_timeout: &Option<Duration>,
    file: &FileConfig,
) -> anyhow::Result<ControlSettings> {
    let defaults = ControlSettings::default();
    let max_connections = max_connections
        .or(file.max_connections)
        .unwrap_or(defaults.max_connections);
    if max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let request_timeout = match (request_timeout, &file.request_timeout) {
        (Some(d), _) => *d,
        (None, Some(text)) => config::parse_duration(text)?,
        (None, None) => defaults.request_timeout,
    };
    if request_timeout.is_zero() {
        bail!("--request-timeout must be more than 0");
    }
    Ok(ControlSettings {
        max_connections,
        request_timeout,
    })
}

/// Every connection is a descriptor: raises the soft RLIMIT_NOFILE to the hard limit,
/// and lowers `max_connections` if the limit still cannot hold them (with room for
/// agents' channels and logs).
fn fit_descriptors(settings: &mut ControlSettings) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    const RESERVED: u64 = 256;
    let room = usize::try_from(limit.saturating_sub(RESERVED).max(16)).unwrap_or(usize::MAX);
    if settings.max_connections > room {
        tracing::warn!(
            "max-connections {} exceeds what the descriptor limit {limit} allows; using {room}",
            settings.max_connections
        );
        settings.max_connections = room;
    }
}

/// SIGHUP: re-reads the config file and applies the settings that can change while
/// agentd runs (max-connections, request-timeout); flags still win over the file.
fn reload(args: &Args, limits: &Limits) {
    let Some(path) = config::config_file(args.config.as_deref()) else {
        tracing::info!(
            "SIGHUP: no config file to reload (no --config, and no default config file); carrying on"
        );
        return;
    };
    let settings = FileConfig::load(&path).and_then(|file| {
        // The whole file must still be valid, though only part of it applies now.
        resolve(Args {
            config: Some(path.clone()),
            ..args.clone()
        })?;
        control_settings(&args.max_connections, &args.request_timeout, &file)
    });
    match settings {
        Ok(mut settings) => {
            fit_descriptors(&mut settings);
            limits.update(&settings);
            tracing::info!(
                "SIGHUP: reloaded {}: max-connections {}, request-timeout {} apply now; other settings take effect at restart",
                path.display(),
                settings.max_connections,
                humantime::format_duration(settings.request_timeout)
            );
        }
        Err(e) => tracing::warn!("SIGHUP: kept the settings in force: {e:#}"),
    }
}

/// Forwards SIGTERM and SIGINT to the supervisor from a dedicated thread, and
/// handles SIGHUP there (a closed terminal must not take agentd down). SIGCHLD, one
/// per task, goes to the loop's own reactor instead (`child_signals`): no thread
/// between the signal and the reaper.
fn signal_thread(
    args: Args,
    limits: std::sync::Arc<Limits>,
    tx: mpsc::UnboundedSender<DaemonSignal>,
) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let event = match signal {
                    SIGHUP => {
                        reload(&args, &limits);
                        continue;
                    }
                    _ => DaemonSignal::Shutdown,
                };
                if tx.send(event).is_err() {
                    break;
                }
            }
        })?;
    Ok(())
}

/// Blocks SIGCHLD in the calling thread. Called first in `main`, while agentd has
/// one thread, so every thread started later inherits the block: SIGCHLD then waits,
/// pending, for `child_signals`' signalfd instead of interrupting a thread to run a
/// handler. Agents start with an empty mask all the same (`agentd_spawn` sets it in
/// the child; `std::process::Command`, which starts the guardian, resets it too).
fn block_child_signals() -> anyhow::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGCHLD);
    set.thread_block().context("cannot block SIGCHLD")?;
    Ok(())
}

/// Forwards SIGCHLD to the supervisor from the loop's own runtime: a signalfd
/// (SIGCHLD is blocked in every thread, `block_child_signals`) in the loop's
/// reactor. Only a wake-up; `agentd_proc::reap_children` on the loop stays the one
/// reaper. Measured against a handler writing to a pipe the reactor watches
/// (tokio's signal driver): the signal frame, the handler, its `write`, `sigreturn`
/// and the driver's reads were about 4% of the loop's CPU per trivial task. Call it
/// inside the runtime, before the first child is spawned.
fn child_signals(tx: mpsc::UnboundedSender<DaemonSignal>) -> anyhow::Result<()> {
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGCHLD);
    let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("cannot open a signalfd for SIGCHLD")?;
    // SAFETY: the SignalFd owns its descriptor and closes it only when dropped,
    // which is when the AsyncFd is: it stays open, and the same, while registered.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("cannot watch the SIGCHLD signalfd: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = fd.readable().await else {
                break;
            };
            // SIGCHLDs coalesce (one is pending at most): one wake-up of the reaper
            // for whatever exited meanwhile.
            let mut child = false;
            loop {
                match ready.get_inner().read_signal() {
                    Ok(Some(_)) => child = true,
                    Ok(None) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        // Not seen yet: the loop's tick reaps meanwhile.
                        tracing::warn!("cannot read the SIGCHLD signalfd: {e}");
                        ready.clear_ready();
                        break;
                    }
                }
            }
            if child && tx.send(DaemonSignal::Child).is_err() {
                break;
            }
        }
    });
    Ok(())
}

fn main_inner() -> anyhow::Result<()> {
    // Still one thread: the environment may change safely, and the signal mask set
    // here is every later thread's.
    block_child_signals()?;
    // agentd's heap grows by small allocations as the queue does: with transparent
    // huge pages each new 2 MiB region was zeroed whole on first touch (on the loop
    // thread, 12-14% of its time per durable send while the queue grew, and about
    // twice the resident memory). Agents still get them as agentd was started.
    if let Err(e) = agentd_spawn::disable_thp_for_this_process() {
        eprintln!("agentd: cannot turn transparent huge pages off: {e}");
    }
    agentd_daemon::notify::take_socket_from_env();
    let args = Args::parse();
    let Resolved {
        mut config,
        log_format,
    } = resolve(args.clone()).map_err(ConfigError)?;
    init_logging(log_format).map_err(ConfigError)?;
    // The state dir, then the single-instance lock, before the socket or the store
    // is touched: a second agentd on the same state dir stops here.
    agentd_store::prepare_state_dir(&config.state_dir)
        .with_context(|| format!("cannot use the state dir {}", config.state_dir.display()))?;
    let _lock = match agentd_store::InstanceLock::acquire(&config.state_dir) {
        Ok(lock) => lock,
        Err(e @ agentd_store::LockError::Held { .. }) => {
            return Err(AlreadyRunning(e.to_string()).into())
        }
        Err(e) => return Err(e.into()),
    };
    // SAFETY: mi_collect has no preconditions; it frees what mimalloc holds unused.
    agentd_daemon::set_release_free_memory(|| unsafe { libmimalloc_sys::mi_collect(true) });
    let store = agentd_daemon::durable::open(&config)?;
    agentd_proc_subreaper()?;
    fit_descriptors(&mut config.control);
    let limits = Limits::new(&config.control);
    let (signal_tx, signals) = mpsc::unbounded_channel();
    signal_thread(args, limits.clone(), signal_tx.clone())?;
    // One thread: the supervisor loop never blocks, and agents are forked from the
    // main thread, which lives as long as agentd (their parent-death signal is tied to it).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = config.socket.clone();
    runtime.block_on(async {
        child_signals(signal_tx)?;
        let bound = agentd_daemon::socket::bind(&socket)?;
        let file = bound.file;
        let endpoint = Endpoint {
            listener: bound.listener,
            socket: Some(file.clone()),
            limits,
        };
        let result =
            agentd_daemon::run(config, store, endpoint, signals, std::future::pending()).await;
        // Only the agentd that bound the socket removes it (never one that found
        // another agentd already running there, nor one whose file was replaced).
        file.remove_if_ours();
        result
    })
}

/// The log filter: `$AGENTD_LOG`, else `$RUST_LOG`, else `info` (both take
/// `tracing-subscriber` directives: `debug`, `agentd_daemon=trace,info`…).
fn log_filter() -> anyhow::Result<tracing_subscriber::EnvFilter> {
    for var in ["AGENTD_LOG", "RUST_LOG"] {
        match std::env::var(var) {
            Ok(value) if !value.trim().is_empty() => {
                // The parse error's own text already ends with its cause's: not
                // chained, or the line would say it twice.
                return tracing_subscriber::EnvFilter::builder()
                    .parse(&value)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "invalid ${var} {}: {e}",
                            agentd_daemon::logfmt::Quoted(&value)
                        )
                    });
            }
            _ => {}
        }
    }
    Ok(tracing_subscriber::EnvFilter::new("info"))
}

/// Logs to stderr (the journal under systemd), one event per line: plain
/// `key=value` fields, or one JSON object.
fn init_logging(format: config::LogFormat) -> anyhow::Result<()> {
    let filter = log_filter()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(agentd_daemon::logfmt::Clock)
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    Ok(())
}

fn agentd_proc_subreaper() -> anyhow::Result<()> {
    agentd_daemon::supervisor::become_subreaper().context("cannot become a child subreaper")
}

/// A configuration error (a flag's value, the config file, the agent program): exit
/// with [`config::EXIT_CONFIG`].
#[derive(Debug)]
struct ConfigError(anyhow::Error);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Another agentd holds the state dir: exit with [`agentd_store::EXIT_ALREADY_RUNNING`].
#[derive(Debug)]
struct AlreadyRunning(String);

impl std::fmt::Display for AlreadyRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AlreadyRunning {}

fn main() -> ExitCode {
    match main_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<AlreadyRunning>() => {
            eprintln!("agentd: {e}");
            ExitCode::from(agentd_store::EXIT_ALREADY_RUNNING)
        }
        Err(e) if e.is::<ConfigError>() => {
            eprintln!("agentd: {e}");
            ExitCode::from(config::EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("agentd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
