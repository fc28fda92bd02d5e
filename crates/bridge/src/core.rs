//! The chat-independent bridge: sessions, the allow-list, de-duplication, progress
//! shown by editing one message in place, results, typing notices and retries. It
//! talks to agentd through [`Link`] and to the chat through a [`Chat`].
//!
//! Three threads: the poll loop (chat → agentd), the agentd link's reader, and the
//! chat writer, which makes every call that shows something in the chat, in order,
//! so a task's progress edit never overtakes the message it edits.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentd_proto::control::{EventKind, EventView, SendReply, TaskState, TaskView};
use agentd_proto::text;
use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::agentd::{Link, Note, Sent};
use crate::chat::{Chat, Conversation, Inbound, Outbound};
use crate::clean;

/// How many handled message ids the state file keeps.
const SEEN_KEPT: usize = 5_000;
/// A typing notice lasts this long on the homeserver; it is renewed before.
pub const TYPING_TIMEOUT: Duration = Duration::from_secs(30);
const TYPING_RENEW: Duration = Duration::from_secs(20);
const MAX_POLL_DELAY: Duration = Duration::from_secs(30);
/// How many ended tasks the chat writer remembers having reported, so that an end
/// learnt twice (a `status` after a reconnect, then the watch's `finished`) is
/// posted once.
const REPORTED_KEPT: usize = 1_000;
/// A post (or a task's final edit) the chat refused is tried again after this,
/// doubling up to [`MAX_REDO_DELAY`], [`REDO_ATTEMPTS`] times in all.
const FIRST_REDO_DELAY: Duration = Duration::from_secs(1);
const MAX_REDO_DELAY: Duration = Duration::from_secs(60);
const REDO_ATTEMPTS: u32 = 40;
/// The most calls waiting to be tried again; past it the oldest is dropped.
const REDO_KEPT: usize = 1_000;
/// The most unanswered messages the state file keeps.
const UNANSWERED_KEPT: usize = 1_000;
/// The most refused senders remembered ([`State::tell_refused`]).
const REFUSED_KEPT: usize = 10_000;
/// For the tests only (tests/matrix.rs), never for use: when set, the chat writer
/// stops for good right after the chat took a post whose text contains its value,
/// before the state file records that post, so a test can kill the bridge with
/// SIGKILL in that window (see [`hold_after_post`]).
pub const TEST_HOLD_AFTER_POST: &str = "AGENTD_BRIDGE_TEST_HOLD_AFTER_POST";

/// The test hook [`TEST_HOLD_AFTER_POST`]: blocks the calling thread for good after
/// a post of `text` when the hook is set and matches. Without it, nothing.
fn hold_after_post(text: &str) {
    static HOLD: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let hold = HOLD.get_or_init(|| {
        std::env::var(TEST_HOLD_AFTER_POST)
            .ok()
            .filter(|h| !h.is_empty())
    });
    if hold.as_deref().is_some_and(|h| text.contains(h)) {
        tracing::warn!("{TEST_HOLD_AFTER_POST} (a test hook): the chat writer stops after this post until the bridge is killed");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// What the core needs to know.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// agentd's control socket.
    pub socket: PathBuf,
    /// Sent in `hello`.
    pub client: String,
    /// User ids that may give work; everyone else gets a refusal, once per room
    /// and `refusal_interval`.
    pub allowed_users: Vec<String>,
    /// How long a refused sender is not told again in the same room.
    pub refusal_interval: Duration,
    /// The shortest time between two edits of one task's progress message.
    pub progress_interval: Duration,
    /// Where the chat cursor, handled message ids and served sessions are kept.
    pub state_file: PathBuf,
}

/// What survives a restart of the bridge.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The chat's poll position (Matrix: the `/sync` `since` token).
    pub cursor: Option<String>,
    /// Ids of messages already handled, oldest first.
    #[serde(default)]
    pub seen: VecDeque<String>,
    /// The sessions served, so their tasks are watched again after a restart.
    #[serde(default)]
    pub sessions: BTreeMap<String, Conversation>,
    /// The tasks the chat was told about that had not ended, by task id: after a
    /// restart the bridge asks agentd how each stands, so one that ended while the
    /// bridge was down is still reported, and its progress message finished.
    #[serde(default)]
    pub tasks: BTreeMap<String, Followed>,
    /// Messages handed to agentd whose answer has not come (agentd was down, or
    /// the answer was on its way): a restarted bridge sends them again, with their
    /// message id, so one that waited for agentd is not lost.
    #[serde(default)]
    pub unanswered: Vec<Unanswered>,
    /// The refused senders told so within `refusal-interval`, oldest first: kept,
    /// so a restarted bridge does not tell them again at once.
    #[serde(default)]
    pub refused: Vec<Refusal>,
}

/// A refused sender told so in a room, as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub room: String,
    pub sender: String,
    /// When, in milliseconds since the Unix epoch (the wall clock: it is compared
    /// across restarts of the bridge).
    pub at_ms: u64,
}

/// A message agentd has not answered yet, as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unanswered {
    pub session: String,
    pub message_id: String,
    pub text: String,
}

/// A task the chat follows, as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Followed {
    pub session: String,
    /// The bridge's message that shows the task's progress.
    pub message: Option<String>,
}

