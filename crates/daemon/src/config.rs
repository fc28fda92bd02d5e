//! Daemon configuration: flags, an optional TOML file, and defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentd_proto::config_text;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::logfmt::Quoted;

/// Everything the daemon needs to run, resolved.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Limits, graces and queue defaults of the dispatcher.
    pub dispatch: agentd_core::Config,
    /// How long an agent may take to send its Hello.
    pub handshake_timeout: Duration,
    /// The agent command line, split into words; `{text}` is replaced by the task text.
    pub agent: Vec<String>,
    /// How many finished tasks to keep in memory (older ones are read from the store).
    pub history: usize,
    /// Most bytes kept of one task's output log (then a truncation marker).
    pub log_cap: u64,
    /// Containment, liveness and limits on what an agent may send.
    pub agents: AgentLimits,
    /// How long, and how many, finished tasks (and their logs) the store keeps.
    pub retention: agentd_store::Retention,
    /// Limits of the control socket (SIGHUP reloads them).
    pub control: ControlSettings,
}

/// How agents are contained and watched (`agentd --no-cgroup`, `--heartbeat`,
/// `--hung-after`, `--task-timeout`, `--frame-timeout`).
#[derive(Debug, Clone)]
pub struct AgentLimits {
    /// Use the process-tree fallback even where a cgroup could be had.
    pub no_cgroup: bool,
    /// How often agents heartbeat (told to them in `AGENTD_HEARTBEAT_MS`).
    pub heartbeat: Duration,
    /// An agent silent this long is hung and stopped (`None`: never).
    pub hung_after: Option<Duration>,
    /// A task running this long is timed out and stopped (`None`: no limit).
    pub task_timeout: Option<Duration>,
    /// A frame from an agent that has begun must complete within this.
    pub frame_timeout: Duration,
}

impl Default for AgentLimits {
    fn default() -> AgentLimits {
        let heartbeat = Duration::from_secs(2);
        AgentLimits {
            no_cgroup: false,
            heartbeat,
            hung_after: Some(agentd_core::Liveness::default_hung_after(heartbeat)),
            task_timeout: None,
            frame_timeout: Duration::from_secs(10),
        }
    }
}

/// Limits of the control socket's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSettings {
    /// Most client connections open at once (idle ones count); past it a new
    /// connection gets `too_many_connections` and is closed.
    pub max_connections: usize,
    /// How long a request line may take from its first byte to its newline.
    pub request_timeout: Duration,
}

