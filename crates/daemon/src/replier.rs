//! Where the supervisor sends the answer to one request.
//!
//! A request from a control connection carries a [`Replier`] bound to that
//! connection's output: [`Replier::send`] encodes the answer and queues it there at
//! once, on whichever thread answers (the supervisor loop, the store's writer after a
//! commit, the history reader), and then releases the events held behind it. No task
//! waits for the answer in between, so a request costs no task spawn and no extra
//! wake-up of the runtime.
//!
//! An answer given on a thread other than the loop's (new work's acknowledgement, on
//! the store's writer after the commit) goes through the [`Relay`]: encoded on that
//! thread, queued on its connection by one task on the loop's runtime. Queued there
//! directly, every answer would wake the runtime from outside (an `eventfd` write
//! each: 64 per group commit of 64 messages); through the relay a batch of answers
//! costs one wake-up, and the connections' writers are then woken from inside the
//! runtime, which costs no system call.
//!
//! **Invariant:** every request is answered exactly once. A [`Replier`] dropped
//! without an answer (the supervisor is gone) answers `shutting_down`.

use agentd_proto::control::{Answer, ErrorBody, ErrorCode, Response};
use tokio::sync::{mpsc, oneshot};

use crate::control::Reply;
use crate::outbox::{encode_line, Answering, WatchAnswer};

/// The answer slot of one request (see the module documentation).
#[derive(Debug)]
pub struct Replier(Option<Target>);

enum Target {
    /// Queued on the request's connection.
    Connection {
        /// The request's id.
        id: u64,
        slot: Answering,
        /// For a `watch`: queues the answer and then the events held for it.
        watch: Option<WatchAnswer>,
        /// Told once the answer is queued (the connection waits for that before it
        /// reads past a `tasks` page).
        queued: Option<oneshot::Sender<()>>,
    },
    /// Sent on a channel (tests, and callers that want the typed answer).
    Channel(oneshot::Sender<Reply>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Connection { id, .. } => write!(f, "Connection({id})"),
            Target::Channel(_) => f.write_str("Channel"),
        }
    }
}

impl Replier {
    /// The answer to request `id`, queued on the outbox of `slot`'s connection.
    pub(crate) fn to_connection(
        id: u64,
        slot: Answering,
        watch: Option<WatchAnswer>,
        queued: Option<oneshot::Sender<()>>,
    ) -> Replier {
        Replier(Some(Target::Connection {
            id,
            slot,
            watch,
            queued,
        }))
    }

    /// A replier whose answer arrives on the returned receiver (dropped unanswered:
    /// the receiver sees the sender gone).
    pub fn channel() -> (Replier, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        (Replier(Some(Target::Channel(tx))), rx)
    }

    /// Sends the answer.
    pub fn send(mut self, reply: Reply) {
        if let Some(target) = self.0.take() {
            target.deliver(reply);
        }
    }

    /// Sends the answer like [`Replier::send`], from a thread other than the loop's:
    /// an answer to a connection is encoded here and queued on the connection by the
    /// `relay`'s task (see the module documentation); a watch's answer, or one on a
    /// channel, is sent at once.
    pub fn send_relayed(mut self, reply: Reply, relay: &Relay) {
        match self.0.take() {
            Some(Target::Connection {
                id,
                slot,
                watch: None,
                queued,
            }) => {
                let line = encode_line(&response(id, reply));
                if let Err(mpsc::error::SendError(relayed)) =
                    relay.0.send(Relayed { slot, line, queued })
                {
                    // The loop's runtime is gone: queued here, as `send` would.
                    relayed.deliver();
                }
            }
            Some(target) => target.deliver(reply),
            None => {}
        }
    }
}

/// The response line's value for request `id`.
fn response(id: u64, reply: Reply) -> Response<Answer> {
    match reply {
        Ok(result) => Response::answer(id, result),
        Err(error) => Response::<Answer>::failed(Some(id), error),
    }
}

/// Queues answers given on other threads on their connections, from one task on the
/// loop's runtime (see the module documentation). Cloneable, for any thread.
#[derive(Clone, Debug)]
pub struct Relay(mpsc::UnboundedSender<Relayed>);

/// An encoded answer on its way to its connection's outbox.
struct Relayed {
    slot: Answering,
    line: Vec<u8>,
    queued: Option<oneshot::Sender<()>>,
}

impl Relayed {
    fn deliver(self) {
        self.slot.answer(self.line);
        drop(self.queued);
    }
}

impl Relay {
    /// Starts the relay's task on the current runtime (it ends when every handle is
    /// dropped).
    pub fn start() -> Relay {
        let (tx, mut rx) = mpsc::unbounded_channel::<Relayed>();
        tokio::spawn(async move {
            // Each wake-up takes every answer queued meanwhile.
            while let Some(relayed) = rx.recv().await {
                agentd_store::timeline::mark(agentd_store::timeline::Stage::Relayed, 0);
                relayed.deliver();
            }
        });
        Relay(tx)
    }