impl State {
    pub fn load(path: &Path) -> anyhow::Result<State> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("state file {} is not valid", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the state atomically (a temp file renamed over it), mode 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(&serde_json::to_vec(self)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(())
    }

    /// Whether `sender`, refused in `room`, is to be told so now: not when told in
    /// that room less than `interval` ago (then a chatty user or a spammer gets one
    /// refusal, not one per message). At most [`REFUSED_KEPT`] senders are
    /// remembered; past that, no one new is told until some are forgotten.
    /// `now` is the wall clock; a time recorded ahead of it (the clock was set
    /// back) counts as that far in the past.
    fn tell_refused(
        &mut self,
        room: &str,
        sender: &str,
        interval: Duration,
        now: SystemTime,
    ) -> bool {
        let now = ms_since_epoch(now);
        let interval = interval.as_millis().min(u64::MAX as u128) as u64;
        self.refused.retain(|r| now.abs_diff(r.at_ms) < interval);
        if self.refused.len() >= REFUSED_KEPT
            || self
                .refused
                .iter()
                .any(|r| r.room == room && r.sender == sender)
        {
            return false;
        }
        self.refused.push(Refusal {
            room: room.to_string(),
            sender: sender.to_string(),
            at_ms: now,
        });
        true
    }

    /// Records a message id; false when it was already handled.
    fn first_time(&mut self, message_id: &str) -> bool {
        if self.seen.iter().any(|id| id == message_id) {
            return false;
        }
        self.seen.push_back(message_id.to_string());
        while self.seen.len() > SEEN_KEPT {
            self.seen.pop_front();
        }
        true
    }
}

/// What the chat writer is asked to show.
enum Show {
    Note(Box<Note>),
    /// A sender not on the allow-list.
    Refuse {
        to: Conversation,
        sender: String,
    },
    /// A message waits: agentd is not connected.
    Waiting {
        session: String,
        to: Conversation,
    },
}

/// Runs a bridge between `chat` and agentd until the process ends.
pub fn run<C: Chat>(chat: C, config: CoreConfig) -> anyhow::Result<()> {
    let loaded = State::load(&config.state_file)?;
    let chat = Arc::new(chat);
    let sessions: Arc<Mutex<HashMap<String, Conversation>>> =
        Arc::new(Mutex::new(loaded.sessions.clone().into_iter().collect()));
    let followed = loaded.tasks.clone();
    let state = Arc::new(Mutex::new(loaded));
    let (notes_tx, notes_rx) = mpsc::channel::<Note>();
    let (show_tx, show_rx) = mpsc::channel::<Show>();
    // Link notes go through the same queue as refusals, in arrival order.
    {
        let show_tx = show_tx.clone();
        std::thread::Builder::new()
            .name("notes".into())
            .spawn(move || {
                for note in notes_rx {
                    if show_tx.send(Show::Note(Box::new(note))).is_err() {
                        break;
                    }
                }
            })?;
    }
    let link = Link::new(config.socket.clone(), config.client.clone(), notes_tx);
    {
        let state = lock(&state);
        for session in state.sessions.keys() {
            link.watch(session);
        }
        // Not connected yet: these go out (as re-sent) once the link is.
        for waiting in &state.unanswered {
            link.send(&waiting.session, &waiting.message_id, &waiting.text);
        }
    }
    link.spawn();
    {
        let chat = chat.clone();
        let sessions = sessions.clone();
        let interval = config.progress_interval;
        let link = link.clone();
        let ask = Box::new(move |task_id: &str| link.status(task_id));
        let keep: Keep = {
            let state = state.clone();
            let path = config.state_file.clone();
            Box::new(move |tasks| {
                let mut state = lock(&state);
                state.tasks = tasks;
                save(&state, &path);
            })
        };
        let answered: Answered = {
            let state = state.clone();
            let path = config.state_file.clone();
            Box::new(move |message_id| {
                let mut state = lock(&state);
                let before = state.unanswered.len();
                state.unanswered.retain(|u| u.message_id != message_id);
                if state.unanswered.len() != before {
                    save(&state, &path);
                }
            })
        };
        std::thread::Builder::new()
            .name("chat-writer".into())
            .spawn(move || {
                Writer::new(chat, sessions, interval, ask)
                    .following(followed, keep)
                    .answered(answered)
                    .run(show_rx)
            })?;
    }

    // The poll loop: chat → agentd.
    let mut delay = Duration::from_millis(200);
    let mut ready = false;
    loop {
        let cursor = lock(&state).cursor.clone();
        let batch = match chat.poll(cursor.as_deref()) {
            Ok(batch) => {
                delay = Duration::from_millis(200);
                if !ready {
                    ready = true;
                    tracing::info!(app = chat.app(), "ready for messages");
                }
                batch
            }
            Err(e) if chat.is_fatal(&e) => {
                return Err(e.context(format!("{} refused the bridge", chat.app())));
            }
            Err(e) => {
                tracing::warn!(
                    "polling {} failed ({e:#}); retrying in {delay:?}",
                    chat.app()
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_POLL_DELAY);
                continue;
            }
        };
        let mut state = lock(&state);
        for message in batch.messages {
            handle(
                chat.app(),
                &config,
                &mut state,
                &sessions,
                &link,
                &show_tx,
                message,
            );
        }
        if batch.cursor.is_some() && batch.cursor != state.cursor {
            state.cursor = batch.cursor;
            save(&state, &config.state_file);
        }
    }
}

fn save(state: &State, path: &Path) {
    if let Err(e) = state.save(path) {
        tracing::error!("cannot save the bridge's state: {e:#}");
    }
}

/// One inbound message: refused, skipped as already handled, or handed to agentd.
fn handle(
    app: &str,
    config: &CoreConfig,
    state: &mut State,
    sessions: &Mutex<HashMap<String, Conversation>>,
    link: &Link,
    show: &Sender<Show>,
    message: Inbound,
) {
    let Inbound {
        conversation,
        message_id,
        sender,
        text,
    } = message;
    if !state.first_time(&message_id) {
        tracing::info!(%message_id, "message delivered again: already handled");
        return;
    }
    if !config.allowed_users.contains(&sender) {
        let interval = config.refusal_interval;
        let tell = state.tell_refused(&conversation.room, &sender, interval, SystemTime::now());
        save(state, &config.state_file);
        if !tell {
            tracing::info!(%sender, room = %conversation, "refused again: sender not on the allow-list (told already)");
            return;
        }
        tracing::info!(%sender, room = %conversation, "refused: sender not on the allow-list");
        let _ = show.send(Show::Refuse {
            to: conversation,
            sender,
        });
        return;
    }
    let session = conversation.session(app);
    if !state.sessions.contains_key(&session) {
        state.sessions.insert(session.clone(), conversation.clone());
        lock(sessions).insert(session.clone(), conversation.clone());
    }
    // Saved before agentd sees it, with the message until agentd answers: a
    // restart of the bridge sends it again, and agentd's own de-duplication (the
    // message id) covers one it had taken.
    state.unanswered.push(Unanswered {
        session: session.clone(),
        message_id: message_id.clone(),
        text: text.clone(),
    });
    if state.unanswered.len() > UNANSWERED_KEPT {
        let dropped = state.unanswered.remove(0);
        tracing::error!(message_id = %dropped.message_id, "too many messages wait for agentd: the oldest is no longer kept for a restart");
    }
    save(state, &config.state_file);
    if !link.send(&session, &message_id, &text) {
        let _ = show.send(Show::Waiting {
            session,
            to: conversation,
        });
    }
}

/// A task's progress message: its line, then `line`, the agent's output.
fn progress(view: &TaskView, line: &str) -> Outbound {
    Outbound::ending_with_output(text::bridge_progress(view, line), line)
}

/// The key of a post or edit that is the same in every run of the bridge: what
/// (`end`: a task's end, `end-edit`: its progress message's final edit, `answer`:
/// the answer to a message) and of which task or message. A bridge killed after
/// the chat took such a post, before its state file recorded that, makes it again
/// after the restart with this key, and the chat shows it once (Matrix: one
/// transaction id; Synapse keeps them for a day). A task's or message's id is
/// unique across rooms, so the room need not be in it.
fn key_of(what: &str, id: &str) -> String {
    format!("{what}.{id}")
}

fn ms_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .min(u64::MAX as u128) as u64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A task as the chat shows it.
#[derive(Default)]
struct TaskUi {
    /// The task's session.
    session: Option<String>,
    /// The bridge's message that is edited with the task's progress.
    message: Option<String>,
    /// The text that message shows now.
    shown: Outbound,
    /// A newer text waiting for the rate limit.
    pending: Option<Outbound>,
    /// The task's answer waits to be posted again (the chat refused it): its
    /// progress waits for that message instead of opening one of its own.
    awaiting_post: bool,
    last_edit: Option<Instant>,
}

/// Asks agentd how a task stands ([`Link::status`]); the answer comes back as a
/// [`Note::Status`].
type Ask = Box<dyn Fn(&str) + Send>;
/// Keeps the followed tasks in the state file (called when they change).
type Keep = Box<dyn Fn(BTreeMap<String, Followed>) + Send>;
/// Forgets the message with this id from the state file's unanswered ones.
type Answered = Box<dyn Fn(&str) + Send>;

/// A call that failed, to be made again.
/// Each keeps the key of its first attempt ([`Chat::post`]), so the chat shows it
/// once even when an attempt that looked failed had passed.
enum Redo {
    Post {
        to: Conversation,
        body: Outbound,
        key: String,
        /// The task whose answer this is: the message, once posted, is the one
        /// its progress edits.
        task: Option<String>,
        /// The task whose end this is: kept as followed in the state file until
        /// the end is posted, so a restart meanwhile still reports it.
        ends: Option<(String, Followed)>,
    },
    Edit {
        to: Conversation,
        message: String,
        body: Outbound,
        key: String,
        /// A progress edit: a newer edit of the message supersedes it.
        progress: bool,
    },
}

struct Retry {
    redo: Redo,
    due: Instant,
    delay: Duration,
    attempts: u32,
}

/// The chat as the writer uses it: every text it shows goes through
/// [`clean::chat_text`] first (agents write for a terminal), so the adapter gets
/// it cleaned, and cuts the cleaned text into parts where it must.
struct Cleaned<C: Chat>(Arc<C>);

impl<C: Chat> Cleaned<C> {
    fn post(&self, to: &Conversation, text: &Outbound, key: &str) -> anyhow::Result<String> {
        let id = self.0.post(to, &cleaned(text), key)?;
        hold_after_post(&text.text);
        Ok(id)
    }

    fn edit(
        &self,
        to: &Conversation,
        message: &str,
        text: &Outbound,
        key: &str,
    ) -> anyhow::Result<()> {
        self.0.edit(to, message, &cleaned(text), key)
    }

    fn typing(&self, to: &Conversation, on: bool) -> anyhow::Result<()> {
        self.0.typing(to, on)
    }

    fn may_pass_later(&self, error: &anyhow::Error) -> bool {
        self.0.may_pass_later(error)
    }
}

/// `text` cleaned of terminal escapes ([`clean::chat_text`]); its lead and its
/// output apart, so the output still starts where it did.
fn cleaned(text: &Outbound) -> Outbound {
    match text.output() {
        Some(output) => {
            Outbound::with_output(&clean::chat_text(text.lead()), &clean::chat_text(output))
        }
        None => Outbound::plain(clean::chat_text(&text.text)),
    }
}

/// The chat writer: every call that shows something in the chat.
struct Writer<C: Chat> {
    chat: Cleaned<C>,
    sessions: Arc<Mutex<HashMap<String, Conversation>>>,
    interval: Duration,
    /// The tasks the chat was told about that have not ended, as far as it knows.
    tasks: HashMap<String, TaskUi>,
    /// Tasks running in each session, and when its typing notice was last sent.
    typing: HashMap<String, (HashSet<String>, Instant)>,
    ask: Ask,
    keep: Option<Keep>,
    answered: Option<Answered>,
    /// The followed tasks as last kept.
    kept: BTreeMap<String, Followed>,
    /// Tasks whose end was reported (the newest [`REPORTED_KEPT`]).
    reported: HashSet<String>,
    reported_order: VecDeque<String>,
    /// Posts and final edits the chat refused (the homeserver was down), in order:
    /// tried again until they pass, so no answer or result is lost to an outage.
    retries: VecDeque<Retry>,
    first_redo_delay: Duration,
    /// Sessions told that agentd is not running, since the connection was lost.
    told_down: HashSet<String>,
    /// Starts every key of this run of the bridge ([`Writer::key`]).
    run: String,
    /// The last key handed to the chat ([`Chat::post`]).
    last_key: u64,
}

impl<C: Chat> Writer<C> {
    fn new(
        chat: Arc<C>,
        sessions: Arc<Mutex<HashMap<String, Conversation>>>,
        interval: Duration,
        ask: Ask,
    ) -> Self {
        Writer {
            chat: Cleaned(chat),
            sessions,
            interval,
            tasks: HashMap::new(),
            typing: HashMap::new(),
            ask,
            keep: None,
            answered: None,
            kept: BTreeMap::new(),
            reported: HashSet::new(),
            reported_order: VecDeque::new(),
            retries: VecDeque::new(),
            first_redo_delay: FIRST_REDO_DELAY,
            told_down: HashSet::new(),
            run: {
                // One writer per process; the tests make many.
                static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!(
                    "r{}-{}-{n}",
                    std::process::id(),
                    ms_since_epoch(SystemTime::now())
                )
            },
            last_key: 0,
        }
    }

