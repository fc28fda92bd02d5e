//! The output of one control connection: a bounded queue of lines for its writer.
//!
//! Answers, event lines and notices go through an [`Outbox`]; one writer task takes
//! them out and writes them to the socket. A client that stops reading must not grow
//! agentd, so the queue is bounded by [`OUTPUT_BUDGET`] bytes:
//!
//! - **Answers** are always queued. The connection stops reading requests while the
//!   queue holds more than the budget (and while [`MAX_IN_FLIGHT`] requests are
//!   unanswered), so a client that sends without reading is throttled at its own
//!   socket. What waits is thus the budget plus the answers in flight: small ones
//!   (`send`, `status`, `stop`…) and at most one page of `tasks`, after which the
//!   connection reads on only once that page is queued.
//! - **Progress events** are coalesced once the client falls behind, that is once
//!   [`COALESCE_AFTER`] bytes wait: a progress line of a task that still waits in
//!   the queue for the same watch (with nothing of that task after it) is replaced
//!   by the newer one (the latest wins), and the line says how many it replaced
//!   (`skipped`). A slow reader thus sees every task's latest progress, late; one
//!   that keeps up sees every line, also of an agent that reports many at once
//!   (they reach the outbox in one turn of the loop, before the writer runs).
//! - **A watch falls behind** when an event would take its connection's queue over
//!   the budget, or when output has waited for more than [`STALL_LIMIT`] without the
//!   writer completing a write (the client stopped reading; coalescing alone would
//!   hide that). The watch then ends: its last line is a `lagged` error for the
//!   watch's id, queued behind what the client has not read yet, and the supervisor
//!   drops the subscription at its next event.
//!
//! Events offered before the watch's own answer is queued are held and released
//! right after it, so a client always sees the answer first.
//!
//! **Answers before the events they cause.** While a request that is answered at
//! once (everything but a waiting `stop`) is with the supervisor, the connection's
//! events are held (its [`Answering`] is a gate) and released right after its
//! answer, so a bridge learns a task's id from the `send` answer before any event
//! about that task.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agentd_proto::control::{ErrorCode, EventKind, EventView, Response};
use serde::Serialize;
use tokio::sync::Notify;

/// Most bytes of output queued for one connection (answers can exceed it briefly).
pub const OUTPUT_BUDGET: usize = 1024 * 1024;

/// Bytes that must wait in a connection's queue before its progress lines are
/// coalesced (at most an eighth of the budget).
pub const COALESCE_AFTER: usize = 64 * 1024;

/// How long output may wait without the client reading any of it before the
/// connection's watches are ended as lagged.
pub const STALL_LIMIT: Duration = Duration::from_secs(5);

/// Most requests of one connection that agentd works on at once (a `watch` until
/// it is answered; a live watch counts against [`MAX_WATCHES`] instead). Past it
/// the connection reads no further request until one is answered.
pub const MAX_IN_FLIGHT: usize = 64;

/// Most watches one connection may have at once (a watch past it is refused).
pub const MAX_WATCHES: usize = 4096;

/// One JSON line (with its newline) for `value`. A serialization failure becomes a
/// well-formed `internal` error line instead (its message escaped like any other).
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    thread_local! {
        /// Where lines are encoded: grown once per thread instead of from empty for
        /// every line (an answer to a `send` took seven reallocations); each line is
        /// then copied out at its exact size, so that what waits in an outbox is what
        /// the budget counts.
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let encoded = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            scratch.clear();
            let line = serde_json::to_writer(&mut *scratch, value).map(|()| {
                let mut line = Vec::with_capacity(scratch.len() + 1);
                line.extend_from_slice(&scratch);
                line
            });
            if scratch.capacity() > 64 * 1024 {
                // A page of `tasks` went through: its buffer is not kept.
                *scratch = Vec::new();
            }
            line
        }
        // Encoding inside an encoding (a `Serialize` that encodes a line itself).
        Err(_) => serde_json::to_vec(value),
    });
    let mut line = match encoded {
        Ok(line) => line,
        Err(e) => serde_json::to_vec(&Response::<()>::err(
            None,
            ErrorCode::Internal,
            format!("cannot encode an answer: {e}"),
        ))
        .unwrap_or_else(|_| {
            br#"{"id":null,"ok":false,"error":{"code":"internal","message":"cannot encode an answer"}}"#
                .to_vec()
        }),
    };
    line.push(b'\n');
    line
}