    /// A relay whose task is gone: answers are queued on the sending thread.
    #[cfg(test)]
    pub(crate) fn gone() -> Relay {
        Relay(mpsc::unbounded_channel().0)
    }
}

impl Target {
    fn deliver(self, reply: Reply) {
        match self {
            Target::Connection {
                id,
                slot,
                watch,
                queued,
            } => {
                let response = response(id, reply);
                match watch {
                    Some(watch) => {
                        // A watch's events follow its answer, until the supervisor drops
                        // the subscription (which ends it in flight).
                        watch.answer(&response);
                        drop(slot);
                    }
                    None => slot.answer(encode_line(&response)),
                }
                drop(queued);
            }
            Target::Channel(tx) => {
                let _ = tx.send(reply);
            }
        }
    }
}

impl Drop for Replier {
    fn drop(&mut self) {
        if let Some(target @ Target::Connection { .. }) = self.0.take() {
            target.deliver(Err(ErrorBody::new(
                ErrorCode::ShuttingDown,
                "agentd is shutting down",
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Outbox, OUTPUT_BUDGET};
    use std::sync::Arc;

    async fn line(outbox: &Arc<Outbox>) -> String {
        String::from_utf8(outbox.next().await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn an_answer_is_queued_once_and_a_dropped_replier_answers_shutting_down() {
        let outbox = Outbox::new(OUTPUT_BUDGET);
        let replier = Replier::to_connection(7, outbox.answering(true), None, None);
        replier.send(Err(ErrorBody::new(ErrorCode::NotFound, "no such task")));
        let first = line(&outbox).await;
        assert!(
            first.contains(r#""id":7"#) && first.contains("not_found"),
            "{first}"
        );
        outbox.wrote();

        let (queued_tx, queued_rx) = oneshot::channel();
        drop(Replier::to_connection(
            8,
            outbox.answering(true),
            None,
            Some(queued_tx),
        ));
        assert!(
            queued_rx.await.is_err(),
            "the reader hears that it is queued"
        );
        let second = line(&outbox).await;
        assert!(
            second.contains(r#""id":8"#) && second.contains("shutting_down"),
            "{second}"
        );
        outbox.wrote();
        // Nothing in flight any more: once reading is done the writer ends.
        outbox.finish_reading();
        assert!(outbox.next().await.is_none());
    }

    #[tokio::test]
    async fn an_answer_relayed_from_another_thread_still_comes_before_the_events_it_holds() {
        use crate::outbox::EventSink;
        use agentd_proto::control::{EventKind, EventView};
        let outbox = Outbox::new(OUTPUT_BUDGET);
        let relay = Relay::start();
        let (sink, watch_answer) = EventSink::new(&outbox, 1, 7);
        watch_answer.answer(&Response::ok(7, "watching"));
        assert!(line(&outbox).await.contains(r#""id":7"#));
        outbox.wrote();
        // A `send` (answered at once) is with the loop: the watch's event about its
        // task waits for its answer, which the store's writer sends after the commit.
        let replier = Replier::to_connection(9, outbox.answering(true), None, None);
        let event = EventView {
            kind: EventKind::Accepted,
            task_id: "t".into(),
            session: "s".into(),
            position: Some(1),
            text: None,
            into: None,
            task: None,
            at: None,
        };
        sink.send(event).unwrap();
        let writer_relay = relay.clone();
        std::thread::spawn(move || {
            replier.send_relayed(Ok(Answer::Tasks(Vec::new())), &writer_relay)
        })
        .join()
        .unwrap();
        let answer = line(&outbox).await;
        assert!(
            answer.contains(r#""id":9"#) && !answer.contains("event"),
            "{answer}"
        );
        outbox.wrote();
        let event = line(&outbox).await;
        assert!(
            event.contains(r#""id":7"#) && event.contains("accepted"),
            "{event}"
        );
        outbox.wrote();
        // Without the relay's task, the answer is queued by the sending thread.
        let replier = Replier::to_connection(10, outbox.answering(true), None, None);
        replier.send_relayed(Ok(Answer::Tasks(Vec::new())), &Relay::gone());
        assert!(line(&outbox).await.contains(r#""id":10"#));
        outbox.wrote();
        drop(sink);
    }

    #[tokio::test]
    async fn a_channel_replier_sends_the_typed_answer() {
        let (replier, rx) = Replier::channel();
        replier.send(Ok(Answer::Tasks(Vec::new())));
        assert!(matches!(rx.await, Ok(Ok(Answer::Tasks(v))) if v.is_empty()));
        let (replier, rx) = Replier::channel();
        drop(replier);
        assert!(rx.await.is_err());
    }
}
