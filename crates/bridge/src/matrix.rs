//! The Matrix adapter: the client-server API over HTTP. `/sync` long polling (the
//! `since` token is the core's cursor), `PUT /rooms/{room}/send/m.room.message/{txn}`
//! for posts and `m.replace` edits (the transaction id is made of the core's key,
//! so a post made again is one event; a text longer than one event holds is
//! posted in parts; an agent's output is a `<pre><code>` block of an HTML
//! `formatted_body` beside the plain `body`), typing notices, and joining the
//! rooms it is invited to by allowed users (or the configured rooms).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_proto::text;
use anyhow::{bail, Context};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};

use crate::chat::{Batch, Chat, Conversation, Inbound, Outbound};
use crate::config::{Credentials, MatrixConfig};
use crate::core::TYPING_TIMEOUT;

/// The most bytes a plain body the bridge posts takes in the event's JSON
/// (escapes counted): a Matrix event is at most 64 KiB, and an edit carries two
/// copies. A text with output ([`Outbound`]) has a `formatted_body` too: its
/// `body` and `formatted_body` together take at most twice this, less
/// [`HTML_TAGS`] (an edit carries the plain fallback once more: 48 KiB at most).
const MAX_BODY_BYTES: usize = 16 * 1024;
/// Room kept in a formatted part for its tags and what [`html_json_len`]
/// does not count.
const HTML_TAGS: usize = 256;
/// The most messages one post is split into; a longer text is cut in the last.
const MAX_PARTS: usize = 4;
/// The `format` of an HTML `formatted_body`.
const HTML_FORMAT: &str = "org.matrix.custom.html";

/// How many bytes `c` takes in a JSON string.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\t' | '\r' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// How many bytes `c` takes at most in the JSON of a `formatted_body`: escaped
/// for HTML ([`html_escape::encode_text`]) then for JSON; a line end of the lead
/// is a `<br>`.
fn html_json_len(c: char) -> usize {
    match c {
        '&' => 5,
        '<' | '>' | '\n' => 4,
        c => json_len(c),
    }
}

/// How many bytes `c` of a formatted text takes in its `body` and `formatted_body`.
fn formatted_len(c: char) -> usize {
    json_len(c) + html_json_len(c)
}

/// Where to end a part of `text` that takes at most `budget` bytes (each
/// character `cost`): after the last line end that keeps at least half the
/// budget, else at the last character that fits.
fn part_end(text: &str, budget: usize, cost: fn(char) -> usize) -> usize {
    let mut used = 0;
    let mut end = text.len();
    let mut line_end = None;
    for (i, c) in text.char_indices() {
        used += cost(c);
        if used > budget {
            end = i;
            break;
        }
        if c == '\n' && used >= budget / 2 {
            line_end = Some(i + 1);
        }
    }
    if end == text.len() {
        return end;
    }
    line_end.unwrap_or(end)
}

/// One message of a post: a range of the text, and whether the text is cut after
/// it (then it ends with a note, [`text::bridge_cut`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Part {
    range: std::ops::Range<usize>,
    cut: bool,
}

/// `text` as the parts of at most `max_parts` messages, each within the event
/// size (see [`MAX_BODY_BYTES`]), cut at line ends where possible; the last one
/// cut, with the note, when the text is longer still.
fn split(text: &Outbound, max_parts: usize) -> Vec<Part> {
    let (budget, cost): (usize, fn(char) -> usize) = match text.output {
        None => (MAX_BODY_BYTES, json_len),
        Some(_) => (2 * MAX_BODY_BYTES - HTML_TAGS, formatted_len),
    };
    let text = text.text.as_str();
    let mut parts = Vec::new();
    let mut start = 0;
    loop {
        let rest = &text[start..];
        let end = part_end(rest, budget, cost);
        if end == rest.len() {
            parts.push(Part {
                range: start..text.len(),
                cut: false,
            });
            return parts;
        }
        if parts.len() + 1 >= max_parts {
            let note: usize = text::bridge_cut(text.len()).chars().map(cost).sum();
            let head = part_end(rest, budget - note - cost('\n'), cost);
            parts.push(Part {
                range: start..start + head,
                cut: true,
            });
            return parts;
        }
        parts.push(Part {
            range: start..start + end,
            cut: false,
        });
        start += end;
    }
}

