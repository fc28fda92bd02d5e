//! The `[matrix]` table of agentd's TOML config file, and the file's top-level
//! `socket` (agentd's control socket), which the bridge shares with agentd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentd_proto::config_text;
use anyhow::{bail, Context};
use serde::Deserialize;

/// The parts of agentd's config file the bridge reads. Every other key is agentd's.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileConfig {
    socket: Option<PathBuf>,
    matrix: Option<MatrixTable>,
}

/// `[matrix]` as written in the file.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MatrixTable {
    homeserver: Option<String>,
    user: Option<String>,
    access_token: Option<String>,
    password: Option<String>,
    #[serde(default)]
    allowed_users: Vec<String>,
    #[serde(default)]
    rooms: Vec<String>,
    state_file: Option<PathBuf>,
    progress_interval: Option<String>,
    refusal_interval: Option<String>,
    device_name: Option<String>,
}

/// How the bridge logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    AccessToken(String),
    Password(String),
}

/// The bridge's settings, checked.
#[derive(Debug, Clone)]
pub struct MatrixConfig {
    /// `http://127.0.0.1:8008`, without a trailing slash.
    pub homeserver: String,
    /// The bridge's own user id, `@agentd:example.org`.
    pub user: String,
    pub credentials: Credentials,
    /// User ids that may give agentd work; everyone else gets a polite refusal.
    pub allowed_users: Vec<String>,
    /// When not empty: the only rooms served (joined at start). When empty: any room
    /// an allowed user invites the bridge to.
    pub rooms: Vec<String>,
    /// Where the sync position and the handled event ids are kept.
    pub state_file: PathBuf,
    /// The shortest time between two edits of a task's progress message.
    pub progress_interval: Duration,
    /// A sender not in `allowed_users` is told so once per room, then not again
    /// for this long.
    pub refusal_interval: Duration,
    pub device_name: String,
    /// agentd's control socket, from the file's top-level `socket`, if set.
    pub socket: Option<PathBuf>,
}

/// The default progress edit interval: one edit a second keeps well under a
/// homeserver's message rate limits.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The default time a refused sender is not told again in one room: an hour keeps
/// a shared room quiet while leaving a newcomer one clear answer.
pub const DEFAULT_REFUSAL_INTERVAL: Duration = Duration::from_secs(3600);

impl MatrixConfig {
    pub fn load(path: &Path) -> anyhow::Result<MatrixConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        MatrixConfig::parse(&text, path)
    }

    /// Parses the file's text; `path` is for messages and relative paths. An error
    /// is one line naming the file, and the line and key where it can tell.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<MatrixConfig> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            // toml's own message spans several lines (it quotes the source); a log
            // line and an error line want one.
            let message = e.message().trim_end();
            let (line, key) = config_text::error_place(text, message, e.span().map(|s| s.start));
            let line = line.map(|n| format!("line {n}: ")).unwrap_or_default();
            let key = key
                .map(|key| format!("[matrix] {key}: "))
                .unwrap_or_default();
            anyhow::anyhow!(
                "invalid config file {}: {line}{key}{message}",
                path.display()
            )
        })?;
        // Where a `[matrix]` key is set, for the errors of values TOML cannot check.
        let at = |key: &str| {
            let line = config_text::key_line(text, Some("matrix"), key)
                .map(|n| format!("line {n}: "))
                .unwrap_or_default();
            format!(
                "invalid config file {}: {line}[matrix] {key}",
                path.display()
            )
        };
        let Some(table) = file.matrix else {
            bail!(
                "config file {} has no [matrix] table (homeserver, user, access-token or password, allowed-users)",
                path.display()
            );
        };
        let need = |value: Option<String>, key: &str| {
            value
                .filter(|v| !v.trim().is_empty())
                .with_context(|| format!("[matrix] in {} needs `{key}`", path.display()))
        };
        let homeserver = need(table.homeserver, "homeserver")?
            .trim_end_matches('/')
            .to_string();
        if !homeserver.starts_with("http://") && !homeserver.starts_with("https://") {
            bail!(
                "{}: must be an http:// or https:// URL, not {homeserver:?}",
                at("homeserver")
            );
        }
        let user = need(table.user, "user")?;
        if !is_user_id(&user) {
            bail!(
                "{}: must be a full user id such as @agentd:example.org, not {user:?}",
                at("user")
            );
        }
        let credentials = match (table.access_token, table.password) {
            (Some(token), None) => Credentials::AccessToken(token),
            (None, Some(password)) => Credentials::Password(password),
            (Some(_), Some(_)) => bail!("[matrix] takes `access-token` or `password`, not both"),
            (None, None) => bail!("[matrix] needs `access-token` or `password`"),
        };
        for id in &table.allowed_users {
            if !is_user_id(id) {
                bail!(
                    "{}: {id:?} is not a user id such as @alice:example.org",
                    at("allowed-users")
                );
            }
        }
        if table.allowed_users.is_empty() {
            tracing::warn!("[matrix] allowed-users is empty: the bridge will refuse everyone");
        }
        let duration = |value: Option<String>, key: &str, default: Duration| match value {
            Some(text) => {
                let d = humantime::parse_duration(text.trim()).with_context(|| {
                    format!(
                        "{}: invalid duration {text:?} (examples: 500ms, 2s, 1h)",
                        at(key)
                    )
                })?;
                if d > agentd_proto::config_text::MAX_DURATION {
                    bail!(
                        "{}: {}",
                        at(key),
                        agentd_proto::text::duration_too_long(&text)
                    );
                }
                Ok(d)
            }
            None => Ok(default),
        };
        let progress_interval = duration(
            table.progress_interval,
            "progress-interval",
            DEFAULT_PROGRESS_INTERVAL,
        )?;
        let refusal_interval = duration(
            table.refusal_interval,
            "refusal-interval",
            DEFAULT_REFUSAL_INTERVAL,
        )?;
        let base = path.parent().unwrap_or(Path::new("."));
        let state_file = match table.state_file {
            Some(p) if p.is_relative() => base.join(p),
            Some(p) => p,
            None => default_state_file(),
        };
        Ok(MatrixConfig {
            homeserver,
            user,
            credentials,
            allowed_users: table.allowed_users,
            rooms: table.rooms,
            state_file,
            progress_interval,
            refusal_interval,
            device_name: table.device_name.unwrap_or_else(|| "agentd-matrix".into()),
            socket: file.socket,
        })
    }
}