    /// A new key for a post or an edit ([`Chat::post`]), unique across runs of the
    /// bridge: the process id and start time, then a count.
    fn key(&mut self) -> String {
        self.last_key += 1;
        format!("{}.{}", self.run, self.last_key)
    }

    /// Follows the tasks a previous run of the bridge followed (asked about at the
    /// first connection), and keeps the followed tasks with `keep` from now on.
    fn following(mut self, tasks: BTreeMap<String, Followed>, keep: Keep) -> Self {
        for (task_id, followed) in &tasks {
            let ui = self.tasks.entry(task_id.clone()).or_default();
            ui.session = Some(followed.session.clone());
            ui.message = followed.message.clone();
        }
        self.kept = tasks;
        self.keep = Some(keep);
        self
    }

    /// Calls `answered` with the message id of every answer agentd gives.
    fn answered(mut self, answered: Answered) -> Self {
        self.answered = Some(answered);
        self
    }

    /// Calls `keep` when the followed tasks (or their progress messages) changed.
    fn keep_followed(&mut self) {
        let Some(keep) = &self.keep else {
            return;
        };
        let waiting = self.retries.iter().filter_map(|r| match &r.redo {
            Redo::Post {
                ends: Some(ends), ..
            } => Some(ends.clone()),
            _ => None,
        });
        let now: BTreeMap<String, Followed> = self
            .tasks
            .iter()
            .filter_map(|(task_id, ui)| {
                let session = ui.session.clone()?;
                Some((
                    task_id.clone(),
                    Followed {
                        session,
                        message: ui.message.clone(),
                    },
                ))
            })
            .chain(waiting)
            .collect();
        if now != self.kept {
            keep(now.clone());
            self.kept = now;
        }
    }