/// Default of [`ControlSettings::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// Default of [`ControlSettings::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ControlSettings {
    fn default() -> ControlSettings {
        ControlSettings {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// The TOML file (`--config FILE`, else [`default_config_path`] if it exists). Every
/// key is optional; flags win over the file. `examples/config.toml` lists every key
/// with its default (a test checks it against this struct).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub max_concurrent: Option<u32>,
    pub cancel_grace: Option<String>,
    pub term_grace: Option<String>,
    pub handshake_timeout: Option<String>,
    pub agent: Option<String>,
    pub history: Option<usize>,
    pub log_cap: Option<u64>,
    pub retention_age: Option<String>,
    pub retention_count: Option<u64>,
    pub queue_mode: Option<String>,
    pub debounce: Option<String>,
    pub cap: Option<u32>,
    pub drop: Option<String>,
    pub max_queued: Option<u32>,
    pub max_background: Option<u32>,
    pub queue_timeout: Option<String>,
    pub no_cgroup: Option<bool>,
    pub heartbeat: Option<String>,
    pub hung_after: Option<String>,
    pub task_timeout: Option<String>,
    pub frame_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub request_timeout: Option<String>,
    /// `text` (one line of plain fields per event) or `json` (one JSON object a line).
    pub log_format: Option<String>,
    /// `[matrix]`: agentd-matrix's settings, which share this file (read by the
    /// bridge, not by agentd).
    pub matrix: Option<toml::Table>,
}

impl FileConfig {
    /// Reads and checks a config file. Errors name the file, and the line of the
    /// offending key (TOML syntax, an unknown key, a wrong type, or a value such as a
    /// duration or a mode that does not parse).
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        FileConfig::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses and checks the text of a config file (see [`FileConfig::load`]).
    pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            // toml's own message spans several lines (it quotes the source); a log
            // line and an error line want one.
            let message = e.message().trim_end();
            let (line, key) = config_text::error_place(text, message, e.span().map(|s| s.start));
            let line = line.map(|n| format!("line {n}: ")).unwrap_or_default();
            let key = key.map(|key| format!("{key}: ")).unwrap_or_default();
            anyhow::anyhow!("{line}{key}{message}")
        })?;
        file.check()
            .map_err(|(key, e)| match config_text::key_line(text, None, key) {
                Some(n) => anyhow::anyhow!("line {n}: {key}: {e:#}"),
                None => anyhow::anyhow!("{key}: {e:#}"),
            })?;
        Ok(file)
    }

    /// Every key the file may hold, as written in it.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(FileConfig::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Checks the values whose type TOML cannot check: durations, names, numbers
    /// that must not be 0, the agent command. Returns the offending key.
    fn check(&self) -> Result<(), (&'static str, anyhow::Error)> {
        let durations = [
            ("cancel-grace", &self.cancel_grace),
            ("term-grace", &self.term_grace),
            ("handshake-timeout", &self.handshake_timeout),
            ("debounce", &self.debounce),
            ("queue-timeout", &self.queue_timeout),
            ("request-timeout", &self.request_timeout),
            ("heartbeat", &self.heartbeat),
            ("frame-timeout", &self.frame_timeout),
            ("retention-age", &self.retention_age),
        ];
        for (key, value) in durations {
            if let Some(text) = value {
                let d = parse_duration(text).map_err(|e| (key, e))?;
                let positive = ["heartbeat", "frame-timeout", "request-timeout"];
                if d.is_zero() && positive.contains(&key) {
                    return Err((key, anyhow::anyhow!("must be more than 0")));
                }
            }
        }
        for (key, value) in [
            ("hung-after", &self.hung_after),
            ("task-timeout", &self.task_timeout),
        ] {
            if let Some(text) = value {
                let limit = parse_limit(text).map_err(|e| (key, e))?;
                if key == "task-timeout" && limit.0.is_some_and(|d| d.is_zero()) {
                    return Err((key, anyhow::anyhow!("must be more than 0 (or off)")));
                }
            }
        }
        if let Some(text) = &self.queue_mode {
            parse_mode(text).map_err(|e| ("queue-mode", e))?;
        }
        if let Some(text) = &self.drop {
            parse_drop(text).map_err(|e| ("drop", e))?;
        }
        if let Some(line) = &self.agent {
            parse_agent_command(line).map_err(|e| ("agent", e))?;
        }
        if let Some(text) = &self.log_format {
            LogFormat::parse(text).map_err(|e| ("log-format", e))?;
        }
        let at_least_one = [
            ("max-concurrent", self.max_concurrent.map(u64::from)),
            ("cap", self.cap.map(u64::from)),
            ("max-connections", self.max_connections.map(|n| n as u64)),
        ];
        for (key, value) in at_least_one {
            if value == Some(0) {
                return Err((key, anyhow::anyhow!("must be at least 1")));
            }
        }
        Ok(())
    }
}

/// An error about `key` of the config file at `path` (a value that does not fit with
/// the others), named as [`FileConfig::load`] names its errors: the file, the line, the key.
pub fn key_error(path: &Path, key: &str, error: impl std::fmt::Display) -> anyhow::Error {
    let line = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| config_text::key_line(&text, None, key))
        .map(|n| format!("line {n}: "))
        .unwrap_or_default();
    anyhow::anyhow!(
        "invalid config file {}: {line}{key}: {error}",
        path.display()
    )
}

/// The default config file: `$XDG_CONFIG_HOME/agentd/config.toml`, else
/// `~/.config/agentd/config.toml`. `None` when neither variable names an absolute path.
pub fn default_config_path() -> Option<PathBuf> {
    config_path_from(
        std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// Pure form of [`default_config_path`].
pub fn config_path_from(
    xdg_config_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    if let Some(dir) = xdg_config_home.filter(|p| p.is_absolute()) {
        return Some(dir.join("agentd").join("config.toml"));
    }
    home.filter(|p| p.is_absolute())
        .map(|home| home.join(".config").join("agentd").join("config.toml"))
}

/// The config file agentd reads: `--config FILE` (or `$AGENTD_CONFIG`, which clap
/// puts in the flag) if given (it must exist), else the
/// default file if it exists (a missing default file means defaults).
pub fn config_file(flag: Option<&Path>) -> Option<PathBuf> {
    match flag {
        Some(path) => Some(path.to_path_buf()),
        None => default_config_path().filter(|p| p.exists()),
    }
}

/// How agentd writes its log lines (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One line per event: time, level, message, then `key=value` fields.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> anyhow::Result<LogFormat> {
        match text.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => bail!("unknown log format {} (text, json)", Quoted(other)),
        }
    }
}