/// The `body` of `part`, and for a text with output its `formatted_body`: the
/// lead as HTML text, the output in `<pre><code>`, escaped.
fn render(text: &Outbound, part: &Part) -> (String, Option<String>) {
    let note = part.cut.then(|| text::bridge_cut(text.text.len()));
    let mut body = text.text[part.range.clone()].to_string();
    if let Some(note) = &note {
        if !body.is_empty() && !body.ends_with('\n') {
            body.push('\n');
        }
        body.push_str(note);
    }
    let Some(at) = text.output else {
        return (body, None);
    };
    let (start, end) = (part.range.start, part.range.end);
    let lead = &text.text[start.min(at)..end.min(at)];
    let lead = lead.strip_suffix('\n').unwrap_or(lead);
    let output = &text.text[start.max(at)..end.max(at)];
    let mut html = formatted(lead, output);
    if let Some(note) = &note {
        html.push_str("<p>");
        html.push_str(&html_escape::encode_text(note));
        html.push_str("</p>");
    }
    (body, Some(html))
}

/// `lead`, then `output` (an agent's output) as a code block, in HTML: escaped,
/// the lead's line ends as `<br>`. `chat_html` in examples/bridge.py is the same.
pub fn formatted(lead: &str, output: &str) -> String {
    let mut html = html_escape::encode_text(lead).replace('\n', "<br>");
    if !output.is_empty() {
        html.push_str("<pre><code>");
        html.push_str(&html_escape::encode_text(output));
        html.push_str("</code></pre>");
    }
    html
}

/// The content of an `m.notice` with `body` and, if given, an HTML
/// `formatted_body`.
fn notice(body: &str, html: Option<&str>) -> Value {
    let mut content = json!({"msgtype": "m.notice", "body": body});
    if let Some(html) = html {
        content["format"] = json!(HTML_FORMAT);
        content["formatted_body"] = json!(html);
    }
    content
}

/// How long the homeserver holds a `/sync` open when nothing happens.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Any other request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of one request through transport errors and rate limits.
const ATTEMPTS: u32 = 5;
/// The device the bridge logs in as, so restarts reuse one device.
const DEVICE_ID: &str = "AGENTDMATRIX";

/// Characters kept as they are in a path segment or query value (RFC 3986
/// unreserved); everything else is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn enc(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// A failed request.
#[derive(Debug)]
pub enum HttpError {
    /// No answer: the homeserver is down or the connection broke.
    Transport(String),
    /// The homeserver answered with an error.
    Status {
        status: u16,
        errcode: String,
        error: String,
    },
}

