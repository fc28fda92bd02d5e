//! The transcript machinery: finds fenced blocks in docs/protocol.md, parses
//! `transcript` blocks, replays them against a real agentd, matches agentd's lines
//! against the doc's (placeholders and wildcards), and prints transcripts as agentd
//! answers them (`AGENTD_TRANSCRIPT_RECORD`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// One client connection speaking raw lines.
pub(super) struct Conn {
    pub(super) writer: UnixStream,
    pub(super) reader: BufReader<UnixStream>,
}

impl Conn {
    pub(super) fn open(d: &Daemon) -> Conn {
        let stream = UnixStream::connect(&d.socket).expect("connect");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        Conn {
            writer: stream.try_clone().expect("clone"),
            reader: BufReader::new(stream),
        }
    }

    pub(super) fn send(&mut self, request: &Value) {
        writeln!(self.writer, "{request}").expect("write request");
    }

    pub(super) fn line(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a line");
        assert!(n > 0, "agentd closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("invalid JSON line ({e}): {line}"))
    }
}

/// docs/protocol.md, as the test reads it.
pub(super) fn protocol_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A fenced block: its info string (`json`, `transcript`…), its text, its first line.
pub(super) struct Block {
    pub(super) info: String,
    pub(super) text: String,
    pub(super) line: usize,
}

pub(super) fn fenced_blocks(doc: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (n, line) in doc.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    info: info.trim().to_string(),
                    text: String::new(),
                    line: n + 2,
                })
            }
            (Some(_), Some(_)) => blocks.extend(open.take()),
            (Some(block), None) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "docs/protocol.md: an unclosed ``` block");
    blocks
}

/// One `>` request and the `<` lines it is answered with.
#[derive(Debug, Default)]
pub(super) struct Step {
    pub(super) request: Option<Value>,
    pub(super) expect: Vec<Value>,
    /// `< closed`: agentd closes the connection after these lines.
    pub(super) closes: bool,
    pub(super) line: usize,
    /// The `#` comment lines written before the request, kept when re-recording.
    pub(super) comments: Vec<String>,
}

#[derive(Debug)]
pub(super) struct Transcript {
    /// The `$ agentd …` line's arguments.
    pub(super) args: Vec<String>,
    pub(super) steps: Vec<Step>,
    pub(super) line: usize,
    /// How many lines the block has (to replace it when re-recording).
    pub(super) lines: usize,
    /// `#` comment lines after the last step.
    pub(super) trailing: Vec<String>,
}

/// Splits a command line on blanks, with '…' and "…" quoting.
pub(super) fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    assert!(quote.is_none(), "unclosed quote in {line:?}");
    words.extend(word);
    words
}

/// Parses a `transcript` block: `$ agentd ARGS`, then `>` requests each followed by
/// the `<` lines agentd writes; an entry continues on indented lines; `#` comments.
pub(super) fn parse_transcript(block: &Block) -> Transcript {
    let mut args = None;
    // (mark, text, line number, the comments before it)
    let mut entries: Vec<(char, String, usize, Vec<String>)> = Vec::new();
    let mut comments: Vec<String> = Vec::new();
    for (i, line) in block.text.lines().enumerate() {
        let n = block.line + i;
        if line.starts_with('#') {
            comments.push(line.to_string());
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("$ ") {
            let words = shell_words(rest);
            assert_eq!(
                words.first().map(String::as_str),
                Some("agentd"),
                "line {n}"
            );
            args = Some(words[1..].to_vec());
        } else if line.starts_with(char::is_whitespace) {
            let last = entries
                .last_mut()
                .unwrap_or_else(|| panic!("line {n}: a continuation line without an entry"));
            last.1.push(' ');
            last.1.push_str(line.trim());
        } else if let Some(kind @ ('>' | '<')) = line.chars().next() {
            entries.push((
                kind,
                line[1..].trim().to_string(),
                n,
                std::mem::take(&mut comments),
            ));
        } else {
            panic!("docs/protocol.md line {n}: a transcript line starts with `>`, `<`, `$`, `#` or blanks: {line}");
        }
    }
    let mut steps: Vec<Step> = Vec::new();
    for (kind, text, n, comments) in entries {
        let parse = |text: &str| -> Value {
            serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("docs/protocol.md line {n}: not JSON ({e}): {text}"))
        };
        match kind {
            // A request that is not JSON is sent as it is (to show bad input).
            '>' => steps.push(Step {
                request: Some(if text.starts_with('{') {
                    parse(&text)
                } else {
                    Value::String(text.clone())
                }),
                line: n,
                comments,
                ..Step::default()
            }),
            _ => {
                if steps.is_empty() {
                    steps.push(Step {
                        line: n,
                        ..Step::default()
                    });
                }
                let step = steps.last_mut().unwrap();
                // A comment among a step's `<` lines moves before the step's request.
                step.comments.extend(comments);
                if text == "closed" {
                    step.closes = true;
                } else {
                    assert!(!step.closes, "line {n}: a line after `< closed`");
                    step.expect.push(parse(&text));
                }
            }
        }
    }
    Transcript {
        args: args.unwrap_or_else(|| {
            panic!(
                "docs/protocol.md line {}: a transcript starts with `$ agentd …`",
                block.line
            )
        }),
        steps,
        line: block.line,
        lines: block.text.lines().count(),
        trailing: comments,
    }
}