/// One line waiting for the writer.
struct Item {
    line: Vec<u8>,
    /// The (watch, task) whose event this is, if any.
    key: Option<(u64, String)>,
    /// For a progress line that a newer one of the same task and watch may replace:
    /// how many it replaced already.
    coalesced: Option<u64>,
}

impl Item {
    fn answer(line: Vec<u8>) -> Item {
        Item {
            line,
            key: None,
            coalesced: None,
        }
    }

    fn len(&self) -> usize {
        self.line.len()
    }
}

struct State {
    queue: VecDeque<Item>,
    /// Sequence number of `queue[0]`.
    front_seq: u64,
    /// Bytes in `queue` and `held`.
    pending: usize,
    /// Per (watch, task): the sequence number of its last queued item.
    last_of: HashMap<(u64, String), u64>,
    /// Events of watches whose answer is not queued yet.
    held: HashMap<u64, Vec<Item>>,
    /// Requests answered at once that are with the supervisor (gated [`Answering`]s).
    gates: usize,
    /// Events of answered watches offered while a gate was open, oldest first.
    gated: Vec<Item>,
    /// Since when output has waited for the writer: the last completed write, or
    /// the moment output arrived at an idle writer.
    waiting_since: Instant,
    /// The writer is writing a line it took from the queue.
    writing: bool,
    /// Requests unanswered.
    in_flight: usize,
    /// Watches not ended: they keep the connection open after its reader is done,
    /// but do not hold up its reading (that has its own bound, [`MAX_WATCHES`]).
    watches: usize,
    /// The writer is gone (client gone or connection closed): nothing more is queued.
    closed: bool,
    /// The reader is done: the writer ends once nothing is in flight or queued.
    reading_done: bool,
    /// The connection closes once the queue is written: nothing more is queued.
    closing: bool,
}

impl State {
    fn refuses(&self) -> bool {
        self.closed || self.closing
    }

    fn idle(&self) -> bool {
        !self.writing && self.queue.is_empty()
    }

    /// Ends one gate (see [`Outbox::answering`]): the last one releases the events
    /// held meanwhile.
    fn open_gate(&mut self) {
        self.gates -= 1;
        if self.gates == 0 {
            for item in std::mem::take(&mut self.gated) {
                if !self.refuses() {
                    self.enqueue(item);
                }
            }
        }
    }

    /// Appends `item` to the queue (its bytes already counted in `pending`).
    fn enqueue(&mut self, item: Item) {
        if self.idle() {
            self.waiting_since = Instant::now();
        }
        let seq = self.front_seq + self.queue.len() as u64;
        if let Some(key) = &item.key {
            self.last_of.insert(key.clone(), seq);
        }
        self.queue.push_back(item);
    }
}

/// The output queue of one connection, shared by its reader, its writer, the tasks
/// that wait for answers, and the supervisor's event sinks.
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer.
    ready: Notify,
    /// Wakes the reader (room in the queue, or a request ended).
    room: Notify,
    budget: usize,
    stall: Duration,
    /// [`COALESCE_AFTER`], or less for a small budget.
    coalesce_after: usize,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

/// What happened to an event offered to a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// The watch fell behind; it received its `lagged` notice and has ended.
    Lagged,
    /// The connection is gone.
    Closed,
}

impl Outbox {
    pub fn new(budget: usize) -> Arc<Outbox> {
        Outbox::with_stall_limit(budget, STALL_LIMIT)
    }