impl HttpError {
    /// The homeserver said no, and asking again will not change that.
    pub fn is_permanent(&self) -> bool {
        matches!(self, HttpError::Status { status, .. } if (400..500).contains(status) && *status != 429)
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Transport(e) => write!(f, "cannot reach the homeserver: {e}"),
            HttpError::Status {
                status,
                errcode,
                error,
            } => write!(f, "the homeserver answered {status} {errcode}: {error}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// A logged-in Matrix client.
pub struct Matrix {
    homeserver: String,
    user: String,
    token: String,
    agent: ureq::Agent,
    /// Room ids served; empty = any room an allowed user invited the bridge to.
    rooms: Vec<String>,
    allowed_users: Vec<String>,
    filter: String,
    /// Set by a poll without a cursor (a fresh start): messages the homeserver
    /// stamped before this moment (ms since the epoch) are history, never acted on,
    /// even when a later sync carries them (Synapse answers a repeated `/sync`
    /// from its response cache for a while, so a fresh start can be fed old
    /// syncs again).
    fresh_start: std::sync::Mutex<Option<u64>>,
}

impl Matrix {
    /// Logs in (password) or checks the token (`whoami`), then joins the configured
    /// rooms. Waits for a homeserver that is not up yet; fails on a refusal.
    pub fn connect(config: &MatrixConfig) -> anyhow::Result<Matrix> {
        if config.homeserver.starts_with("https://") && !cfg!(feature = "tls") {
            bail!(
                "agentd-matrix is built without TLS: build it with `--features matrix-tls`, \
                 or use an http:// homeserver URL (a loopback reverse proxy, for example) \
                 instead of {}",
                config.homeserver
            );
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let mut matrix = Matrix {
            homeserver: config.homeserver.clone(),
            user: config.user.clone(),
            token: String::new(),
            agent,
            rooms: Vec::new(),
            allowed_users: config.allowed_users.clone(),
            // Only what the bridge reads: messages and its own membership, with room
            // for bursts so a timeline is rarely cut ("limited"). The filter names
            // this process (an event type nobody sends), because Synapse answers a
            // `/sync` with the same filter, device and `since` from a cache of
            // answers for two minutes: a restarted bridge would be fed its previous
            // run's answers instead of what is new.
            filter: json!({
                "presence": {"not_types": ["*", format!("org.agentd.matrix.run.{started}")]},
                "account_data": {"not_types": ["*"]},
                "room": {
                    "timeline": {"limit": 100, "types": ["m.room.message", "m.room.member"]},
                    "state": {"lazy_load_members": true, "types": ["m.room.member"]},
                    "ephemeral": {"not_types": ["*"]},
                    "account_data": {"not_types": ["*"]}
                }
            })
            .to_string(),
            fresh_start: std::sync::Mutex::new(None),
        };
        let mut delay = Duration::from_millis(200);
        loop {
            match matrix.login(config) {
                Ok(()) => break,
                Err(e) if e.is_permanent() => {
                    return Err(e).context(format!("cannot log in as {}", config.user))
                }
                Err(e) => {
                    tracing::warn!("{e}; retrying in {delay:?}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        for room in &config.rooms {
            let path = format!("/_matrix/client/v3/join/{}", enc(room));
            let answer = matrix
                .call("POST", &path, &[], Some(&json!({})), REQUEST_TIMEOUT)
                .with_context(|| format!("cannot join {room}"))?;
            let id = answer["room_id"].as_str().unwrap_or(room).to_string();
            tracing::info!(room = %room, room_id = %id, "joined");
            matrix.rooms.push(id);
        }
        Ok(matrix)
    }

    fn login(&mut self, config: &MatrixConfig) -> Result<(), HttpError> {
        match &config.credentials {
            Credentials::AccessToken(token) => self.token = token.clone(),
            Credentials::Password(password) => {
                let body = json!({
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": config.user},
                    "password": password,
                    "device_id": DEVICE_ID,
                    "initial_device_display_name": config.device_name,
                });
                let answer = self.call(
                    "POST",
                    "/_matrix/client/v3/login",
                    &[],
                    Some(&body),
                    REQUEST_TIMEOUT,
                )?;
                self.token = answer["access_token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
            }
        }
        let me = self.call(
            "GET",
            "/_matrix/client/v3/account/whoami",
            &[],
            None,
            REQUEST_TIMEOUT,
        )?;
        let id = me["user_id"].as_str().unwrap_or_default();
        if id != config.user {
            return Err(HttpError::Status {
                status: 403,
                errcode: "M_FORBIDDEN".into(),
                error: format!("the credentials are {id}'s, not {}'s", config.user),
            });
        }
        tracing::info!(user = %id, homeserver = %self.homeserver, "logged in");
        Ok(())
    }

    /// One request, retried through transport errors and rate limits (every
    /// request the bridge makes is idempotent: sends carry a transaction id).
    fn call(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, HttpError> {
        let mut url = format!("{}{path}", self.homeserver);
        for (i, (key, value)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(key);
            url.push('=');
            url.push_str(&enc(value));
        }
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let error = match self.call_once(method, &url, body, timeout) {
                Ok((status, answer, _)) if (200..300).contains(&status) => return Ok(answer),
                Ok((429, answer, retry_after)) => {
                    let wait = answer["retry_after_ms"]
                        .as_u64()
                        .map(Duration::from_millis)
                        .or(retry_after)
                        .unwrap_or(delay)
                        .min(Duration::from_secs(30));
                    tracing::warn!(%path, "rate limited by the homeserver; waiting {wait:?}");
                    delay = wait;
                    status_error(429, &answer)
                }
                Ok((status, answer, _)) => {
                    let error = status_error(status, &answer);
                    if error.is_permanent() {
                        return Err(error);
                    }
                    error
                }
                Err(e) => e,
            };
            if attempt >= ATTEMPTS {
                return Err(error);
            }
            tracing::debug!(%path, "{error}; attempt {attempt} of {ATTEMPTS}, again in {delay:?}");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }

    fn call_once(
        &self,
        method: &str,
        url: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Value, Option<Duration>), HttpError> {
        let builder = ureq::http::Request::builder()
            .method(method)
            .uri(url)
            .header("Accept", "application/json");
        let builder = if self.token.is_empty() {
            builder
        } else {
            builder.header("Authorization", format!("Bearer {}", self.token))
        };
        let transport = |e: ureq::Error| HttpError::Transport(e.to_string());
        let response = match body {
            Some(body) => {
                let request = builder
                    .header("Content-Type", "application/json")
                    .body(body.to_string())
                    .map_err(|e| HttpError::Transport(e.to_string()))?;
                let request = self
                    .agent
                    .configure_request(request)
                    .timeout_global(Some(timeout))
                    .build();
                self.agent.run(request).map_err(transport)?
            }
            None => {
                let request = builder
                    .body(())
                    .map_err(|e| HttpError::Transport(e.to_string()))?;
                let request = self
                    .agent
                    .configure_request(request)
                    .timeout_global(Some(timeout))
                    .build();
                self.agent.run(request).map_err(transport)?
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let answer = response
            .into_body()
            .read_json::<Value>()
            .unwrap_or(Value::Null);
        Ok((status, answer, retry_after))
    }

    /// Sends an event with the transaction id of `key` ([`Chat::post`]): the
    /// homeserver makes one event of every send with the same access token and
    /// transaction id, so a send made again (here through transport errors, or
    /// by the core after a failure) is shown once.
    fn send_event(&self, room: &str, content: &Value, key: &str) -> anyhow::Result<String> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            enc(room),
            enc(&self.txn_id(key))
        );
        let answer = self.call("PUT", &path, &[], Some(content), REQUEST_TIMEOUT)?;
        answer["event_id"]
            .as_str()
            .map(str::to_string)
            .context("the homeserver's answer to a send has no event_id")
    }

    /// The transaction id of the core's `key`. The homeserver keeps transaction
    /// ids per device (the bridge logs in as one, [`DEVICE_ID`]) across restarts
    /// of the bridge; the core's keys are unique across its runs, or the same on
    /// purpose (a task's end made again after a restart).
    fn txn_id(&self, key: &str) -> String {
        format!("agentd.{key}")
    }

    /// Whether the bridge acts on messages in `room`.
    fn serves(&self, room: &str) -> bool {
        self.rooms.is_empty() || self.rooms.iter().any(|r| r == room)
    }

    /// Joins a room it was invited to by an allowed user (or a configured room);
    /// declines other invitations.
    fn on_invite(&self, room: &str, invite: &Value) {
        let inviter = invite["invite_state"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                e["type"] == "m.room.member"
                    && e["state_key"] == self.user.as_str()
                    && e["content"]["membership"] == "invite"
            })
            .and_then(|e| e["sender"].as_str())
            .unwrap_or_default()
            .to_string();
        let welcome = if self.rooms.is_empty() {
            self.allowed_users.contains(&inviter)
        } else {
            self.serves(room)
        };
        let (action, verb) = if welcome {
            (format!("/_matrix/client/v3/join/{}", enc(room)), "joined")
        } else {
            (
                format!("/_matrix/client/v3/rooms/{}/leave", enc(room)),
                "declined",
            )
        };
        match self.call("POST", &action, &[], Some(&json!({})), REQUEST_TIMEOUT) {
            Ok(_) => tracing::info!(%room, %inviter, "invitation {verb}"),
            Err(e) => tracing::warn!(%room, %inviter, "cannot answer the invitation: {e}"),
        }
    }

    /// A text message of a timeline event, if it is one the bridge acts on.
    fn inbound(&self, room: &str, event: &Value) -> Option<Inbound> {
        if event["type"] != "m.room.message" || event["sender"] == self.user.as_str() {
            return None;
        }
        let content = &event["content"];
        if content["msgtype"] != "m.text" {
            return None;
        }
        let relation = &content["m.relates_to"];
        // An edit of a message: the message itself already ran.
        if relation["rel_type"] == "m.replace" {
            return None;
        }
        let thread = (relation["rel_type"] == "m.thread")
            .then(|| relation["event_id"].as_str().map(str::to_string))
            .flatten();
        let mut body = content["body"].as_str()?.to_string();
        if relation["m.in_reply_to"].is_object() && thread.is_none() {
            body = strip_reply_fallback(&body);
        }
        let body = self.strip_mention(&body);
        Some(Inbound {
            conversation: Conversation {
                room: room.to_string(),
                thread,
            },
            message_id: event["event_id"].as_str()?.to_string(),
            sender: event["sender"].as_str()?.to_string(),
            text: body,
        })
    }

    /// `agentd: /status` (how clients write a mention) is `/status`.
    fn strip_mention(&self, body: &str) -> String {
        let local = self
            .user
            .trim_start_matches('@')
            .split(':')
            .next()
            .unwrap_or_default();
        for name in [self.user.as_str(), local] {
            if let Some(rest) = body.strip_prefix(name) {
                if let Some(rest) = rest.strip_prefix(':') {
                    return rest.trim_start().to_string();
                }
            }
        }
        body.to_string()
    }
}

/// The homeserver no longer takes the bridge's access token (logged out).
/// Whether a failed post or edit may pass if made again: not when the homeserver
/// said no for good (a 4xx other than 429: the bridge left the room, the event is
/// too large).
fn may_pass_later(error: &anyhow::Error) -> bool {
    !error
        .downcast_ref::<HttpError>()
        .is_some_and(HttpError::is_permanent)
}

fn revoked(error: &anyhow::Error) -> bool {
    match error.downcast_ref::<HttpError>() {
        Some(HttpError::Status {
            status, errcode, ..
        }) => *status == 401 || errcode == "M_UNKNOWN_TOKEN",
        _ => false,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn status_error(status: u16, answer: &Value) -> HttpError {
    HttpError::Status {
        status,
        errcode: answer["errcode"].as_str().unwrap_or("?").to_string(),
        error: answer["error"].as_str().unwrap_or("").to_string(),
    }
}

/// Drops the `> <@user> quoted` lines a reply starts with (the reply fallback).
fn strip_reply_fallback(body: &str) -> String {
    let mut lines = body.lines().peekable();
    let mut quoted = false;
    while lines.peek().is_some_and(|l| l.starts_with('>')) {
        lines.next();
        quoted = true;
    }
    if !quoted {
        return body.to_string();
    }
    if lines.peek().is_some_and(|l| l.trim().is_empty()) {
        lines.next();
    }
    lines.collect::<Vec<_>>().join("\n")
}

impl Chat for Matrix {
    fn app(&self) -> &str {
        "matrix"
    }

    fn poll(&self, cursor: Option<&str>) -> anyhow::Result<Batch> {
        let timeout_ms = SYNC_TIMEOUT.as_millis().to_string();
        let mut query = vec![("filter", self.filter.as_str())];
        match cursor {
            Some(since) => {
                query.push(("since", since));
                query.push(("timeout", &timeout_ms));
            }
            None => query.push(("timeout", "0")),
        }
        let answer = self.call(
            "GET",
            "/_matrix/client/v3/sync",
            &query,
            None,
            SYNC_TIMEOUT + REQUEST_TIMEOUT,
        )?;
        let next = answer["next_batch"]
            .as_str()
            .context("the homeserver's /sync answer has no next_batch")?
            .to_string();
        if let Some(invites) = answer["rooms"]["invite"].as_object() {
            for (room, invite) in invites {
                self.on_invite(room, invite);
            }
        }
        let mut messages = Vec::new();
        // Without a cursor this is a fresh start: what the homeserver has is history,
        // which the bridge never acts on.
        let not_before = {
            let mut fresh = self.fresh_start.lock().unwrap_or_else(|e| e.into_inner());
            if cursor.is_none() {
                *fresh = Some(now_ms());
            }
            *fresh
        };
        if cursor.is_some() {
            for (room, joined) in answer["rooms"]["join"].as_object().into_iter().flatten() {
                if !self.serves(room) {
                    continue;
                }
                let timeline = &joined["timeline"];
                let events: &[Value] = timeline["events"].as_array().map_or(&[], Vec::as_slice);
                // A room just joined: only what comes after the bridge's own join.
                let start = events
                    .iter()
                    .rposition(|e| {
                        e["type"] == "m.room.member"
                            && e["state_key"] == self.user.as_str()
                            && e["content"]["membership"] == "join"
                            && e["unsigned"]["prev_content"]["membership"] != "join"
                    })
                    .map_or(0, |i| i + 1);
                if timeline["limited"] == true && start == 0 && not_before.is_none() {
                    tracing::warn!(%room, "the homeserver cut this room's timeline: older messages of this sync were skipped");
                }
                let history = |e: &&Value| {
                    not_before.is_some_and(|t| e["origin_server_ts"].as_u64().unwrap_or(0) < t)
                };
                messages.extend(
                    events[start..]
                        .iter()
                        .filter(|e| !history(e))
                        .filter_map(|e| self.inbound(room, e)),
                );
            }
        }
        Ok(Batch {
            messages,
            cursor: Some(next),
        })
    }

    /// A text longer than one event holds goes out as several messages (the
    /// first one's id is the post's); part `i` after the first has the key
    /// `<key>.<i>`, so a post made again sends each part once.
    fn post(&self, to: &Conversation, text: &Outbound, key: &str) -> anyhow::Result<String> {
        let mut first = None;
        for (i, part) in split(text, MAX_PARTS).iter().enumerate() {
            let (body, html) = render(text, part);
            let mut content = notice(&body, html.as_deref());
            if let Some(root) = &to.thread {
                content["m.relates_to"] = json!({
                    "rel_type": "m.thread",
                    "event_id": root,
                    "is_falling_back": true,
                    "m.in_reply_to": {"event_id": root},
                });
            }
            let key = if i == 0 {
                key.to_string()
            } else {
                format!("{key}.{i}")
            };
            let id = self.send_event(&to.room, &content, &key)?;
            first.get_or_insert(id);
        }
        first.context("nothing to post")
    }

    fn edit(
        &self,
        to: &Conversation,
        message_id: &str,
        text: &Outbound,
        key: &str,
    ) -> anyhow::Result<()> {
        let part = &split(text, 1)[0];
        let (body, html) = render(text, part);
        let content = json!({
            "msgtype": "m.notice",
            "body": format!("* {body}"),
            "m.new_content": notice(&body, html.as_deref()),
            "m.relates_to": {"rel_type": "m.replace", "event_id": message_id},
        });
        self.send_event(&to.room, &content, key).map(|_| ())
    }

    fn typing(&self, to: &Conversation, on: bool) -> anyhow::Result<()> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(&to.room),
            enc(&self.user)
        );
        let body = if on {
            json!({"typing": true, "timeout": TYPING_TIMEOUT.as_millis() as u64})
        } else {
            json!({"typing": false})
        };
        self.call("PUT", &path, &[], Some(&body), REQUEST_TIMEOUT)?;
        Ok(())
    }

    fn is_fatal(&self, error: &anyhow::Error) -> bool {
        revoked(error)
    }

    fn may_pass_later(&self, error: &anyhow::Error) -> bool {
        may_pass_later(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// A homeserver on loopback that makes one event per transaction id, as the
    /// spec says, and drops the connection instead of answering the first `lose`
    /// sends (the event was made, the answer is lost).
    struct Homeserver {
        url: String,
        /// The path of every send, in order.
        sends: Arc<Mutex<Vec<String>>>,
        /// The body of every send, in order.
        bodies: Arc<Mutex<Vec<Value>>>,
        /// One event id per transaction path.
        events: Arc<Mutex<HashMap<String, String>>>,
    }

    impl Homeserver {
        fn start(lose: usize) -> Homeserver {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let sends = Arc::new(Mutex::new(Vec::new()));
            let bodies = Arc::new(Mutex::new(Vec::new()));
            let events = Arc::new(Mutex::new(HashMap::new()));
            let lose = Arc::new(Mutex::new(lose));
            let (s, b, e) = (sends.clone(), bodies.clone(), events.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    let (sends, bodies, events, lose) =
                        (s.clone(), b.clone(), e.clone(), lose.clone());
                    std::thread::spawn(move || serve(stream, &sends, &bodies, &events, &lose));
                }
            });
            Homeserver {
                url,
                sends,
                bodies,
                events,
            }
        }
    }

    /// Answers the requests of one connection (keep-alive) until it closes.
    fn serve(
        stream: TcpStream,
        sends: &Mutex<Vec<String>>,
        bodies: &Mutex<Vec<Value>>,
        events: &Mutex<HashMap<String, String>>,
        lose: &Mutex<usize>,
    ) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        loop {
            let mut head = String::new();
            if reader.read_line(&mut head).unwrap_or(0) == 0 {
                return;
            }
            let path = head.split(' ').nth(1).unwrap_or_default().to_string();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            sends.lock().unwrap().push(path.clone());
            bodies
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            let event_id = {
                let mut events = events.lock().unwrap();
                let next = format!("$e{}", events.len() + 1);
                events.entry(path).or_insert(next).clone()
            };
            {
                let mut lose = lose.lock().unwrap();
                if *lose > 0 {
                    *lose -= 1;
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            let answer = json!({ "event_id": event_id }).to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                answer.len()
            );
            if (&stream).write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// A client of `homeserver` that is logged in already.
    fn client(homeserver: &str) -> Matrix {
        Matrix {
            homeserver: homeserver.to_string(),
            user: "@agentd:h".into(),
            token: "token".into(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(REQUEST_TIMEOUT))
                .build()
                .into(),
            rooms: Vec::new(),
            allowed_users: Vec::new(),
            filter: String::new(),
            fresh_start: Mutex::new(None),
        }
    }

    /// The homeserver took a post but its answers were lost, through every attempt
    /// of the adapter: the post fails, and the core makes it again later with the
    /// same key. Every attempt has one transaction id, so the room shows the post
    /// once; another post has an id of its own.
    #[test]
    fn every_attempt_of_one_post_has_one_transaction_id() {
        let server = Homeserver::start(ATTEMPTS as usize);
        let matrix = client(&server.url);
        let to = Conversation::room("!r:h");
        assert!(matrix.post(&to, &Outbound::plain("hello"), "1").is_err());
        assert_eq!(
            matrix.post(&to, &Outbound::plain("hello"), "1").unwrap(),
            "$e1"
        );
        assert_eq!(
            matrix.post(&to, &Outbound::plain("bye"), "2").unwrap(),
            "$e2"
        );
        let sends = server.sends.lock().unwrap().clone();
        assert_eq!(sends.len(), ATTEMPTS as usize + 2, "{sends:?}");
        assert!(
            sends[..=ATTEMPTS as usize].iter().all(|p| *p == sends[0]),
            "{sends:?}"
        );
        assert!(
            sends[0].ends_with("/send/m.room.message/agentd.1"),
            "{sends:?}"
        );
        assert_eq!(server.events.lock().unwrap().len(), 2, "{sends:?}");
    }

    /// A long text (an agent's long result) is posted as several messages, each
    /// under the event size limit, cut at line ends, which together are the whole
    /// text; one too long for [`MAX_PARTS`] messages ends with a note that says
    /// where the whole output is. The parts of one post have transaction ids of
    /// their own, the same in every attempt of the post.
    #[test]
    fn a_long_text_is_posted_in_parts_at_line_ends() {
        let server = Homeserver::start(0);
        let matrix = client(&server.url);
        let to = Conversation::room("!r:h");
        let line = "é".repeat(99) + "\n";
        let long = line.repeat(3 * MAX_BODY_BYTES / line.len());
        assert_eq!(
            matrix
                .post(&to, &Outbound::plain(long.clone()), "1")
                .unwrap(),
            "$e1"
        );
        let bodies: Vec<String> = server
            .bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| b["body"].as_str().unwrap().to_string())
            .collect();
        assert!(
            bodies.len() == 3 || bodies.len() == 4,
            "{} parts",
            bodies.len()
        );
        assert!(bodies.iter().all(|b| b.len() <= MAX_BODY_BYTES));
        assert!(bodies[..bodies.len() - 1].iter().all(|b| b.ends_with('\n')));
        assert_eq!(bodies.concat(), long);
        // Made again (its answer lost): every part has its transaction id again.
        let sends = server.sends.lock().unwrap().clone();
        assert_eq!(
            matrix
                .post(&to, &Outbound::plain(long.clone()), "1")
                .unwrap(),
            "$e1"
        );
        let again = server.sends.lock().unwrap()[sends.len()..].to_vec();
        assert_eq!(again, sends);
        assert_eq!(server.events.lock().unwrap().len(), sends.len());

        // Too long for MAX_PARTS messages: the last one says so.
        let huge = "x".repeat(MAX_PARTS * MAX_BODY_BYTES * 2);
        let before = server.bodies.lock().unwrap().len();
        matrix
            .post(&to, &Outbound::plain(huge.clone()), "2")
            .unwrap();
        let bodies: Vec<String> = server.bodies.lock().unwrap()[before..]
            .iter()
            .map(|b| b["body"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(bodies.len(), MAX_PARTS);
        assert!(bodies.iter().all(|b| b.len() <= MAX_BODY_BYTES));
        let last = bodies.last().unwrap();
        assert!(
            last.ends_with(&text::bridge_cut(huge.len())),
            "{}",
            &last[last.len() - 200..]
        );
    }

    /// A task's result (an agent's output) is posted with an HTML `formatted_body`
    /// where the output is a code block, escaped, beside the plain `body` as
    /// before; so is a progress edit's new content. Plain texts have no format.
    #[test]
    fn output_is_a_code_block_in_the_formatted_body() {
        let server = Homeserver::start(0);
        let matrix = client(&server.url);
        let to = Conversation::room("!r:h");
        let result =
            Outbound::with_output("task T  succeeded <b>", "if a < b && c > d {\n\t\"x\"\n}");
        matrix.post(&to, &result, "1").unwrap();
        matrix.edit(&to, "$e1", &result, "2").unwrap();
        matrix
            .post(&to, &Outbound::plain("a <plain> text"), "3")
            .unwrap();
        let bodies = server.bodies.lock().unwrap().clone();
        let html = "task T  succeeded &lt;b&gt;<pre><code>if a &lt; b &amp;&amp; c &gt; d {\n\t\"x\"\n}</code></pre>";
        assert_eq!(bodies[0]["body"], result.text.as_str());
        assert_eq!(bodies[0]["format"], "org.matrix.custom.html");
        assert_eq!(bodies[0]["formatted_body"], html);
        let new = &bodies[1]["m.new_content"];
        assert_eq!(new["body"], result.text.as_str());
        assert_eq!(new["format"], "org.matrix.custom.html");
        assert_eq!(new["formatted_body"], html);
        assert_eq!(bodies[1]["body"], format!("* {}", result.text));
        assert_eq!(bodies[2]["body"], "a <plain> text");
        assert!(bodies[2].get("format").is_none(), "{}", bodies[2]);
        assert!(bodies[2].get("formatted_body").is_none(), "{}", bodies[2]);
    }

    /// A long result (the worst case for HTML: every character escaped) is posted
    /// in parts, each event within the size limit with its `body` and its
    /// `formatted_body`; the bodies together are the whole text, and every part's
    /// formatted output is a whole code block. An edit is cut to one event.
    #[test]
    fn a_long_formatted_text_is_posted_in_parts_within_the_event_size() {
        let server = Homeserver::start(0);
        let matrix = client(&server.url);
        let to = Conversation::room("!r:h");
        let line = "<&>".repeat(33) + "\n";
        // Three messages or so with HTML, one without.
        let output = line.repeat(MAX_BODY_BYTES / line.len());
        let long = Outbound::with_output("task T  failed", &output);
        matrix.post(&to, &long, "1").unwrap();
        matrix.edit(&to, "$e1", &long, "2").unwrap();
        let bodies = server.bodies.lock().unwrap().clone();
        let (posts, edit) = bodies.split_at(bodies.len() - 1);
        assert!(
            posts.len() > 1 && posts.len() <= MAX_PARTS,
            "{} parts",
            posts.len()
        );
        let plain: Vec<&str> = posts.iter().map(|b| b["body"].as_str().unwrap()).collect();
        assert!(plain.concat() == long.text, "the parts are not the text");
        for (i, post) in posts.iter().enumerate() {
            let html = post["formatted_body"].as_str().unwrap();
            assert!(
                html.starts_with(if i == 0 {
                    "task T  failed<pre><code>"
                } else {
                    "<pre><code>"
                }),
                "{}",
                &html[..40]
            );
            assert!(
                html.ends_with("</code></pre>"),
                "{}",
                &html[html.len() - 40..]
            );
            assert!(!html.contains("<&>"));
            let event = post.to_string().len();
            assert!(event <= 2 * MAX_BODY_BYTES, "part {i}: {event} bytes");
        }
        let event = edit[0].to_string().len();
        assert!(event <= 3 * MAX_BODY_BYTES, "the edit: {event} bytes");
        let new = edit[0]["m.new_content"]["body"].as_str().unwrap();
        assert!(
            new.ends_with(&text::bridge_cut(long.text.len())),
            "{}",
            &new[new.len() - 100..]
        );
        let html = edit[0]["m.new_content"]["formatted_body"].as_str().unwrap();
        assert!(
            html.contains("</code></pre>"),
            "{}",
            &html[html.len() - 200..]
        );
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(enc("!abc:localhost"), "%21abc%3Alocalhost");
        assert_eq!(enc("$ev/1+2"), "%24ev%2F1%2B2");
        assert_eq!(enc("agentd-1-2"), "agentd-1-2");
    }

    /// A plain text as one body, cut (an edit).
    fn fit(text: &str) -> String {
        let text = Outbound::plain(text);
        render(&text, &split(&text, 1)[0]).0
    }

    /// A plain text as the bodies of a post.
    fn parts(text: &str) -> Vec<String> {
        let text = Outbound::plain(text);
        let parts = split(&text, MAX_PARTS);
        parts.iter().map(|p| render(&text, p).0).collect()
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        assert_eq!(fit("short"), "short");
        let long = "é".repeat(MAX_BODY_BYTES);
        let cut = fit(&long);
        assert!(cut.len() <= MAX_BODY_BYTES, "{}", cut.len());
        assert!(cut.ends_with(&text::bridge_cut(long.len())));
        // Measured as the event's JSON takes it: a control character is 6 bytes.
        let escaped = "\u{1b}[1m".repeat(MAX_BODY_BYTES / 4);
        let cut = fit(&escaped);
        let json = serde_json::to_string(&*cut).unwrap();
        assert!(json.len() <= MAX_BODY_BYTES + 2, "{}", json.len());
        assert_eq!(parts("").len(), 1);
    }

    #[test]
    fn a_revoked_token_is_fatal_other_errors_are_not() {
        let status = |status, errcode: &str| {
            anyhow::Error::from(HttpError::Status {
                status,
                errcode: errcode.into(),
                error: String::new(),
            })
        };
        assert!(revoked(&status(401, "M_UNKNOWN_TOKEN")));
        assert!(revoked(&status(401, "M_MISSING_TOKEN")));
        assert!(!revoked(&status(429, "M_LIMIT_EXCEEDED")));
        assert!(!revoked(&status(502, "?")));
        assert!(!revoked(&anyhow::Error::from(HttpError::Transport(
            "refused".into()
        ))));
        assert!(!revoked(&anyhow::anyhow!("no next_batch")));
        // A post or edit is made again after an outage or a rate limit, not after
        // a refusal.
        assert!(!may_pass_later(&status(403, "M_FORBIDDEN")));
        assert!(may_pass_later(&status(429, "M_LIMIT_EXCEEDED")));
        assert!(may_pass_later(&status(502, "?")));
        assert!(may_pass_later(&anyhow::Error::from(HttpError::Transport(
            "refused".into()
        ))));
    }

    #[test]
    fn reply_fallback_is_dropped() {
        assert_eq!(
            strip_reply_fallback("> <@a:h> build it\n> more\n\n/status"),
            "/status"
        );
        assert_eq!(strip_reply_fallback("no quote"), "no quote");
    }
}