/// `@local:server`.
fn is_user_id(id: &str) -> bool {
    id.strip_prefix('@')
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(local, server)| !local.is_empty() && !server.is_empty())
}

/// `$XDG_STATE_HOME/agentd/matrix-state.json`, else `~/.local/state/agentd/…`.
fn default_state_file() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("agentd").join("matrix-state.json")
}

/// `$XDG_CONFIG_HOME/agentd/config.toml`, else `~/.config/agentd/config.toml`.
pub fn default_config_file() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("agentd").join("config.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<MatrixConfig> {
        MatrixConfig::parse(text, Path::new("/etc/agentd/config.toml"))
    }

    #[test]
    fn reads_the_matrix_table_beside_agentds_keys() {
        let c = parse(
            r#"
            socket = "/run/agentd.sock"
            max-concurrent = 4
            [matrix]
            homeserver = "http://127.0.0.1:8008/"
            user = "@agentd:localhost"
            password = "pw"
            allowed-users = ["@alice:localhost"]
            state-file = "matrix.json"
            progress-interval = "500ms"
            "#,
        )
        .unwrap();
        assert_eq!(c.homeserver, "http://127.0.0.1:8008");
        assert_eq!(c.credentials, Credentials::Password("pw".into()));
        assert_eq!(c.allowed_users, ["@alice:localhost"]);
        assert_eq!(c.state_file, Path::new("/etc/agentd/matrix.json"));
        assert_eq!(c.progress_interval, Duration::from_millis(500));
        assert_eq!(c.refusal_interval, DEFAULT_REFUSAL_INTERVAL);
        let quieter = parse(
            "[matrix]\nhomeserver = 'http://h'\nuser = '@a:h'\npassword = 'p'\n\
             refusal-interval = '10m'",
        )
        .unwrap();
        assert_eq!(quieter.refusal_interval, Duration::from_secs(600));
        // The writer adds the interval to the clock: past 100 years it is refused
        // (Instant + 10^19 s overflows, and panics, in its thread).
        for key in ["progress-interval", "refusal-interval"] {
            let e = parse(&format!(
                "[matrix]\nhomeserver = 'http://h'\nuser = '@a:h'\npassword = 'p'\n\
                 {key} = '10000000000000000000s'"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(key) && e.contains("at most 100 years"), "{e}");
        }
        assert_eq!(c.socket.as_deref(), Some(Path::new("/run/agentd.sock")));
    }

    /// examples/config.toml shows every `[matrix]` key, with the default where
    /// there is one: a key added here and not there fails this test.
    #[test]
    fn the_example_config_lists_every_matrix_key() {
        let example = include_str!("../../../examples/config.toml");
        let (_, table) = example
            .split_once("\n# [matrix]\n")
            .expect("examples/config.toml has a [matrix] table");
        let uncommented: String = table
            .lines()
            .filter_map(|line| line.strip_prefix("# "))
            .filter(|rest| {
                rest.split_once(" = ")
                    .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let parsed: MatrixTable = toml::from_str(&uncommented).unwrap();
        let json = serde_json::to_value(&parsed).unwrap();
        let missing: Vec<&String> = json
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_null() || v.as_array().is_some_and(Vec::is_empty))
            .map(|(k, _)| k)
            .collect();
        assert!(missing.is_empty(), "examples/config.toml lacks {missing:?}");
        let d = |v: &Option<String>| humantime::parse_duration(v.as_deref().unwrap()).unwrap();
        assert_eq!(d(&parsed.progress_interval), DEFAULT_PROGRESS_INTERVAL);
        assert_eq!(d(&parsed.refusal_interval), DEFAULT_REFUSAL_INTERVAL);
        assert_eq!(parsed.device_name.as_deref(), Some("agentd-matrix"));
    }

    #[test]
    fn refuses_mistakes_with_a_message() {
        let base = "[matrix]\nhomeserver = 'http://h'\nuser = '@a:h'\n";
        let err = |extra: &str| format!("{:#}", parse(&format!("{base}{extra}")).unwrap_err());
        assert!(err("").contains("access-token"));
        assert!(err("password = 'p'\naccess-token = 't'").contains("not both"));
        assert!(err("password = 'p'\nallowed-users = ['alice']").contains("not a user id"));
        assert!(err("password = 'p'\nallowd-users = []").contains("allowd-users"));
        assert!(err("password = 'p'\nrefusal-interval = 'often'").contains("refusal-interval"));
        assert!(parse("max-concurrent = 2")
            .unwrap_err()
            .to_string()
            .contains("no [matrix]"));
        assert!(
            parse("[matrix]\nhomeserver = 'ftp://x'\nuser = '@a:h'\npassword = 'p'")
                .unwrap_err()
                .to_string()
                .contains("http://")
        );
    }
}