/// The longest duration a flag or the config file may give (100 years):
/// `--frame-timeout 10000000000000000000s` panicked at the first agent frame.
pub use agentd_proto::config_text::MAX_DURATION;

/// Parses `500ms`, `5s`, `2m`… (humantime syntax), at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(text.trim()).with_context(|| {
        format!(
            "invalid duration {} (examples: 500ms, 5s, 2m)",
            Quoted(text)
        )
    })?;
    at_most_max(text, d)
}

fn at_most_max(text: &str, d: Duration) -> anyhow::Result<Duration> {
    if d > MAX_DURATION {
        bail!("{}", agentd_proto::text::duration_too_long(text));
    }
    Ok(d)
}

/// A time limit that may be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<Duration>);

/// Parses a duration, or `off` for no limit.
pub fn parse_limit(text: &str) -> anyhow::Result<Limit> {
    match text.trim() {
        "off" => Ok(Limit(None)),
        other => {
            let d = humantime::parse_duration(other).with_context(|| {
                format!("invalid duration {text:?} (examples: 500ms, 5s, 2m; or off for no limit)")
            })?;
            Ok(Limit(Some(at_most_max(text, d)?)))
        }
    }
}

/// Parses a queue mode name (any case) for flags and the config file.
pub fn parse_mode(text: &str) -> anyhow::Result<agentd_core::Mode> {
    use agentd_core::Named;
    agentd_core::Mode::parse_name(text).map_err(anyhow::Error::msg)
}

/// Parses a drop policy name (any case) for flags and the config file.
pub fn parse_drop(text: &str) -> anyhow::Result<agentd_core::DropPolicy> {
    use agentd_core::Named;
    agentd_core::DropPolicy::parse_name(text).map_err(anyhow::Error::msg)
}

/// Splits an agent command line into words, shell-style quoting allowed, and checks it.
pub fn parse_agent_command(line: &str) -> anyhow::Result<Vec<String>> {
    let words = split_words(line)?;
    if words.is_empty() {
        bail!("the agent command is empty");
    }
    Ok(words)
}

/// Minimal POSIX-shell word splitting: whitespace separates words; single quotes keep
/// everything; double quotes keep everything but `\"` and `\\`; a backslash outside
/// quotes escapes the next character.
fn split_words(line: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => bail!("unterminated single quote in the agent command"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => bail!("unterminated double quote in the agent command"),
                        },
                        Some(c) => word.push(c),
                        None => bail!("unterminated double quote in the agent command"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => bail!("trailing backslash in the agent command"),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The agent command used when none is configured: `agent-exec -- sh -c {text}`.
pub fn default_agent_command() -> Vec<String> {
    ["agent-exec", "--", "sh", "-c", "{text}"]
        .map(String::from)
        .to_vec()
}

/// The default state directory: `$XDG_STATE_HOME/agentd`, else `~/.local/state/agentd`,
/// else `/tmp/agentd-$UID/state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        return dir.join("agentd");
    }
    if let Some(home) = std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        return home.join(".local/state/agentd");
    }
    PathBuf::from(format!("/tmp/agentd-{}/state", nix::unistd::geteuid()))
}

/// Creates the state directory (0700: agent logs hold task texts and outputs) and its
/// `logs` directory, and returns the latter. A state directory agentd finds open to
/// others is closed to them.
pub fn create_state_dir(state_dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let logs = state_dir.join("logs");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&logs)
        .with_context(|| format!("cannot create the state directory {}", logs.display()))?;
    for dir in [state_dir, logs.as_path()] {
        let meta =
            std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if meta.mode() & 0o077 != 0 && meta.uid() == nix::unistd::geteuid().as_raw() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private (0700)", dir.display()))?;
            tracing::info!("made the state directory {} private (0700)", dir.display());
        }
    }
    Ok(logs)
}

