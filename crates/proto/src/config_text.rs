//! Where in a TOML config file's text an error is, so that agentd and agentd-matrix
//! name the file, the line and the key alike (`invalid config file F: line N: KEY: …`).

/// The longest duration a flag or a config file may give agentd or agentd-matrix:
/// 100 (humantime) years. Durations are added to the clock (`Instant + d` panics on
/// overflow) and stored as i64 milliseconds; a longer one would overflow there.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(3_155_760_000);

/// Where a TOML parse error at byte `offset` of `text` is: its 1-based line, and the
/// key whose value it is in, unless `message` already names that key (serde names
/// the type it expected for a value of the wrong type, not the key).
pub fn error_place(
    text: &str,
    message: &str,
    offset: Option<usize>,
) -> (Option<usize>, Option<String>) {
    let Some(offset) = offset else {
        return (None, None);
    };
    let key = key_of_value_at(text, offset).filter(|key| !message.contains(&format!("`{key}`")));
    (Some(line_of(text, offset)), key)
}

/// The 1-based line where `key` is set: anywhere in the file with `table` `None`,
/// else only inside `[table]`.
pub fn key_line(text: &str, table: Option<&str>, key: &str) -> Option<usize> {
    let mut in_table = table.is_none();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if let Some(table) = table {
            if line.starts_with('[') {
                let header = line.trim_end().trim_end_matches(|c| c != ']');
                in_table =
                    header.strip_prefix('[').and_then(|h| h.strip_suffix(']')) == Some(table);
                continue;
            }
        }
        let rest = line
            .strip_prefix(key)
            .or_else(|| line.strip_prefix(&format!("\"{key}\"")));
        if in_table && rest.is_some_and(|rest| rest.trim_start().starts_with('=')) {
            return Some(i + 1);
        }
    }
    None
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key of a `key = value` line when byte `offset` in `text` is in its value.
fn key_of_value_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = text[start..offset].split_once('=')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && !key.contains(['[', ']', '#'])).then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_in_a_value_is_placed_on_its_line_and_key() {
        let text = "a = 1\n\"max-concurrent\" = \"3\"\n";
        let offset = text.find("\"3\"").unwrap();
        assert_eq!(
            error_place(text, "invalid type: string, expected u32", Some(offset)),
            (Some(2), Some("max-concurrent".into()))
        );
        // A message that names the key already gets no second one.
        assert_eq!(
            error_place(text, "unknown field `max-concurrent`", Some(offset)),
            (Some(2), None)
        );
        assert_eq!(error_place(text, "x", None), (None, None));
        // Past the end, or in a table header: a line, no key.
        assert_eq!(error_place("[t]\n", "x", Some(2)), (Some(1), None));
        assert_eq!(error_place("a = 1", "x", Some(99)).0, Some(1));
    }

    #[test]
    fn a_key_is_found_anywhere_or_only_in_its_table() {
        let text =
            "socket = \"/a\"\n[matrix]\n  socket = \"/b\"\n\"rooms\" = []\n[other]\nrooms = 1\n";
        assert_eq!(key_line(text, None, "socket"), Some(1));
        assert_eq!(key_line(text, Some("matrix"), "socket"), Some(3));
        assert_eq!(key_line(text, Some("matrix"), "rooms"), Some(4));
        assert_eq!(key_line(text, Some("other"), "socket"), None);
        // A key that only starts like another is not it.
        assert_eq!(key_line("sockets = 1\n", None, "socket"), None);
    }
}