    fn run(mut self, shows: Receiver<Show>) {
        loop {
            let wait = self.next_due().map_or(Duration::from_secs(3600), |due| {
                due.saturating_duration_since(Instant::now())
            });
            match shows.recv_timeout(wait) {
                Ok(Show::Note(note)) => self.note(*note),
                Ok(Show::Refuse { to, sender }) => {
                    self.post(&to, &text::bridge_refusal(&sender));
                }
                // Said once per chat and outage, not for every message.
                Ok(Show::Waiting { session, to }) => {
                    if self.told_down.insert(session) {
                        self.post(&to, &text::bridge_agentd_down());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Nothing more to show (the tests); what waits to be tried again
                // is still tried.
                Err(RecvTimeoutError::Disconnected) if self.retries.is_empty() => return,
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
            self.flush_retries();
            self.flush_due();
            self.keep_followed();
        }
    }

    fn conversation(&self, session: &str) -> Option<Conversation> {
        lock(&self.sessions).get(session).cloned()
    }

    /// Posts `body`; when the chat refuses it, it is tried again later (so is
    /// every post while earlier ones wait, to keep their order).
    fn post(&mut self, to: &Conversation, body: &str) -> Option<String> {
        let key = self.key();
        self.post_for(to, Outbound::plain(body), key, None).ok()
    }

    /// Like [`Writer::post`], with `key` ([`key_of`]), for the answer to `task` if
    /// given: the error is whether the post waits to be made again (true) or was
    /// refused for good.
    fn post_for(
        &mut self,
        to: &Conversation,
        body: Outbound,
        key: String,
        task: Option<&str>,
    ) -> Result<String, bool> {
        if self.retries.is_empty() {
            match self.chat.post(to, &body, &key) {
                Ok(id) => return Ok(id),
                Err(e) if !self.chat.may_pass_later(&e) => {
                    tracing::error!(room = %to, "cannot post in the chat: {e:#}");
                    return Err(false);
                }
                Err(e) => {
                    tracing::error!(room = %to, "cannot post in the chat, will try again: {e:#}")
                }
            }
        }
        self.redo(Redo::Post {
            to: to.clone(),
            body,
            key,
            task: task.map(str::to_string),
            ends: None,
        });
        Err(true)
    }

    /// Posts the end of `task_id` (its key: [`key_of`]); while the post waits to be
    /// made again, the task is kept as followed (`followed`) in the state file.
    fn post_end(&mut self, to: &Conversation, body: Outbound, task_id: &str, followed: Followed) {
        if self.post_for(to, body, key_of("end", task_id), None) == Err(true) {
            if let Some(Retry {
                redo: Redo::Post { ends, .. },
                ..
            }) = self.retries.back_mut()
            {
                *ends = Some((task_id.to_string(), followed));
            }
        }
    }

    /// Edits a message for the last time (a task's end), tried again like a post,
    /// with `key` ([`key_of`]).
    fn final_edit(&mut self, to: &Conversation, message: &str, body: Outbound, key: String) {
        self.supersede_progress(message);
        if self.retries.is_empty() {
            match self.chat.edit(to, message, &body, &key) {
                Ok(()) => return,
                Err(e) if !self.chat.may_pass_later(&e) => {
                    tracing::warn!(room = %to, "cannot edit the progress message: {e:#}");
                    return;
                }
                Err(e) => {
                    tracing::warn!(room = %to, "cannot edit the progress message, will try again: {e:#}")
                }
            }
        }
        self.redo(Redo::Edit {
            to: to.clone(),
            message: message.to_string(),
            body,
            key,
            progress: false,
        });
    }

    /// Drops the progress edit of `message` that waits to be made again: a newer
    /// edit of it is about to be made.
    fn supersede_progress(&mut self, message: &str) {
        self.retries.retain(
            |r| !matches!(&r.redo, Redo::Edit { message: m, progress: true, .. } if m == message),
        );
    }

    fn redo(&mut self, redo: Redo) {
        let delay = self.first_redo_delay;
        self.retries.push_back(Retry {
            redo,
            due: Instant::now() + delay,
            delay,
            attempts: 1,
        });
        if self.retries.len() > REDO_KEPT {
            if let Some(Retry {
                redo: Redo::Post {
                    task: Some(task), ..
                },
                ..
            }) = self.retries.pop_front()
            {
                if let Some(ui) = self.tasks.get_mut(&task) {
                    ui.awaiting_post = false;
                }
            }
            tracing::error!("too many chat calls wait to be tried again: the oldest is dropped");
        }
    }

    /// Makes the calls that wait, in order, while they pass.
    fn flush_retries(&mut self) {
        while let Some(retry) = self.retries.front_mut() {
            if Instant::now() < retry.due {
                return;
            }
            let result = match &retry.redo {
                Redo::Post { to, body, key, .. } => self.chat.post(to, body, key).map(Some),
                Redo::Edit {
                    to,
                    message,
                    body,
                    key,
                    ..
                } => self.chat.edit(to, message, body, key).map(|()| None),
            };
            match result {
                Ok(posted) => {
                    if let Some(Retry {
                        redo:
                            Redo::Post {
                                body,
                                task: Some(task),
                                ..
                            },
                        ..
                    }) = self.retries.pop_front()
                    {
                        if let Some(ui) = self.tasks.get_mut(&task) {
                            ui.awaiting_post = false;
                            if ui.message.is_none() {
                                ui.message = posted;
                                ui.shown = body;
                            }
                        }
                    }
                }
                Err(e) if retry.attempts >= REDO_ATTEMPTS || !self.chat.may_pass_later(&e) => {
                    tracing::error!(
                        "the chat refused a message {} times; dropped: {e:#}",
                        retry.attempts
                    );
                    if let Some(Retry {
                        redo:
                            Redo::Post {
                                task: Some(task), ..
                            },
                        ..
                    }) = self.retries.pop_front()
                    {
                        if let Some(ui) = self.tasks.get_mut(&task) {
                            ui.awaiting_post = false;
                        }
                    }
                }
                Err(e) => {
                    retry.attempts += 1;
                    retry.delay = (retry.delay * 2).min(MAX_REDO_DELAY);
                    retry.due = Instant::now() + retry.delay;
                    tracing::warn!(
                        "the chat still refuses a message ({e:#}); again in {:?}",
                        retry.delay
                    );
                    return;
                }
            }
        }
    }

    fn note(&mut self, note: Note) {
        match note {
            Note::Answer { sent, answer } => self.answer(sent, answer),
            Note::Event(event) => self.event(event),
            // The new watches' snapshots show what still runs, but a task that ended
            // while the connection was down (agentd restarted: `interrupted`, or it
            // finished) is in none of them: ask how each known task stands.
            Note::Connected { .. } => {
                self.told_down.clear();
                let mut live: Vec<&String> = self.tasks.keys().collect();
                live.sort();
                for task_id in live {
                    (self.ask)(task_id);
                }
            }
            Note::Rewatched { session } => {
                let mut live: Vec<&String> = self
                    .tasks
                    .iter()
                    .filter(|(_, ui)| ui.session.as_deref() == Some(session.as_str()))
                    .map(|(id, _)| id)
                    .collect();
                live.sort();
                for task_id in live {
                    (self.ask)(task_id);
                }
            }
            Note::Status { task_id, answer } => self.status(task_id, answer),
            Note::WatchRefused { session, message } => {
                tracing::error!(%session, "agentd refused to watch this chat: {message}");
            }
            // What ran may have ended unseen (agentd restarted): no typing notice
            // stays up for it. The tasks it was up for are kept, to be asked about
            // once reconnected.
            Note::Lost => {
                for (session, (running, _)) in std::mem::take(&mut self.typing) {
                    for task_id in running {
                        let ui = self.tasks.entry(task_id).or_default();
                        ui.session.get_or_insert_with(|| session.clone());
                    }
                    if let Some(to) = self.conversation(&session) {
                        let _ = self.chat.typing(&to, false);
                    }
                }
            }
        }
    }

    /// How a task the chat knew as live stands after a reconnect or a lagged watch.
    fn status(&mut self, task_id: String, answer: Result<TaskView, String>) {
        let Some(session) = self.tasks.get(&task_id).map(|ui| ui.session.clone()) else {
            // Its end came meanwhile (the watch's `finished`) and was reported.
            return;
        };
        match answer {
            Ok(view) if view.state.is_terminal() => {
                let session = session.unwrap_or_else(|| view.session.clone());
                self.finished(&session, view);
            }
            // Still queued or running: the session's new watch follows it.
            Ok(_) => {}
            Err(code) if code == "not_found" => {
                // Another agentd (a new state dir) never heard of the task: its end
                // will not come, and the room should not wait for it.
                tracing::info!(%task_id, "agentd does not know the task any more");
                let ui = self.tasks.remove(&task_id);
                if let Some(session) = session.as_deref() {
                    self.typing_off(session, &task_id);
                }
                if !self.first_report(&task_id) {
                    return;
                }
                let to = session.as_deref().and_then(|s| self.conversation(s));
                if let (Some(to), Some(session)) = (to, session) {
                    let body = Outbound::plain(text::bridge_task_unknown(&task_id));
                    let message = ui.and_then(|ui| ui.message);
                    if let Some(message) = &message {
                        let key = key_of("end-edit", &task_id);
                        self.final_edit(&to, message, body.clone(), key);
                    }
                    self.post_end(&to, body, &task_id, Followed { session, message });
                }
            }
            Err(e) => {
                tracing::warn!(%task_id, "cannot ask agentd how the task stands: {e}")
            }
        }
    }

    /// Whether the end of `task_id` is reported for the first time (and notes it).
    fn first_report(&mut self, task_id: &str) -> bool {
        if !self.reported.insert(task_id.to_string()) {
            return false;
        }
        self.reported_order.push_back(task_id.to_string());
        while self.reported_order.len() > REPORTED_KEPT {
            if let Some(old) = self.reported_order.pop_front() {
                self.reported.remove(&old);
            }
        }
        true
    }

    /// agentd's answer to a message: posted, and the task it started followed.
    /// The message is kept in the state file as unanswered until then (and the task
    /// kept as followed), so a bridge killed before this is done sends it again
    /// after its restart, and posts the answer again with the same key.
    fn answer(&mut self, sent: Sent, answer: Result<SendReply, String>) {
        let message_id = sent.message_id.clone();
        self.show_answer(sent, answer);
        self.keep_followed();
        if let Some(answered) = &self.answered {
            answered(&message_id);
        }
    }

    fn show_answer(&mut self, sent: Sent, answer: Result<SendReply, String>) {
        let Some(to) = self.conversation(&sent.session) else {
            return;
        };
        let key = key_of("answer", &sent.message_id);
        let reply = match answer {
            Ok(reply) => reply,
            Err(message) => {
                let _ = self.post_for(&to, Outbound::plain(message), key, None);
                return;
            }
        };
        if reply.duplicate && !sent.resent {
            // Answered when it first came; nothing ran again.
            tracing::info!(message_id = %sent.message_id, "agentd: a re-delivered message, not run again");
            return;
        }
        let Some(task) = reply.task.filter(|_| reply.accepted) else {
            let _ = self.post_for(&to, Outbound::plain(reply.reply), key, None);
            return;
        };
        let posted = self.post_for(
            &to,
            Outbound::plain(reply.reply.clone()),
            key,
            Some(&task.task_id),
        );
        let ui = self.tasks.entry(task.task_id.clone()).or_default();
        ui.session = Some(sent.session.clone());
        if ui.message.is_none() {
            ui.awaiting_post = posted == Err(true);
            ui.message = posted.ok();
            ui.shown = Outbound::plain(reply.reply);
        }
        if matches!(task.state, TaskState::Starting | TaskState::Running) {
            self.typing_on(&sent.session, &task.task_id);
        }
        if task.state == TaskState::Merged {
            // Merged at once (steered): nothing more comes for this task.
            self.tasks.remove(&task.task_id);
        } else if task.state.is_terminal() {
            // A message sent again (after a restart of the bridge) whose task has
            // ended meanwhile: its end is reported here, once.
            self.finished(&sent.session, task);
        }
    }

    fn event(&mut self, event: EventView) {
        match event.kind {
            EventKind::Started => self.typing_on(&event.session, &event.task_id),
            EventKind::Progress => {
                let (Some(view), Some(line)) = (&event.task, &event.text) else {
                    return;
                };
                let body = progress(view, line);
                let ui = self.tasks.entry(event.task_id.clone()).or_default();
                ui.pending = Some(body);
                ui.session = Some(event.session.clone());
                self.typing_on(&event.session, &event.task_id);
            }
            EventKind::Finished => {
                if let Some(view) = event.task {
                    self.finished(&event.session, view);
                }
            }
            _ => {}
        }
    }

    fn finished(&mut self, session: &str, view: TaskView) {
        self.typing_off(session, &view.task_id);
        let ui = self.tasks.remove(&view.task_id);
        if !self.first_report(&view.task_id) {
            return;
        }
        let Some(to) = self.conversation(session) else {
            return;
        };
        let followed = Followed {
            session: session.to_string(),
            message: ui.as_ref().and_then(|ui| ui.message.clone()),
        };
        // The progress message keeps the last line it showed, under the final state.
        if let Some(TaskUi {
            message: Some(message),
            pending,
            shown,
            ..
        }) = ui
        {
            // A message from before a restart of the bridge shows what it showed
            // then; the view's latest progress line is at least as new.
            let last = pending
                .as_ref()
                .and_then(Outbound::output)
                .or(view.progress.as_deref())
                .or(shown.output());
            let body = match last {
                Some(line) => progress(&view, line),
                None => Outbound::plain(text::task_line(&view)),
            };
            self.final_edit(&to, &message, body, key_of("end-edit", &view.task_id));
        }
        if view.state != TaskState::Merged {
            let body = text::bridge_finished(&view);
            let body = match view.result.as_deref() {
                Some(result) => Outbound::ending_with_output(body, result),
                None => Outbound::plain(body),
            };
            self.post_end(&to, body, &view.task_id, followed);
        }
    }

    fn typing_on(&mut self, session: &str, task_id: &str) {
        let now = Instant::now();
        let entry = self
            .typing
            .entry(session.to_string())
            .or_insert_with(|| (HashSet::new(), now - TYPING_RENEW * 2));
        let first = entry.0.is_empty();
        entry.0.insert(task_id.to_string());
        if first || now.duration_since(entry.1) >= TYPING_RENEW {
            entry.1 = now;
            if let Some(to) = self.conversation(session) {
                if let Err(e) = self.chat.typing(&to, true) {
                    tracing::warn!(room = %to, "cannot send a typing notice: {e:#}");
                }
            }
        }
    }

    fn typing_off(&mut self, session: &str, task_id: &str) {
        let Some(entry) = self.typing.get_mut(session) else {
            return;
        };
        if entry.0.remove(task_id) && entry.0.is_empty() {
            self.typing.remove(session);
            if let Some(to) = self.conversation(session) {
                if let Err(e) = self.chat.typing(&to, false) {
                    tracing::warn!(room = %to, "cannot end the typing notice: {e:#}");
                }
            }
        }
    }

    /// The next moment a progress edit or a typing renewal is due.
    fn next_due(&self) -> Option<Instant> {
        let edits = self
            .tasks
            .values()
            .filter(|t| t.pending.is_some() && !t.awaiting_post)
            .map(|t| {
                t.last_edit
                    .map_or_else(Instant::now, |at| at + self.interval)
            });
        let typing = self.typing.values().map(|(_, at)| *at + TYPING_RENEW);
        let retry = self.retries.front().map(|r| r.due);
        edits.chain(typing).chain(retry).min()
    }

    fn flush_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.pending.is_some()
                    && !t.awaiting_post
                    && t.last_edit.is_none_or(|at| now >= at + self.interval)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for task_id in due {
            let session = self.tasks[&task_id].session.clone();
            let to = session.and_then(|s| self.conversation(&s));
            let ui = self.tasks.get_mut(&task_id).expect("listed above");
            let body = ui.pending.take().expect("listed above");
            ui.last_edit = Some(now);
            let Some(to) = to.filter(|_| body != ui.shown) else {
                continue;
            };
            ui.shown = body.clone();
            let message = ui.message.clone();
            let key = self.key();
            match message {
                Some(message) => {
                    self.supersede_progress(&message);
                    match self.chat.edit(&to, &message, &body, &key) {
                        Ok(()) => {}
                        Err(e) if !self.chat.may_pass_later(&e) => {
                            tracing::warn!(room = %to, "cannot edit the progress message: {e:#}");
                        }
                        Err(e) => {
                            tracing::warn!(room = %to, "cannot edit the progress message, will try again: {e:#}");
                            self.redo(Redo::Edit {
                                to,
                                message,
                                body,
                                key,
                                progress: true,
                            });
                        }
                    }
                }
                None => match self.chat.post(&to, &body, &key) {
                    Ok(id) => {
                        if let Some(ui) = self.tasks.get_mut(&task_id) {
                            ui.message = Some(id);
                        }
                    }
                    Err(e) => tracing::warn!(room = %to, "cannot post progress: {e:#}"),
                },
            }
            // The interval counts from the end of this call: a slow homeserver gets
            // fewer edits, not a burst of them.
            if let Some(ui) = self.tasks.get_mut(&task_id) {
                ui.last_edit = Some(Instant::now());
            }
        }
        let renew: Vec<String> = self
            .typing
            .iter()
            .filter(|(_, (_, at))| now >= *at + TYPING_RENEW)
            .map(|(s, _)| s.clone())
            .collect();
        for session in renew {
            if let Some(entry) = self.typing.get_mut(&session) {
                entry.1 = now;
            }
            if let Some(to) = self.conversation(&session) {
                let _ = self.chat.typing(&to, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A chat that records what the core shows in it.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        /// How many of the next posts and edits fail (the homeserver is down).
        failing: Mutex<u32>,
        /// Posts of texts containing this fail for good (removed from the room).
        refused: Option<&'static str>,
        /// The key of every post and edit attempt, beside the call as in `calls`.
        keys: Mutex<Vec<(String, String)>>,
        /// The agent's output of every post and edit attempt ([`Outbound::output`]).
        outputs: Mutex<Vec<Option<String>>>,
    }

    impl Recorder {
        fn fails(&self, what: String) -> bool {
            let mut failing = lock(&self.failing);
            if *failing == 0 {
                return false;
            }
            *failing -= 1;
            lock(&self.calls).push(format!("fail {what}"));
            true
        }
    }

    impl Chat for Recorder {
        fn app(&self) -> &str {
            "test"
        }
        fn poll(&self, _: Option<&str>) -> anyhow::Result<crate::chat::Batch> {
            unreachable!("the writer never polls")
        }
        fn post(&self, _: &Conversation, text: &Outbound, key: &str) -> anyhow::Result<String> {
            lock(&self.outputs).push(text.output().map(str::to_string));
            let text = &text.text;
            lock(&self.keys).push((format!("post {text}"), key.to_string()));
            if self.refused.is_some_and(|r| text.contains(r)) {
                lock(&self.calls).push(format!("refused post {text}"));
                anyhow::bail!("forbidden");
            }
            if self.fails(format!("post {text}")) {
                anyhow::bail!("the homeserver is down");
            }
            let mut calls = lock(&self.calls);
            calls.push(format!("post {text}"));
            Ok(format!("m{}", calls.len()))
        }
        fn edit(
            &self,
            _: &Conversation,
            id: &str,
            text: &Outbound,
            key: &str,
        ) -> anyhow::Result<()> {
            lock(&self.outputs).push(text.output().map(str::to_string));
            let text = &text.text;
            lock(&self.keys).push((format!("edit {id} {text}"), key.to_string()));
            if self.fails(format!("edit {id} {text}")) {
                anyhow::bail!("the homeserver is down");
            }
            lock(&self.calls).push(format!("edit {id} {text}"));
            Ok(())
        }
        fn typing(&self, _: &Conversation, on: bool) -> anyhow::Result<()> {
            lock(&self.calls).push(format!("typing {on}"));
            Ok(())
        }
        fn may_pass_later(&self, error: &anyhow::Error) -> bool {
            error.to_string() != "forbidden"
        }
    }

    fn view(state: &str, result: Option<&str>) -> Value {
        json!({"task_id": "T", "session": "test:r", "state": state, "position": null,
               "pid": null, "created_at": "2026-12-01T00:00:00.000Z", "started_at": null,
               "finished_at": null, "text": "work", "progress": null, "result": result,
               "exit": null})
    }

    fn event(kind: &str, text: Option<&str>, task: Value) -> Show {
        let event = json!({"kind": kind, "task_id": "T", "session": "test:r", "text": text,
                           "task": task});
        Show::Note(Box::new(Note::Event(
            serde_json::from_value(event).unwrap(),
        )))
    }

    /// Run the writer over `shows` until they are all handled; what it did.
    fn run_writer(interval: Duration, shows: Vec<Show>) -> Vec<String> {
        run_writer_asking(interval, shows).0
    }

    /// Like [`run_writer`]; also the tasks it asked agentd about, in order.
    fn run_writer_asking(interval: Duration, shows: Vec<Show>) -> (Vec<String>, Vec<String>) {
        run_writer_on(Arc::new(Recorder::default()), interval, None, shows)
    }

    /// Like [`run_writer_asking`], on `chat`, with the first delay before a refused
    /// post is made again set to `redo` if given.
    fn run_writer_on(
        chat: Arc<Recorder>,
        interval: Duration,
        redo: Option<Duration>,
        shows: Vec<Show>,
    ) -> (Vec<String>, Vec<String>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let ask: Ask = {
            let asked = asked.clone();
            Box::new(move |task_id: &str| lock(&asked).push(task_id.to_string()))
        };
        let sessions = Arc::new(Mutex::new(HashMap::from([(
            "test:r".to_string(),
            Conversation::room("r"),
        )])));
        let (tx, rx) = mpsc::channel();
        for show in shows {
            tx.send(show).unwrap();
        }
        drop(tx);
        let mut writer = Writer::new(chat.clone(), sessions, interval, ask);
        if let Some(redo) = redo {
            writer.first_redo_delay = redo;
        }
        writer.run(rx);
        let calls = lock(&chat.calls).clone();
        let asked = lock(&asked).clone();
        (calls, asked)
    }

    /// A writer on `chat` for the room `test:r` that a test steps itself (no
    /// progress interval, refused posts due again at once, nothing asked).
    fn stepped_writer(chat: &Arc<Recorder>) -> Writer<Recorder> {
        let sessions = Arc::new(Mutex::new(HashMap::from([(
            "test:r".to_string(),
            Conversation::room("r"),
        )])));
        let mut writer = Writer::new(
            chat.clone(),
            sessions,
            Duration::ZERO,
            Box::new(|_: &str| {}),
        );
        writer.first_redo_delay = Duration::ZERO;
        writer
    }

    /// Gives a stepped writer one note and makes what is due of it.
    fn show_now(writer: &mut Writer<Recorder>, show: Show) {
        let Show::Note(note) = show else {
            unreachable!()
        };
        writer.note(*note);
        writer.flush_due();
    }

    fn started_answer() -> Show {
        let reply: SendReply = serde_json::from_value(json!({
            "reply": "task T  started", "accepted": true, "task": view("starting", None)
        }))
        .unwrap();
        let sent = Sent {
            session: "test:r".into(),
            message_id: "$e".into(),
            text: "work".into(),
            resent: false,
        };
        Show::Note(Box::new(Note::Answer {
            sent,
            answer: Ok(reply),
        }))
    }

    fn crashed() -> Value {
        let mut crashed = view("interrupted", None);
        crashed["exit"] = json!({"reason": "daemon crashed"});
        crashed
    }

    fn status(answer: Result<Value, &str>) -> Show {
        Show::Note(Box::new(Note::Status {
            task_id: "T".into(),
            answer: answer
                .map(|v| serde_json::from_value(v).unwrap())
                .map_err(str::to_string),
        }))
    }

    fn note(note: Note) -> Show {
        Show::Note(Box::new(note))
    }

    /// agentd died under a running task and came back: the task is `interrupted`
    /// (no `finished` was ever written for it). Once reconnected the writer asks
    /// how it stands and reports the end once, also when the watch's `finished`
    /// comes after the `status` answer (a task that ended just after the reconnect).
    #[test]
    fn a_task_that_ended_while_agentd_was_down_is_reported_once_after_the_reconnect() {
        let connected = || {
            note(Note::Connected {
                server: "agentd".into(),
            })
        };
        let shows = vec![
            started_answer(),
            event("started", None, view("running", None)),
            event("progress", Some("step 1"), view("running", None)),
            note(Note::Lost),
            connected(),
            status(Ok(crashed())),
            event("finished", None, crashed()),
            // A later reconnect asks about nothing: the task is known to have ended.
            note(Note::Lost),
            connected(),
        ];
        let (calls, asked) = run_writer_asking(Duration::from_secs(60), shows);
        assert_eq!(asked, ["T"]);
        assert_eq!(
            calls,
            [
                "post task T  started",
                "typing true",
                "edit m1 task T  running\nstep 1",
                "typing false",
                "edit m1 task T  interrupted (daemon crashed)\nstep 1",
                "post task T  interrupted (daemon crashed)",
            ]
        );
    }

    /// A task still live after the reconnect is followed on (its events keep coming
    /// through the new watch); one the new agentd never heard of is forgotten; a
    /// `finished` that comes before the `status` answer is the one reported.
    #[test]
    fn after_a_reconnect_live_tasks_are_followed_and_each_end_is_posted_once() {
        let connected = || {
            note(Note::Connected {
                server: "agentd".into(),
            })
        };
        // Still running, then it ends: reported by its event.
        let shows = vec![
            started_answer(),
            note(Note::Lost),
            connected(),
            status(Ok(view("running", None))),
            event("progress", Some("later"), view("running", None)),
            event("finished", None, view("succeeded", Some("done"))),
            status(Ok(view("succeeded", Some("done")))),
        ];
        let (calls, asked) = run_writer_asking(Duration::from_secs(60), shows);
        assert_eq!(asked, ["T"]);
        assert_eq!(
            calls,
            [
                "post task T  started",
                "typing true",
                "typing false",
                "typing true",
                "edit m1 task T  running\nlater",
                "typing false",
                "edit m1 task T  succeeded\nlater",
                "post task T  succeeded\ndone",
            ]
        );
        // Unknown to the new agentd (another state dir): the room is told that its
        // end will not come, once; it is not asked about again.
        let shows = vec![
            started_answer(),
            note(Note::Lost),
            connected(),
            status(Err("not_found")),
            note(Note::Lost),
            connected(),
        ];
        let (calls, asked) = run_writer_asking(Duration::from_secs(60), shows);
        assert_eq!(asked, ["T"]);
        let unknown = text::bridge_task_unknown("T");
        assert_eq!(
            calls,
            [
                "post task T  started".to_string(),
                "typing true".to_string(),
                "typing false".to_string(),
                format!("edit m1 {unknown}"),
                format!("post {unknown}"),
            ]
        );
        // A lagged watch asks about the live tasks of its session only.
        let shows = vec![
            started_answer(),
            note(Note::Rewatched {
                session: "test:other".into(),
            }),
            note(Note::Rewatched {
                session: "test:r".into(),
            }),
            status(Ok(view("failed", Some("boom")))),
        ];
        let (calls, asked) = run_writer_asking(Duration::from_secs(60), shows);
        assert_eq!(asked, ["T"]);
        assert_eq!(
            calls,
            [
                "post task T  started",
                "typing true",
                "typing false",
                "edit m1 task T  failed  work",
                "post task T  failed\nboom",
            ]
        );
    }

    #[test]
    fn progress_edits_one_message_at_most_once_per_interval_then_the_result() {
        let reply: SendReply = serde_json::from_value(json!({
            "reply": "task T  started", "accepted": true, "task": view("starting", None)
        }))
        .unwrap();
        let sent = Sent {
            session: "test:r".into(),
            message_id: "$e".into(),
            text: "work".into(),
            resent: false,
        };
        let mut shows = vec![Show::Note(Box::new(Note::Answer {
            sent,
            answer: Ok(reply),
        }))];
        shows.push(event("started", None, view("running", None)));
        for i in 1..=50 {
            let line = format!("step {i}");
            shows.push(event("progress", Some(&line), view("running", None)));
        }
        shows.push(event("finished", None, view("succeeded", Some("all done"))));
        let calls = run_writer(Duration::from_secs(60), shows);
        assert_eq!(
            calls,
            [
                "post task T  started",
                "typing true",
                "edit m1 task T  running\nstep 1",
                "typing false",
                "edit m1 task T  succeeded\nstep 50",
                "post task T  succeeded\nall done",
            ]
        );
    }

    /// The chat is told which part of a text is an agent's output (for a code
    /// block): the progress line of the progress message and its final edit, and
    /// a task's result; answers are plain text. Cleaned, the output is still the
    /// end of the text.
    #[test]
    fn results_and_progress_lines_are_handed_to_the_chat_as_output() {
        let chat = Arc::new(Recorder::default());
        let shows = vec![
            started_answer(),
            event(
                "progress",
                Some("\x1b[1mstep\x1b[0m 1"),
                view("running", None),
            ),
            event("finished", None, view("succeeded", Some("all <done>"))),
        ];
        run_writer_on(chat.clone(), Duration::ZERO, None, shows);
        let outputs = lock(&chat.outputs).clone();
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            outputs,
            [None, some("step 1"), some("step 1"), some("all <done>")]
        );
        assert_eq!(
            lock(&chat.calls)[5],
            "post task T  succeeded\nall <done>",
            "the plain text is as before"
        );
    }

    /// Agents' output written for a terminal (colours, a hyperlink, a `\r` progress
    /// bar, an error text with colours) reaches the chat cleaned, in every call that
    /// shows it: the progress edit, the final edit, the result, and posts made again.
    #[test]
    fn terminal_escapes_in_agents_output_do_not_reach_the_chat() {
        let chat = Arc::new(Recorder {
            failing: Mutex::new(1),
            ..Recorder::default()
        });
        let mut shows = vec![started_answer()];
        shows.push(event("started", None, view("running", None)));
        shows.push(event(
            "progress",
            Some("\x1b[2K\r[=>  ] 10%\r\x1b[2K[==> ] 60%\r"),
            view("running", None),
        ));
        let mut failed = view(
            "failed",
            Some(
                "\x1b[1m\x1b[31merror\x1b[0m: see \x1b]8;;file:///src/a.rs\x1b\\a.rs\x1b]8;;\x1b\\",
            ),
        );
        failed["exit"] = json!({"error": "\x1b[33mexit status 2\x1b[0m"});
        shows.push(event("finished", None, failed));
        let (calls, _) = run_writer_on(chat, Duration::from_secs(60), Some(Duration::ZERO), shows);
        assert_eq!(
            calls,
            [
                "fail post task T  started",
                "typing true",
                "post task T  started",
                "edit m3 task T  running\n[==> ] 60%",
                "typing false",
                "edit m3 task T  failed (exit status 2)\n[==> ] 60%",
                "post task T  failed (exit status 2)\nerror: see a.rs",
            ]
        );
    }

    #[test]
    fn a_redelivered_message_is_not_answered_twice_but_a_resent_one_is() {
        let answer = |resent| {
            let reply: SendReply = serde_json::from_value(json!({
                "reply": "task T  already received", "accepted": true,
                "task": view("succeeded", Some("x")), "duplicate": true
            }))
            .unwrap();
            let sent = Sent {
                session: "test:r".into(),
                message_id: "$e".into(),
                text: "work".into(),
                resent,
            };
            Show::Note(Box::new(Note::Answer {
                sent,
                answer: Ok(reply),
            }))
        };
        assert!(run_writer(Duration::from_secs(1), vec![answer(false)]).is_empty());
        // Sent again by a restarted bridge that was killed before it recorded the
        // answer: the answer is posted (with the key of the first post, so the chat
        // shows it once), and so is the end of its task, which the killed bridge
        // never posted.
        assert_eq!(
            run_writer(Duration::from_secs(1), vec![answer(true)]),
            [
                "post task T  already received",
                "edit m1 task T  succeeded  work",
                "post task T  succeeded\nx"
            ]
        );
    }

    /// The bridge itself restarted while a task ran, and the task ended before it
    /// was back: the state file named the task and its progress message, so the
    /// end is reported in that message and posted. What it follows is kept in the
    /// state file as it changes.
    #[test]
    fn tasks_followed_before_a_restart_of_the_bridge_are_reported_when_they_ended() {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let keep: Keep = {
            let kept = kept.clone();
            Box::new(move |tasks| lock(&kept).push(tasks))
        };
        let asked = Arc::new(Mutex::new(Vec::new()));
        let ask: Ask = {
            let asked = asked.clone();
            Box::new(move |task_id: &str| lock(&asked).push(task_id.to_string()))
        };
        let chat = Arc::new(Recorder::default());
        let sessions = Arc::new(Mutex::new(HashMap::from([(
            "test:r".to_string(),
            Conversation::room("r"),
        )])));
        let before = BTreeMap::from([(
            "T".to_string(),
            Followed {
                session: "test:r".into(),
                message: Some("m0".into()),
            },
        )]);
        let mut done = view("succeeded", Some("all done"));
        done["progress"] = json!("step 9");
        let (tx, rx) = mpsc::channel();
        tx.send(note(Note::Connected {
            server: "agentd".into(),
        }))
        .unwrap();
        tx.send(status(Ok(done))).unwrap();
        drop(tx);
        Writer::new(chat.clone(), sessions.clone(), Duration::from_secs(60), ask)
            .following(before, keep)
            .run(rx);
        assert_eq!(*lock(&asked), ["T"]);
        assert_eq!(
            *lock(&chat.calls),
            [
                "edit m0 task T  succeeded\nstep 9",
                "post task T  succeeded\nall done",
            ]
        );
        assert_eq!(*lock(&kept), [BTreeMap::new()], "T is no longer followed");

        // A task the chat is told about is kept with its progress message.
        let kept = Arc::new(Mutex::new(Vec::new()));
        let keep: Keep = {
            let kept = kept.clone();
            Box::new(move |tasks| lock(&kept).push(tasks))
        };
        let (tx, rx) = mpsc::channel();
        tx.send(started_answer()).unwrap();
        drop(tx);
        Writer::new(
            Arc::new(Recorder::default()),
            sessions,
            Duration::from_secs(60),
            Box::new(|_: &str| {}),
        )
        .following(BTreeMap::new(), keep)
        .run(rx);
        let followed = Followed {
            session: "test:r".into(),
            message: Some("m1".into()),
        };
        assert_eq!(
            *lock(&kept),
            [BTreeMap::from([("T".to_string(), followed)])]
        );
    }

    /// The homeserver is down when a task's answer and its result are posted: both
    /// are posted once it is back, in order, instead of being lost.
    #[test]
    fn posts_the_chat_refused_are_made_again_in_order_until_they_pass() {
        let shows = || {
            vec![
                started_answer(),
                event("finished", None, view("succeeded", Some("all done"))),
            ]
        };
        let redo = Some(Duration::from_millis(10));
        let chat = Arc::new(Recorder::default());
        *lock(&chat.failing) = 3;
        let (calls, _) = run_writer_on(chat, Duration::from_secs(60), redo, shows());
        assert_eq!(
            calls,
            [
                "fail post task T  started",
                "typing true",
                "typing false",
                "fail post task T  started",
                "fail post task T  started",
                "post task T  started",
                "post task T  succeeded\nall done",
            ]
        );

        // What the chat refuses for good is not tried again, and holds nothing up.
        let chat = Arc::new(Recorder {
            refused: Some("started"),
            ..Recorder::default()
        });
        let (calls, _) = run_writer_on(chat, Duration::from_secs(60), redo, shows());
        assert_eq!(
            calls,
            [
                "refused post task T  started",
                "typing true",
                "typing false",
                "post task T  succeeded\nall done",
            ]
        );
    }

    /// The answer to a task could not be posted (the homeserver was down) and waits
    /// to be made again: the task's progress does not open a message of its own
    /// meanwhile (it would come before the answer, and stay beside it); once the
    /// answer is posted, it is the message the progress edits, and the end too.
    #[test]
    fn progress_waits_for_the_answer_that_is_made_again_and_then_edits_it() {
        let chat = Arc::new(Recorder::default());
        *lock(&chat.failing) = 1;
        let mut writer = stepped_writer(&chat);
        show_now(&mut writer, started_answer());
        show_now(
            &mut writer,
            event("progress", Some("step 1"), view("running", None)),
        );
        writer.flush_retries();
        writer.flush_due();
        show_now(
            &mut writer,
            event("progress", Some("step 2"), view("running", None)),
        );
        show_now(
            &mut writer,
            event("finished", None, view("succeeded", Some("all done"))),
        );
        writer.flush_retries();
        assert_eq!(
            *lock(&chat.calls),
            [
                "fail post task T  started",
                "typing true",
                "post task T  started",
                "edit m3 task T  running\nstep 1",
                "edit m3 task T  running\nstep 2",
                "typing false",
                "edit m3 task T  succeeded\nstep 2",
                "post task T  succeeded\nall done",
            ]
        );
    }

    /// A progress edit the chat refused (the homeserver failed for a moment) is made
    /// again, with the key of its first attempt; a newer edit of the same message
    /// supersedes one that waits to be made again (the message never goes back to
    /// an older line), and so does the task's final edit.
    #[test]
    fn a_refused_progress_edit_is_made_again_unless_a_newer_one_came() {
        let chat = Arc::new(Recorder::default());
        let mut writer = stepped_writer(&chat);
        let progress = |line: &str| event("progress", Some(line), view("running", None));
        show_now(&mut writer, started_answer());
        *lock(&chat.failing) = 1;
        show_now(&mut writer, progress("step 1"));
        writer.flush_retries();
        // Refused, then a newer line: only the newer one is made.
        *lock(&chat.failing) = 1;
        show_now(&mut writer, progress("step 2"));
        show_now(&mut writer, progress("step 3"));
        writer.flush_retries();
        // Refused, then the end: the final edit, not the older line after it.
        *lock(&chat.failing) = 1;
        show_now(&mut writer, progress("step 4"));
        show_now(
            &mut writer,
            event("finished", None, view("succeeded", Some("all done"))),
        );
        writer.flush_retries();
        writer.flush_due();
        assert_eq!(
            *lock(&chat.calls),
            [
                "post task T  started",
                "typing true",
                "fail edit m1 task T  running\nstep 1",
                "edit m1 task T  running\nstep 1",
                "fail edit m1 task T  running\nstep 2",
                "edit m1 task T  running\nstep 3",
                "fail edit m1 task T  running\nstep 4",
                "typing false",
                "edit m1 task T  succeeded\nstep 4",
                "post task T  succeeded\nall done",
            ]
        );
        let keys = lock(&chat.keys).clone();
        assert_eq!(keys[1].1, keys[2].1, "{keys:?}");
        assert!(writer.retries.is_empty());
    }

    /// A post or final edit made again after a failure carries the key of its first
    /// attempt, so a chat that did take an attempt whose answer was lost shows it
    /// once (Matrix: the same transaction id); every other post has a key of its own.
    #[test]
    fn a_call_made_again_keeps_its_key_and_every_other_call_gets_a_new_one() {
        let chat = Arc::new(Recorder::default());
        *lock(&chat.failing) = 3;
        let shows = vec![
            started_answer(),
            event("finished", None, view("succeeded", Some("all done"))),
        ];
        let redo = Some(Duration::from_millis(10));
        run_writer_on(chat.clone(), Duration::from_secs(60), redo, shows);
        let keys = lock(&chat.keys).clone();
        let started: Vec<&(String, String)> = keys
            .iter()
            .filter(|(call, _)| call == "post task T  started")
            .collect();
        assert_eq!(started.len(), 4, "{keys:?}");
        assert!(started.iter().all(|(_, k)| *k == started[0].1), "{keys:?}");
        let done = keys
            .iter()
            .find(|(call, _)| call.starts_with("post task T  succeeded"))
            .unwrap_or_else(|| panic!("{keys:?}"));
        assert_ne!(done.1, started[0].1, "{keys:?}");

        // The final edit of a progress message from before a restart of the bridge.
        let chat = Arc::new(Recorder::default());
        *lock(&chat.failing) = 2;
        let sessions = Arc::new(Mutex::new(HashMap::from([(
            "test:r".to_string(),
            Conversation::room("r"),
        )])));
        let before = BTreeMap::from([(
            "T".to_string(),
            Followed {
                session: "test:r".into(),
                message: Some("m0".into()),
            },
        )]);
        let (tx, rx) = mpsc::channel();
        tx.send(note(Note::Connected {
            server: "agentd".into(),
        }))
        .unwrap();
        tx.send(status(Ok(view("succeeded", Some("all done")))))
            .unwrap();
        drop(tx);
        let mut writer = Writer::new(chat.clone(), sessions, Duration::from_secs(60), {
            Box::new(|_: &str| {})
        })
        .following(before, Box::new(|_| {}));
        writer.first_redo_delay = Duration::from_millis(10);
        writer.run(rx);
        let keys = lock(&chat.keys).clone();
        let calls: Vec<&str> = keys.iter().map(|(call, _)| call.as_str()).collect();
        assert_eq!(
            calls,
            [
                "edit m0 task T  succeeded  work",
                "edit m0 task T  succeeded  work",
                "edit m0 task T  succeeded  work",
                "post task T  succeeded\nall done",
            ]
        );
        assert!(keys[..3].iter().all(|(_, k)| *k == keys[0].1), "{keys:?}");
        assert_ne!(keys[3].1, keys[0].1, "{keys:?}");
    }

    /// Two runs of the bridge (a restart between them) post a task's end, its final
    /// edit and the answer to a message with the same keys, so the chat shows each
    /// once; any other post has a key of its run.
    #[test]
    fn ends_and_answers_have_the_same_key_in_every_run_and_other_posts_do_not() {
        let run = || {
            let chat = Arc::new(Recorder::default());
            let shows = vec![
                started_answer(),
                event("progress", Some("step 1"), view("running", None)),
                event("finished", None, view("succeeded", Some("all done"))),
                Show::Refuse {
                    to: Conversation::room("r"),
                    sender: "@m:h".into(),
                },
            ];
            run_writer_on(chat.clone(), Duration::ZERO, None, shows);
            let keys = lock(&chat.keys).clone();
            keys
        };
        let (first, second) = (run(), run());
        let calls: Vec<&str> = first.iter().map(|(c, _)| &c[..c.len().min(20)]).collect();
        assert_eq!(
            calls,
            [
                "post task T  started",
                "edit m1 task T  runn",
                "edit m1 task T  succ",
                "post task T  succeed",
                "post Sorry @m:h, you"
            ]
        );
        for i in [0, 2, 3] {
            assert_eq!(first[i], second[i], "{first:?} {second:?}");
        }
        for i in [1, 4] {
            assert_ne!(first[i].1, second[i].1, "{first:?} {second:?}");
        }
    }

    /// The chat refuses a task's end for a while (the homeserver is down): until
    /// the end is posted, the state file still names the task, so a bridge that
    /// restarts meanwhile asks about it again and posts its end (with the same
    /// key), instead of losing it with the retries it kept in memory.
    #[test]
    fn a_task_whose_end_waits_to_be_posted_is_still_kept_as_followed() {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let keep: Keep = {
            let kept = kept.clone();
            Box::new(move |tasks| lock(&kept).push(tasks))
        };
        let chat = Arc::new(Recorder::default());
        let followed = Followed {
            session: "test:r".into(),
            message: Some("m0".into()),
        };
        let before = BTreeMap::from([("T".to_string(), followed.clone())]);
        let mut writer = stepped_writer(&chat).following(before.clone(), keep);
        *lock(&chat.failing) = 1;
        for show in [
            note(Note::Connected {
                server: "agentd".into(),
            }),
            status(Ok(view("succeeded", Some("all done")))),
        ] {
            let Show::Note(note) = show else {
                unreachable!()
            };
            writer.note(*note);
        }
        writer.keep_followed();
        assert!(
            lock(&kept).iter().all(|k| *k == before),
            "forgotten while its end waits: {:?}",
            lock(&kept)
        );
        writer.flush_retries();
        writer.keep_followed();
        assert_eq!(
            *lock(&chat.calls),
            [
                "fail edit m0 task T  succeeded  work",
                "edit m0 task T  succeeded  work",
                "post task T  succeeded\nall done",
            ]
        );
        assert_eq!(lock(&kept).last(), Some(&BTreeMap::new()));
    }

    /// Messages that come while agentd is not connected wait; the chat is told so
    /// once per outage, not once per message, and again in a later outage.
    #[test]
    fn a_chat_is_told_once_per_outage_that_agentd_is_not_running() {
        let waiting = || Show::Waiting {
            session: "test:r".into(),
            to: Conversation::room("r"),
        };
        let shows = vec![
            waiting(),
            waiting(),
            note(Note::Connected {
                server: "agentd".into(),
            }),
            note(Note::Lost),
            waiting(),
        ];
        let down = format!("post {}", text::bridge_agentd_down());
        assert_eq!(
            run_writer(Duration::from_secs(1), shows),
            [down.clone(), down]
        );
    }

    /// A sender not on the allow-list who writes again and again (a spammer, or a
    /// user chatting in a shared room) is told once per room, then not again until
    /// `refusal-interval` has passed; nothing of theirs runs.
    #[test]
    fn a_refused_sender_is_told_once_per_room_and_interval() {
        let dir = tempfile::tempdir().unwrap();
        let config = CoreConfig {
            socket: dir.path().join("no.sock"),
            client: "test".into(),
            allowed_users: vec!["@alice:h".into()],
            refusal_interval: Duration::from_secs(3600),
            progress_interval: Duration::from_secs(1),
            state_file: dir.path().join("state.json"),
        };
        let mut state = State::default();
        let sessions = Mutex::new(HashMap::new());
        let (notes, _) = mpsc::channel();
        let link = Link::new(config.socket.clone(), "test".into(), notes);
        let (show, shown) = mpsc::channel();
        let says = [
            ("r", "@mallory:h"),
            ("r", "@mallory:h"),
            ("r", "@mallory:h"),
            ("q", "@mallory:h"),
            ("r", "@eve:h"),
            ("q", "@mallory:h"),
        ];
        for (i, (room, sender)) in says.into_iter().enumerate() {
            let message = Inbound {
                conversation: Conversation::room(room),
                message_id: format!("$m{i}"),
                sender: sender.into(),
                text: "rm -rf /".into(),
            };
            handle(
                "test", &config, &mut state, &sessions, &link, &show, message,
            );
        }
        drop(show);
        let told: Vec<String> = shown
            .into_iter()
            .map(|s| match s {
                Show::Refuse { to, sender } => format!("{} {sender}", to.room),
                _ => "something else".into(),
            })
            .collect();
        assert_eq!(told, ["r @mallory:h", "q @mallory:h", "r @eve:h"]);
        assert!(state.sessions.is_empty(), "a refused sender made a session");

        // Told again once the interval has passed since the last time.
        let mut state = State::default();
        let hour = Duration::from_secs(3600);
        let t0 = SystemTime::now();
        assert!(state.tell_refused("r", "@m:h", hour, t0));
        assert!(!state.tell_refused("r", "@m:h", hour, t0 + hour / 2));
        assert!(!state.tell_refused("r", "@m:h", hour, t0 + hour - Duration::from_millis(1)));
        assert!(state.tell_refused("r", "@m:h", hour, t0 + hour));
        assert!(!state.tell_refused("r", "@m:h", hour, t0 + hour + hour / 2));
        // The clock is set back: a refusal recorded "ahead" counts as that far ago.
        let ms = Duration::from_millis(1);
        assert!(!state.tell_refused("r", "@m:h", hour, t0 + hour / 2 + ms));
        assert!(state.tell_refused("r", "@m:h", hour, t0 - ms));
    }

    /// The refusal memory is in the state file: a restarted bridge does not tell a
    /// sender refused before the restart again within `refusal-interval` (a
    /// restart in a busy shared room would otherwise re-tell everyone at once).
    #[test]
    fn a_restarted_bridge_does_not_tell_a_refused_sender_again() {
        let dir = tempfile::tempdir().unwrap();
        let config = CoreConfig {
            socket: dir.path().join("no.sock"),
            client: "test".into(),
            allowed_users: vec!["@alice:h".into()],
            refusal_interval: Duration::from_secs(3600),
            progress_interval: Duration::from_secs(1),
            state_file: dir.path().join("state.json"),
        };
        let sessions = Mutex::new(HashMap::new());
        let (notes, _) = mpsc::channel();
        let link = Link::new(config.socket.clone(), "test".into(), notes);
        let refused = |state: &mut State, i: usize, sender: &str| {
            let (show, shown) = mpsc::channel();
            let message = Inbound {
                conversation: Conversation::room("r"),
                message_id: format!("$m{i}"),
                sender: sender.into(),
                text: "rm -rf /".into(),
            };
            handle("test", &config, state, &sessions, &link, &show, message);
            drop(show);
            shown.into_iter().count()
        };
        let mut state = State::load(&config.state_file).unwrap();
        assert_eq!(refused(&mut state, 0, "@mallory:h"), 1);
        // The bridge restarts: what it knows is what the state file says.
        let mut state = State::load(&config.state_file).unwrap();
        assert_eq!(
            refused(&mut state, 1, "@mallory:h"),
            0,
            "told again after a restart"
        );
        assert_eq!(refused(&mut state, 2, "@eve:h"), 1);
    }

    #[test]
    fn state_remembers_handled_ids_and_forgets_the_oldest() {
        let mut state = State::default();
        assert!(state.first_time("a"));
        assert!(!state.first_time("a"));
        for i in 0..SEEN_KEPT {
            state.first_time(&i.to_string());
        }
        assert!(state.first_time("a"), "the oldest id was forgotten");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        state.cursor = Some("s1".into());
        state.save(&path).unwrap();
        let loaded = State::load(&path).unwrap();
        assert_eq!(loaded.cursor.as_deref(), Some("s1"));
        assert_eq!(loaded.seen.len(), SEEN_KEPT);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
