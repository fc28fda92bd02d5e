//! Daemon configuration: flags, an optional TOML file, and defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

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
    /// How many finished tasks to keep for `tasks --all` and `status ID`.
    pub history: usize,
    /// Limits of the control socket (SIGHUP reloads them).
    pub control: ControlSettings,
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

/// The TOML file (`--config FILE`). Every key is optional; flags win over the file.
#[derive(Debug, Default, Deserialize)]
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
    pub queue_mode: Option<String>,
    pub debounce: Option<String>,
    pub cap: Option<u32>,
    pub drop: Option<String>,
    pub max_queued: Option<u32>,
    pub max_background: Option<u32>,
    pub queue_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub request_timeout: Option<String>,
    /// `[matrix]`: agentd-matrix's settings, which share this file (read by the
    /// bridge, not by agentd).
    pub matrix: Option<toml::Table>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Parses `500ms`, `5s`, `2m`… (humantime syntax).
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text.trim())
        .with_context(|| format!("invalid duration {text:?} (examples: 500ms, 5s, 2m)"))
}

/// Parses a queue mode name for flags and the config file.
pub fn parse_mode(text: &str) -> anyhow::Result<agentd_core::Mode> {
    agentd_core::Mode::parse(text.trim()).with_context(|| {
        format!("unknown queue mode {text:?} (collect, followup, steer, steer-backlog, interrupt)")
    })
}

/// Parses a drop policy name for flags and the config file.
pub fn parse_drop(text: &str) -> anyhow::Result<agentd_core::DropPolicy> {
    agentd_core::DropPolicy::parse(text.trim())
        .with_context(|| format!("unknown drop policy {text:?} (old, new, summarize)"))
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

/// Builds the argv for one task: `{text}` in any word is replaced by the task text.
/// A program name without a slash is looked up next to the agentd executable first
/// (so a freshly built `target/debug/agent-exec` is found), then on `$PATH`.
pub fn agent_argv(template: &[String], text: &str) -> (String, Vec<String>) {
    let mut words = template.iter().map(|w| w.replace("{text}", text));
    let program = words.next().unwrap_or_default();
    let program = if program.contains('/') {
        program
    } else {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(&program)))
            .filter(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or(program)
    };
    (program, words.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        let w = |s: &str| split_words(s).unwrap();
        assert_eq!(
            w("agent-exec -- sh -c {text}"),
            ["agent-exec", "--", "sh", "-c", "{text}"]
        );
        assert_eq!(
            w(r#"a 'b c' "d \"e\"" f\ g"#),
            ["a", "b c", "d \"e\"", "f g"]
        );
        assert_eq!(w("  "), Vec::<String>::new());
        assert_eq!(w("''"), [""]);
        assert!(split_words("'open").is_err());
        assert!(split_words("\"open").is_err());
    }

    #[test]
    fn agent_exec_running_a_command_wants_no_collected_prompts() {
        let wants = |line: &str| agent_wants_collected_prompts(&split_words(line).unwrap());
        assert!(!wants("agent-exec -- sh -c {text}"));
        assert!(!wants("/opt/bin/agent-exec --no-steer -- sh -c {text}"));
        assert!(wants("agent-exec --collect -- my-llm-cli {text}"));
        assert!(!wants("agent-exec -- my-tool --collect {text}"));
        assert!(wants("my-llm-agent --model x {text}"));
        assert!(wants("agentd-test-agent {text}"));
    }

    #[test]
    fn text_is_substituted_in_every_word() {
        let template = vec![
            "/bin/echo".to_string(),
            "x{text}y".to_string(),
            "{text}".to_string(),
        ];
        let (program, args) = agent_argv(&template, "hi there");
        assert_eq!(program, "/bin/echo");
        assert_eq!(args, ["xhi therey", "hi there"]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn file_config_rejects_unknown_keys() {
        assert!(toml::from_str::<FileConfig>("max-concurrent = 3\nagent = 'x {text}'").is_ok());
        assert!(toml::from_str::<FileConfig>("max_concurent = 3").is_err());
    }
}
