//! The acknowledgement of new work: sent once both the task's record is committed
//! and the loop has its answer, by whichever of the two comes second (the store's
//! writer thread, or the loop). No task waits for the commit, so an accepted message
//! costs no task spawn between the commit and its answer; an answer sent on the
//! writer thread goes through the [`Relay`], so the answers of one group commit wake
//! the loop's runtime once, not once each.
//!
//! **Invariant:** the answer goes out only after the commit (an acknowledged message
//! is durable), and exactly once; a commit callback that the store drops uncalled
//! counts as the store closed.

use std::sync::{Arc, Mutex, PoisonError};

use agentd_core::TaskId;
use agentd_proto::control::ErrorCode;
use agentd_proto::text;
use agentd_store::{Outcome, StoreError};
use tokio::sync::mpsc;

use crate::control::{Replier, Reply};
use crate::replier::Relay;
use crate::supervisor::{err, StoreEvent};

/// One piece of new work waiting for its commit and its answer.
pub(crate) struct Ack(Mutex<State>);

enum State {
    Waiting,
    Committed(Result<Outcome, StoreError>),
    Answered(Answer),
    Sent,
}

/// What the loop answers, and what a failed insert must tell the loop.
pub(crate) struct Answer {
    pub(crate) reply: Replier,
    pub(crate) answer: Reply,
    pub(crate) task_id: TaskId,
    /// The message's (session, message id), forgotten again if the insert failed.
    pub(crate) message: Option<(String, String)>,
    pub(crate) events: mpsc::UnboundedSender<StoreEvent>,
    /// Carries the answer to its connection when it is sent on the writer thread.
    pub(crate) relay: Relay,
}

impl Ack {
    pub(crate) fn new() -> Arc<Ack> {
        Arc::new(Ack(Mutex::new(State::Waiting)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store's outcome (on the writer thread).
    pub(crate) fn committed(&self, result: Result<Outcome, StoreError>) {
        let mut state = self.lock();
        match std::mem::replace(&mut *state, State::Sent) {
            State::Waiting => *state = State::Committed(result),
            State::Answered(answer) => {
                drop(state);
                answer.send(result, true);
            }
            State::Committed(_) | State::Sent => {}
        }
    }

    /// The loop's answer.
    pub(crate) fn answered(&self, answer: Answer) {
        let mut state = self.lock();
        match std::mem::replace(&mut *state, State::Sent) {
            State::Waiting => *state = State::Answered(answer),
            State::Committed(result) => {
                drop(state);
                answer.send(result, false);
            }
            State::Answered(_) | State::Sent => {}
        }
    }
}

impl Answer {
    /// Sends the answer for the store's `result`; `relayed` on a thread other than
    /// the loop's.
    fn send(self, result: Result<Outcome, StoreError>, relayed: bool) {
        let Answer {
            reply,
            answer,
            task_id,
            message,
            events,
            relay,
        } = self;
        let answer = match result {
            Ok(Outcome::Duplicate(original)) => {
                let _ = events.send(StoreEvent::InsertFailed {
                    task_id,
                    message,
                    original: Some(original),
                });
                super::send::duplicate_of_stored(answer, original)
            }
            Ok(_) => answer,
            Err(e) => {
                let _ = events.send(StoreEvent::InsertFailed {
                    task_id,
                    message,
                    original: None,
                });
                err(ErrorCode::StoreFailed, text::store_failed(e))
            }
        };
        if relayed {
            reply.send_relayed(answer, &relay);
        } else {
            reply.send(answer);
        }
    }
}

/// The commit half of an [`Ack`], moved into the store's callback: dropped uncalled,
/// it reports the store closed.
pub(crate) struct OnCommit(Option<Arc<Ack>>);

impl OnCommit {
    pub(crate) fn new(ack: &Arc<Ack>) -> OnCommit {
        OnCommit(Some(ack.clone()))
    }

    pub(crate) fn done(mut self, result: Result<Outcome, StoreError>) {
        if let Some(ack) = self.0.take() {
            ack.committed(result);
        }
    }
}

impl Drop for OnCommit {
    fn drop(&mut self) {
        if let Some(ack) = self.0.take() {
            ack.committed(Err(StoreError::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::control::{Answer as Typed, ErrorBody};

    fn answer(
        events: &mpsc::UnboundedSender<StoreEvent>,
    ) -> (Answer, tokio::sync::oneshot::Receiver<Reply>) {
        let (reply, rx) = Replier::channel();
        let answer = Answer {
            reply,
            answer: Ok(Typed::Tasks(Vec::new())),
            task_id: TaskId::from_u128(1),
            message: None,
            events: events.clone(),
            relay: Relay::gone(),
        };
        (answer, rx)
    }

    #[test]
    fn the_answer_waits_for_the_commit_in_either_order() {
        let (events, mut failures) = mpsc::unbounded_channel();
        // The loop answers first: nothing is sent until the commit.
        let ack = Ack::new();
        let on_commit = OnCommit::new(&ack);
        let (a, mut rx) = answer(&events);
        ack.answered(a);
        assert!(rx.try_recv().is_err(), "not before the commit");
        on_commit.done(Ok(Outcome::Inserted));
        assert!(matches!(rx.try_recv(), Ok(Ok(Typed::Tasks(_)))));
        // The commit first: sent when the loop answers.
        let ack = Ack::new();
        OnCommit::new(&ack).done(Ok(Outcome::Inserted));
        let (a, mut rx) = answer(&events);
        ack.answered(a);
        assert!(matches!(rx.try_recv(), Ok(Ok(Typed::Tasks(_)))));
        assert!(failures.try_recv().is_err(), "no failure reported");
    }

    #[test]
    fn a_failed_or_dropped_commit_is_answered_store_failed_and_reported() {
        let (events, mut failures) = mpsc::unbounded_channel();
        for fail in [
            |c: OnCommit| c.done(Err(StoreError::Closed)),
            |c: OnCommit| drop(c),
        ] {
            let ack = Ack::new();
            let (a, mut rx) = answer(&events);
            ack.answered(a);
            fail(OnCommit::new(&ack));
            let got: Result<Typed, ErrorBody> = rx.try_recv().expect("answered");
            assert_eq!(got.unwrap_err().code, ErrorCode::StoreFailed);
            assert!(matches!(
                failures.try_recv(),
                Ok(StoreEvent::InsertFailed { original: None, .. })
            ));
        }
    }
}