/// Values bound to `$NAME` placeholders, in the order they were bound.
#[derive(Debug, Clone, Default)]
pub(super) struct Bindings(pub(super) Vec<(String, Value)>);

impl Bindings {
    pub(super) fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub(super) fn text(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

/// A piece of an expected string: literal text, `…` (anything), or `$NAME`.
#[derive(Debug)]
pub(super) enum Piece {
    Lit(String),
    Any,
    Var(String),
}

pub(super) fn placeholder_at(s: &str) -> Option<usize> {
    let mut chars = s.strip_prefix('$')?.chars();
    chars.next().filter(char::is_ascii_uppercase)?;
    let len = 2 + chars
        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
        .count();
    Some(len)
}

pub(super) fn pieces(pattern: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        if c == '…' {
            out.extend((!lit.is_empty()).then(|| Piece::Lit(std::mem::take(&mut lit))));
            out.push(Piece::Any);
            rest = &rest[c.len_utf8()..];
        } else if let Some(len) = placeholder_at(rest) {
            out.extend((!lit.is_empty()).then(|| Piece::Lit(std::mem::take(&mut lit))));
            out.push(Piece::Var(rest[1..len].to_string()));
            rest = &rest[len..];
        } else {
            lit.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out.extend((!lit.is_empty()).then_some(Piece::Lit(lit)));
    out
}

/// Matches `text` against pattern pieces, binding new variables (shortest first).
pub(super) fn glob(pieces: &[Piece], text: &str, b: &mut Bindings) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return text.is_empty();
    };
    match first {
        Piece::Lit(lit) => text
            .strip_prefix(lit.as_str())
            .is_some_and(|t| glob(rest, t, b)),
        Piece::Var(name) if b.get(name).is_some() => {
            let value = b.text(name).unwrap_or_default();
            text.strip_prefix(value.as_str())
                .is_some_and(|t| glob(rest, t, b))
        }
        Piece::Var(_) | Piece::Any => {
            let ends = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .filter(|i| matches!(first, Piece::Any) || *i > 0);
            for end in ends {
                let saved = b.clone();
                if let Piece::Var(name) = first {
                    b.0.push((name.clone(), Value::String(text[..end].to_string())));
                }
                if glob(rest, &text[end..], b) {
                    return true;
                }
                *b = saved;
            }
            false
        }
    }
}

/// Matches an actual line against the doc's: same fields, same values, except that
/// `"…"` is any value, `"$NAME"` binds (or must equal) a value, and inside strings
/// `…` and `$NAME` stand for text.
pub(super) fn matches(
    expected: &Value,
    actual: &Value,
    b: &mut Bindings,
    path: &str,
) -> Result<(), String> {
    match (expected, actual) {
        (Value::String(p), _) if p == "…" => Ok(()),
        (Value::String(p), _) if placeholder_at(p) == Some(p.len()) => match b.get(&p[1..]) {
            Some(bound) if bound == actual => Ok(()),
            Some(bound) => Err(format!("{path}: {p} is {bound}, got {actual}")),
            None => {
                b.0.push((p[1..].to_string(), actual.clone()));
                Ok(())
            }
        },
        (Value::String(p), Value::String(s)) => {
            if glob(&pieces(p), s, b) {
                Ok(())
            } else {
                Err(format!("{path}: expected {p:?}, got {s:?}"))
            }
        }
        (Value::Object(e), Value::Object(a)) => {
            if let Some(key) = e.keys().find(|k| !a.contains_key(*k)) {
                return Err(format!("{path}: field {key} is missing"));
            }
            if let Some(key) = a.keys().find(|k| !e.contains_key(*k)) {
                return Err(format!("{path}: unexpected field {key} = {}", a[key]));
            }
            for (key, value) in e {
                matches(value, &a[key], b, &format!("{path}.{key}"))?;
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (e, a)) in e.iter().zip(a).enumerate() {
                matches(e, a, b, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ if expected == actual => Ok(()),
        _ => Err(format!("{path}: expected {expected}, got {actual}")),
    }
}

/// Fills `$NAME` (and `$NAME:N`, its first N characters) into a request.
pub(super) fn substitute(value: &Value, b: &Bindings) -> Value {
    match value {
        Value::String(s) if placeholder_at(s) == Some(s.len()) => b
            .get(&s[1..])
            .cloned()
            .unwrap_or_else(|| panic!("{s} is used in a request before a response bound it")),
        Value::String(s) => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while !rest.is_empty() {
                if let Some(len) = placeholder_at(rest) {
                    let name = &rest[1..len];
                    let mut text = b
                        .text(name)
                        .unwrap_or_else(|| panic!("${name} is used before it is bound"));
                    rest = &rest[len..];
                    if let Some(digits) = rest.strip_prefix(':') {
                        let n: String = digits.chars().take_while(char::is_ascii_digit).collect();
                        if let Ok(keep) = n.parse::<usize>() {
                            text = text.chars().take(keep).collect();
                            rest = &digits[n.len()..];
                        }
                    }
                    out.push_str(&text);
                } else {
                    let c = rest.chars().next().unwrap();
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
            Value::String(out)
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), substitute(v, b)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| substitute(v, b)).collect()),
        other => other.clone(),
    }
}

/// Like [`generalize`], naming task ids not seen before `$TASK1`, `$TASK2`… first.
pub(super) fn generalize_new(value: &Value, b: &mut Bindings) -> Value {
    fn ids(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::String(s) if s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4 => {
                out.push(s.clone())
            }
            Value::Object(map) => map.values().for_each(|v| ids(v, out)),
            Value::Array(items) => items.iter().for_each(|v| ids(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    ids(value, &mut found);
    for id in found {
        if !b.0.iter().any(|(_, v)| *v == json!(id)) {
            let n = 1 + b.0.iter().filter(|(n, _)| n.starts_with("TASK")).count();
            b.0.push((format!("TASK{n}"), json!(id)));
        }
    }
    /// Agents' pids get names; agentd's own pid (next to `uptime_ms`), uptimes and
    /// stop durations vary from run to run.
    fn vary(value: &mut Value, b: &mut Bindings) {
        match value {
            Value::Object(map) => {
                let daemon = map.contains_key("uptime_ms");
                for (key, v) in map.iter_mut() {
                    match key.as_str() {
                        "uptime_ms" | "stop_ms" | "next_in_ms" => *v = json!("…"),
                        "pid" if daemon => *v = json!("…"),
                        "pid" if v.is_u64() => {
                            if !b.0.iter().any(|(_, bound)| bound == v) {
                                let n =
                                    1 + b.0.iter().filter(|(n, _)| n.starts_with("PID")).count();
                                b.0.push((format!("PID{n}"), v.clone()));
                            }
                        }
                        _ => vary(v, b),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| vary(v, b)),
            Value::String(text) => {
                // `… after 0.02 s)` in a stop's reply.
                while let Some(at) = text
                    .find(" after ")
                    .filter(|at| text[at + 7..].starts_with(|c: char| c.is_ascii_digit()))
                {
                    let rest = &text[at + 7..];
                    let end = rest.find(" s)").map_or(rest.len(), |e| e + 2);
                    *text = format!("{} after …{}", &text[..at], &rest[end..]);
                }
            }
            _ => {}
        }
    }
    let mut value = value.clone();
    vary(&mut value, b);
    generalize(&value, b)
}

/// An actual line as the doc would write it: bound values by name, times as `…`.
pub(super) fn generalize(value: &Value, b: &Bindings) -> Value {
    match value {
        Value::String(s) if is_timestamp(s) => json!("…"),
        Value::String(s) => {
            for (name, bound) in &b.0 {
                if bound == value {
                    return json!(format!("${name}"));
                }
            }
            let mut s = s.clone();
            for (name, bound) in &b.0 {
                if let Value::String(text) = bound {
                    if text.len() >= 8 {
                        s = s.replace(text.as_str(), &format!("${name}"));
                    }
                }
            }
            Value::String(s)
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), generalize(v, b)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| generalize(v, b)).collect()),
        // Pids and the like; small numbers are more likely counts than bound values.
        Value::Number(n) if n.as_u64().is_some_and(|n| n >= 100) => {
            b.0.iter()
                .find(|(_, bound)| bound == value)
                .map_or(value.clone(), |(name, _)| json!(format!("${name}")))
        }
        other => other.clone(),
    }
}

pub(super) fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() >= 20 && s.ends_with('Z') && b[4] == b'-' && b[10] == b'T' && b[13] == b':'
}

/// The order the doc writes fields in (agentd's own order; serde_json's `Value` sorts).
pub(super) const FIELD_ORDER: &[&str] = &[
    "id",
    "ok",
    "cmd",
    "protocol",
    "server",
    "pong",
    "reply",
    "accepted",
    "kind",
    "code",
    "message",
    "task_id",
    "session",
    "state",
    "position",
    "pid",
    "created_at",
    "started_at",
    "finished_at",
    "text",
    "into",
    "progress",
    "result",
    "error",
    "event",
    "skipped",
    "exit",
    "merged_into",
    "priority",
    "message_id",
    "mode",
    "task",
    "capacity",
    "command",
    "data",
    "duplicate",
    "dropped",
    "notice",
    "steered_into",
    "stopped",
    "stopping",
    "step",
    "step_at",
    "next",
    "next_in_ms",
    "tasks",
    "next_cursor",
    "at",
    "version",
    "uptime_ms",
    "queued",
    "sessions",
    "active",
    "signal",
    "command_code",
    "command_signal",
    "ended_by",
    "stop_ms",
];

pub(super) fn ordered(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let rank = |k: &str| {
        FIELD_ORDER
            .iter()
            .position(|f| *f == k)
            .unwrap_or(usize::MAX)
    };
    let mut fields: Vec<(&String, &Value)> = map.iter().collect();
    fields.sort_by_key(|(k, _)| (rank(k), (*k).clone()));
    fields
}

pub(super) fn flat(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let fields: Vec<String> = ordered(map)
                .into_iter()
                .map(|(k, v)| format!("{}: {}", serde_json::to_string(k).unwrap(), flat(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(flat).collect::<Vec<_>>().join(", ")
            )
        }
        other => other.to_string(),
    }
}

/// An entry of a transcript as the doc writes it: one JSON line, filled to 96
/// columns, breaking after commas outside strings (continuation lines indented).
pub(super) fn entry(mark: char, value: &Value) -> String {
    const WIDTH: usize = 96;
    let text = flat(value);
    let mut pieces: Vec<String> = vec![String::new()];
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        pieces.last_mut().unwrap().push(c);
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            ',' if !in_string && chars.peek() == Some(&' ') => {
                chars.next();
                pieces.push(String::new());
            }
            _ => {}
        }
    }
    let mut out = format!("{mark} ");
    let mut column = 2;
    for (i, piece) in pieces.iter().enumerate() {
        let len = piece.chars().count();
        if i > 0 {
            if column + 1 + len > WIDTH {
                out.push_str("\n  ");
                column = 2;
            } else {
                out.push(' ');
                column += 1;
            }
        }
        out.push_str(piece);
        column += len;
    }
    out
}

/// The daemon a transcript's `$ agentd …` line describes, with this build's agents.
pub(super) fn start_daemon(args: &[String]) -> Daemon {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            let words = shell_words(a);
            match words.first().map(String::as_str) {
                Some("agent-exec") => a.replacen("agent-exec", AGENT_EXEC, 1),
                Some("agentd-test-agent") => a.replacen("agentd-test-agent", TEST_AGENT, 1),
                _ => a.clone(),
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&args)
}

/// Replays a transcript; on a difference, panics with the lines agentd wrote as the
/// doc would write them. With `AGENTD_TRANSCRIPT_RECORD=all` (or `=N`) it prints the whole
/// transcript as agentd answered it instead, comments kept, and returns it (the
/// block's new text, which `AGENTD_TRANSCRIPT_WRITE=1` puts into the doc).
pub(super) fn replay(t: &Transcript) -> Option<String> {
    let record = std::env::var_os("AGENTD_TRANSCRIPT_RECORD").is_some();
    let d = start_daemon(&t.args);
    let mut conn: Option<Conn> = None;
    let mut b = Bindings::default();
    let mut seen: Vec<String> = Vec::new();
    let mut recorded = String::new();
    for step in &t.steps {
        let c = conn.get_or_insert_with(|| Conn::open(&d));
        for comment in &step.comments {
            recorded.push_str(comment);
            recorded.push('\n');
        }
        if let Some(request) = &step.request {
            match substitute(request, &b) {
                Value::String(raw) => writeln!(c.writer, "{raw}").expect("write"),
                request => c.send(&request),
            }
            match request {
                Value::String(raw) => recorded.push_str(&format!("> {raw}")),
                request => recorded.push_str(&entry('>', request)),
            }
            recorded.push('\n');
        }
        if record {
            // Everything agentd writes until it is quiet for a while. A line the doc
            // already shows (it matches) is kept as the doc writes it, with its
            // wildcards; any other is written out with new placeholders.
            let mut pending: Vec<&Value> = step.expect.iter().collect();
            while let Some(line) = read_line(c) {
                let known = pending.iter().position(|e| {
                    e["id"] == line["id"] && matches(e, &line, &mut b.clone(), "line").is_ok()
                });
                let shown = match known {
                    Some(i) => {
                        let expected = pending.remove(i);
                        matches(expected, &line, &mut b, "line").expect("matched before");
                        entry('<', expected)
                    }
                    None => entry('<', &generalize_new(&line, &mut b)),
                };
                recorded.push_str(&shown);
                recorded.push('\n');
            }
            if step.closes {
                recorded.push_str("< closed\n");
                conn = None;
            }
            continue;
        }
        let mut pending: Vec<&Value> = step.expect.iter().collect();
        while !pending.is_empty() {
            let line = match read_line(c) {
                Some(line) => line,
                None if record => break,
                None => panic!(
                    "docs/protocol.md line {}: agentd wrote nothing more; still expected:\n{}\nreceived so far:\n{}\n{}",
                    step.line,
                    pending.iter().map(|v| entry('<', v)).collect::<Vec<_>>().join("\n"),
                    seen.join("\n"),
                    d.log()
                ),
            };
            // Lines of one id come in the doc's order; different ids may interleave.
            let slot = pending.iter().position(|e| e["id"] == line["id"]);
            let outcome = match slot {
                Some(i) => {
                    let mut trial = b.clone();
                    matches(pending[i], &line, &mut trial, "line").map(|()| {
                        b = trial;
                        pending.remove(i);
                    })
                }
                None => Err("a line the doc does not show here".to_string()),
            };
            let shown = entry('<', &generalize(&line, &b));
            seen.push(shown.clone());
            recorded.push_str(&shown);
            recorded.push('\n');
            if let Err(why) = outcome {
                if record {
                    if let Some(i) = slot {
                        pending.remove(i);
                    }
                    continue;
                }
                panic!(
                    "docs/protocol.md line {}: agentd's line differs from the doc: {why}\nagentd wrote:\n{shown}\nthe doc expects (this step):\n{}\nreceived before:\n{}",
                    step.line,
                    pending.iter().map(|v| entry('<', v)).collect::<Vec<_>>().join("\n"),
                    seen[..seen.len() - 1].join("\n"),
                );
            }
        }
        if step.closes {
            let mut rest = String::new();
            let n = c.reader.read_line(&mut rest).unwrap_or(0);
            assert_eq!(
                n, 0,
                "docs/protocol.md line {}: agentd should close the connection, wrote {rest}",
                step.line
            );
            recorded.push_str("< closed\n");
            conn = None;
        }
    }
    if !record {
        return None;
    }
    for comment in &t.trailing {
        recorded.push_str(comment);
        recorded.push('\n');
    }
    let block = format!(
        "$ agentd{}\n{recorded}",
        t.args
            .iter()
            .map(|a| if a.contains(' ') {
                format!(" '{a}'")
            } else {
                format!(" {a}")
            })
            .collect::<String>()
    );
    eprintln!(
        "---- transcript at docs/protocol.md line {} as agentd answered it ----\n{block}",
        t.line
    );
    Some(block)
}

/// Puts re-recorded transcripts into docs/protocol.md in place of the old ones.
pub(super) fn write_transcripts(recorded: &[(&Transcript, String)]) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md");
    let doc = protocol_doc();
    let mut lines: Vec<String> = doc.lines().map(String::from).collect();
    let mut blocks: Vec<&(&Transcript, String)> = recorded.iter().collect();
    // From the end, so earlier line numbers stay right.
    blocks.sort_by_key(|(t, _)| std::cmp::Reverse(t.line));
    for (t, text) in blocks {
        let first = t.line - 1;
        lines.splice(first..first + t.lines, text.lines().map(String::from));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    std::fs::write(path, out).unwrap_or_else(|e| panic!("write {path}: {e}"));
    eprintln!("wrote {} transcript(s) into {path}", recorded.len());
}

/// The next line, or `None` after the deadline (or in record mode, a quiet while).
pub(super) fn read_line(c: &mut Conn) -> Option<Value> {
    if std::env::var_os("AGENTD_TRANSCRIPT_RECORD").is_some() {
        let _ = c
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(3)));
    }
    let mut line = String::new();
    match c.reader.read_line(&mut line) {
        Ok(n) if n > 0 => Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("agentd wrote invalid JSON ({e}): {line}")),
        ),
        _ => None,
    }
}
