//! A watch's two ends on its connection's [`Outbox`]: the [`EventSink`] the
//! supervisor offers events to, and the [`WatchAnswer`] that queues the watch's answer
//! (and releases the events held until it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use agentd_proto::control::{EventView, Response};
use serde::Serialize;

use super::{Delivery, Outbox, Watching};

/// Where the supervisor sends one watch's events: the watch's connection.
///
/// `send` never blocks and never grows the connection past its budget; a watch that
/// falls behind gets its `lagged` notice and every later `send` fails.
#[derive(Debug)]
pub struct EventSink {
    outbox: Arc<Outbox>,
    /// This watch, unique on its connection.
    watch: u64,
    /// The request id the event lines carry.
    id: u64,
    ended: AtomicBool,
    answered: Arc<AtomicBool>,
    /// Keeps the watch counted (and its connection open) until the supervisor
    /// drops the sink.
    _watching: Watching,
}

/// The connection's side of an [`EventSink`]: queues the watch's answer.
pub struct WatchAnswer {
    outbox: Arc<Outbox>,
    watch: u64,
    answered: Arc<AtomicBool>,
}

impl WatchAnswer {
    /// Queues the watch's answer and, if it is a success, the events held for it.
    pub fn answer<R: Serialize>(self, response: &Response<R>) {
        // The flag is set under the outbox lock, so no event slips between the
        // answer and the held events.
        self.outbox
            .push_watch_answer(self.watch, response, &self.answered);
    }
}

impl EventSink {
    /// A sink for watch request `id` and the handle that queues its answer.
    pub fn new(outbox: &Arc<Outbox>, watch: u64, id: u64) -> (EventSink, WatchAnswer) {
        let answered = Arc::new(AtomicBool::new(false));
        (
            EventSink {
                outbox: outbox.clone(),
                watch,
                id,
                ended: AtomicBool::new(false),
                answered: answered.clone(),
                _watching: outbox.watching(),
            },
            WatchAnswer {
                outbox: outbox.clone(),
                watch,
                answered,
            },
        )
    }

    /// Offers one event. `Err` when the watch has ended (lagged or client gone): the
    /// subscription should be dropped.
    pub fn send(&self, event: EventView) -> Result<(), Delivery> {
        if self.ended.load(Ordering::SeqCst) {
            return Err(Delivery::Lagged);
        }
        match self
            .outbox
            .push_event(self.watch, self.id, &self.answered, event)
        {
            Delivery::Queued => Ok(()),
            other => {
                if other == Delivery::Lagged {
                    tracing::info!(
                        watch = self.id,
                        "a watch fell behind its client and was ended (lagged)"
                    );
                }
                self.ended.store(true, Ordering::SeqCst);
                Err(other)
            }
        }
    }

    /// Whether the watch has ended (lagged, or its client went away).
    pub fn is_closed(&self) -> bool {
        self.ended.load(Ordering::SeqCst) || self.outbox.is_closed()
    }
}
