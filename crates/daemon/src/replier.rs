//! Where the supervisor sends the answer to one request.
//!
//! A request from a control connection carries a [`Replier`] bound to that
//! connection's output: [`Replier::send`] encodes the answer and queues it there at
//! once, on whichever thread answers (the supervisor loop, the store's writer after a
//! commit, the history reader), and then releases the events held behind it. No task
//! waits for the answer in between, so a request costs no task spawn and no extra
//! wake-up of the runtime.
//!
//! **Invariant:** every request is answered exactly once. A [`Replier`] dropped
//! without an answer (the supervisor is gone) answers `shutting_down`.

use agentd_proto::control::{Answer, ErrorBody, ErrorCode, Response};
use tokio::sync::oneshot;

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
                let response = match reply {
                    Ok(result) => Response::answer(id, result),
                    Err(error) => Response::<Answer>::failed(Some(id), error),
                };
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
    async fn a_channel_replier_sends_the_typed_answer() {
        let (replier, rx) = Replier::channel();
        replier.send(Ok(Answer::Tasks(Vec::new())));
        assert!(matches!(rx.await, Ok(Ok(Answer::Tasks(v))) if v.is_empty()));
        let (replier, rx) = Replier::channel();
        drop(replier);
        assert!(rx.await.is_err());
    }
}