/// Whether the configured agent wants several held messages merged into one prompt,
/// as far as agentd can tell before any handshake: agent-exec runs a command, which
/// wants one message per task, unless its own options (before `--`) hold
/// `--collect`; any other agent (an LLM agent, a v1 agent) counts as wanting them.
/// An agent that says otherwise in its handshake (IPC v2 `Features`) overrides this.
pub fn agent_wants_collected_prompts(agent: &[String]) -> bool {
    let Some((program, args)) = agent.split_first() else {
        return true;
    };
    let name = std::path::Path::new(program).file_name();
    if name != Some(std::ffi::OsStr::new("agent-exec")) {
        return true;
    }
    args.iter()
        .take_while(|w| w.as_str() != "--")
        .any(|w| w == "--collect")
}

/// The directory of agentd's own executable, looked up once.
fn own_dir() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
    })
    .as_deref()
}

/// agentd's exit code for a configuration error (a flag's value, the config file, an
/// agent program that cannot be run): `EX_CONFIG` of sysexits.h.
pub const EXIT_CONFIG: u8 = 78;

/// Checks, before any task runs, that the agent command's program can be run, found
/// as a task's spawn will look for it ([`agent_argv`], then `execvp`'s search of
/// agentd's `PATH`, which agents inherit): a path must name an executable file; a
/// name must be an executable file next to agentd or in a directory of `PATH`. A
/// program word holding `{text}` is only known when a task runs: not checked. What a
/// wrapper (`sh -c …`, `env …`) runs in turn is the wrapper's business.
pub fn check_agent_program(template: &[String]) -> Result<(), String> {
    use agentd_proto::text;
    let Some(program) = template.first() else {
        return Ok(());
    };
    if program.contains("{text}") {
        return Ok(());
    }
    let problem = |path: &Path| -> Option<&'static str> {
        match std::fs::metadata(path) {
            Err(_) => Some(text::AGENT_PROGRAM_MISSING),
            Ok(meta) if meta.is_dir() => Some(text::AGENT_PROGRAM_DIRECTORY),
            Ok(meta) if !meta.is_file() => Some(text::AGENT_PROGRAM_NOT_EXECUTABLE),
            Ok(_) => nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
                .err()
                .map(|_| text::AGENT_PROGRAM_NOT_EXECUTABLE),
        }
    };
    if program.contains('/') {
        return match problem(Path::new(program)) {
            Some(why) => Err(text::agent_program_unusable(program, why)),
            None => Ok(()),
        };
    }
    // As agent_argv: a file of that name next to agentd is the one that runs.
    if let Some(beside) = own_dir()
        .map(|dir| dir.join(program))
        .filter(|p| p.is_file())
    {
        return match problem(&beside) {
            Some(why) => Err(text::agent_program_unusable(&beside.to_string_lossy(), why)),
            None => Ok(()),
        };
    }
    // As execvp: glibc's default without PATH; an empty entry is the working directory.
    let path = std::env::var("PATH").unwrap_or_else(|_| "/bin:/usr/bin".into());
    let found = path.split(':').any(|dir| {
        let dir = if dir.is_empty() { "." } else { dir };
        problem(&Path::new(dir).join(program)).is_none()
    });
    if found {
        return Ok(());
    }
    let next_to = own_dir().map(|dir| dir.display().to_string());
    Err(text::agent_program_not_found(
        program,
        next_to.as_deref(),
        &path,
    ))
}

/// Builds the argv for one task: `{text}` in any word is replaced by the task text.
/// A program name without a slash is looked up next to the agentd executable first
/// (so a freshly built `target/debug/agent-exec` is found), then on `$PATH`.
pub fn agent_argv(template: &[String], text: &str) -> (String, Vec<String>) {
    let mut words = template.iter().map(|w| w.replace("{text}", text));
    let program = words.next().unwrap_or_default();
    let program = if program.contains('/') {
        program
    } else {
        own_dir()
            .map(|dir| dir.join(&program))
            .filter(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or(program)
    };
    (program, words.collect())
}

#[cfg(test)]
mod tests;