    pub fn with_stall_limit(budget: usize, stall: Duration) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                front_seq: 0,
                pending: 0,
                last_of: HashMap::new(),
                held: HashMap::new(),
                gates: 0,
                gated: Vec::new(),
                waiting_since: Instant::now(),
                writing: false,
                in_flight: 0,
                watches: 0,
                closed: false,
                reading_done: false,
                closing: false,
            }),
            ready: Notify::new(),
            room: Notify::new(),
            budget,
            stall,
            coalesce_after: COALESCE_AFTER.min(budget / 8),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an answer or a notice (never refused while the connection lives).
    pub fn push<R: Serialize>(&self, response: &Response<R>) {
        self.push_encoded(encode_line(response));
    }

    /// Queues an answer or a notice already encoded as one line (see [`encode_line`]).
    pub fn push_encoded(&self, line: Vec<u8>) {
        let mut state = self.lock();
        if state.refuses() {
            return;
        }
        state.pending += line.len();
        state.enqueue(Item::answer(line));
        drop(state);
        self.ready.notify_one();
    }

    /// Queues the answer to watch `watch`, then the events held for it.
    fn push_watch_answer<R: Serialize>(
        &self,
        watch: u64,
        response: &Response<R>,
        answered: &AtomicBool,
    ) {
        let line = encode_line(response);
        let mut state = self.lock();
        answered.store(true, Ordering::SeqCst);
        let held = state.held.remove(&watch).unwrap_or_default();
        let held_len: usize = held.iter().map(Item::len).sum();
        if state.refuses() {
            return;
        }
        state.pending += line.len();
        state.enqueue(Item::answer(line));
        if response.ok {
            for item in held {
                state.enqueue(item);
            }
        } else {
            state.pending -= held_len;
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Offers event `event` of watch `watch` (request id `id`).
    fn push_event(&self, watch: u64, id: u64, answered: &AtomicBool, event: EventView) -> Delivery {
        let mut state = self.lock();
        // Read under the lock: the answer sets it under the lock too.
        let answered = answered.load(Ordering::SeqCst);
        if state.refuses() {
            return Delivery::Closed;
        }
        if !state.idle() && state.waiting_since.elapsed() > self.stall {
            return self.lag(state, watch, id);
        }
        let key = (watch, event.task_id.clone());
        let progress = event.kind == EventKind::Progress;
        let mut response = Response::<()>::event(id, event);
        // Once the client is behind, a newer progress line replaces the queued one of
        // the same task, if nothing of that task was queued after it.
        if progress && answered && state.pending >= self.coalesce_after {
            if let Some(&seq) = state.last_of.get(&key) {
                let index = (seq - state.front_seq) as usize;
                if let Some(queued) = state.queue.get_mut(index) {
                    if let Some(skipped) = queued.coalesced {
                        response.skipped = Some(skipped + 1);
                        let line = encode_line(&response);
                        let old = queued.line.len();
                        let new = line.len();
                        queued.line = line;
                        queued.coalesced = Some(skipped + 1);
                        state.pending = state.pending - old + new;
                        return Delivery::Queued;
                    }
                }
            }
        }
        let line = encode_line(&response);
        if state.pending + line.len() > self.budget {
            return self.lag(state, watch, id);
        }
        state.pending += line.len();
        let item = Item {
            line,
            key: Some(key),
            coalesced: progress.then_some(0),
        };
        if !answered {
            state.held.entry(watch).or_default().push(item);
            return Delivery::Queued;
        }
        if state.gates > 0 {
            state.gated.push(item);
            return Delivery::Queued;
        }
        state.enqueue(item);
        drop(state);
        self.ready.notify_one();
        Delivery::Queued
    }

    fn lag(&self, mut state: MutexGuard<'_, State>, watch: u64, id: u64) -> Delivery {
        let line = encode_line(&Response::<()>::err(
            Some(id),
            ErrorCode::Lagged,
            agentd_proto::text::watch_lagged(self.stall, self.budget),
        ));
        // Events held for an unanswered watch go; its answer and the notice follow.
        if let Some(held) = state.held.remove(&watch) {
            state.pending -= held.iter().map(Item::len).sum::<usize>();
        }
        let mut dropped = 0;
        state.gated.retain(|item| {
            let keep = item.key.as_ref().is_none_or(|(w, _)| *w != watch);
            if !keep {
                dropped += item.len();
            }
            keep
        });
        state.pending -= dropped;
        state.pending += line.len();
        state.enqueue(Item::answer(line));
        drop(state);
        self.ready.notify_one();
        Delivery::Lagged
    }

    /// The next line for the writer; `None` when the writer should end. The writer
    /// calls [`wrote`](Outbox::wrote) once the line is written.
    pub async fn next(&self) -> Option<Vec<u8>> {
        loop {
            let notified = self.ready.notified();
            {
                let mut state = self.lock();
                if let Some(item) = state.queue.pop_front() {
                    let seq = state.front_seq;
                    state.front_seq += 1;
                    state.pending -= item.len();
                    state.writing = true;
                    if let Some(key) = &item.key {
                        if state.last_of.get(key) == Some(&seq) {
                            state.last_of.remove(key);
                        }
                    }
                    let line = item.line;
                    drop(state);
                    self.room.notify_one();
                    return Some(line);
                }
                if state.refuses()
                    || (state.reading_done && state.in_flight == 0 && state.watches == 0)
                {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// The writer wrote part of a line: the client is reading.
    pub fn progressed(&self) {
        self.lock().waiting_since = Instant::now();
    }

    /// The writer completed a line: the client is reading.
    pub fn wrote(&self) {
        let mut state = self.lock();
        state.writing = false;
        state.waiting_since = Instant::now();
    }

    /// The connection is closed (the writer failed, or agentd gave up on the client):
    /// nothing more is queued, and sinks report the connection gone.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.queue.clear();
        state.held.clear();
        state.gated.clear();
        state.last_of.clear();
        state.pending = 0;
        drop(state);
        self.ready.notify_one();
        self.room.notify_one();
    }

    /// The connection closes once what is queued is written (or the writer gives up).
    pub fn close_after_flush(&self) {
        self.lock().closing = true;
        self.ready.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().refuses()
    }

    /// The writer is done: everything queued was written, or the client is gone.
    pub fn is_done(&self) -> bool {
        self.lock().closed
    }

    /// The reader reads no more requests; the writer ends once everything in flight
    /// has been answered and written.
    pub fn finish_reading(&self) {
        self.lock().reading_done = true;
        self.ready.notify_one();
    }

    /// Waits until the reader may read another request: the queue is within the
    /// budget and fewer than `max_in_flight` requests are in flight.
    pub async fn wait_for_room(&self, max_in_flight: usize) {
        loop {
            let notified = self.room.notified();
            {
                let state = self.lock();
                if state.refuses()
                    || (state.pending <= self.budget && state.in_flight < max_in_flight)
                {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Counts one watch until the returned guard is dropped.
    pub fn watching(self: &Arc<Self>) -> Watching {
        self.lock().watches += 1;
        Watching {
            outbox: self.clone(),
        }
    }

    /// How many watches of this connection have not ended.
    pub fn watches(&self) -> usize {
        self.lock().watches
    }

    /// One request's place in the connection's output: it counts in flight (and, if
    /// `gated`, holds the connection's events, for a request answered at once) until
    /// its answer is queued with [`Answering::answer`] or it is dropped unanswered:
    /// one critical section each way.
    pub fn answering(self: &Arc<Self>, gated: bool) -> Answering {
        let mut state = self.lock();
        state.in_flight += 1;
        if gated {
            state.gates += 1;
        }
        drop(state);
        Answering {
            outbox: self.clone(),
            gated,
            done: false,
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.lock().pending
    }
}

/// A request in flight whose answer is not queued yet (see [`Outbox::answering`]).
pub struct Answering {
    outbox: Arc<Outbox>,
    gated: bool,
    done: bool,
}

impl Answering {
    /// Queues the answer `line`, then releases the events held behind it, and ends
    /// the request.
    pub fn answer(mut self, line: Vec<u8>) {
        self.finish(Some(line));
    }

    fn finish(&mut self, line: Option<Vec<u8>>) {
        self.done = true;
        let mut state = self.outbox.lock();
        if let Some(line) = line {
            if !state.refuses() {
                state.pending += line.len();
                state.enqueue(Item::answer(line));
            }
        }
        if self.gated {
            state.open_gate();
        }
        state.in_flight -= 1;
        drop(state);
        self.outbox.ready.notify_one();
        self.outbox.room.notify_one();
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if !self.done {
            self.finish(None);
        }
    }
}

impl std::fmt::Debug for Answering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answering")
    }
}

/// One watch of a connection, until it ends.
pub struct Watching {
    outbox: Arc<Outbox>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.outbox.lock().watches -= 1;
        self.outbox.room.notify_one();
        self.outbox.ready.notify_one();
    }
}

impl std::fmt::Debug for Watching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watching")
    }
}

mod sink;
pub use sink::{EventSink, WatchAnswer};

#[cfg(test)]
mod tests;
