//! The acknowledgement of new work: sent once both the task's record is committed
//! and the loop has its answer, by whichever of the two comes second (the store's
//! writer thread, or the loop). No task waits for the commit, so an accepted message
//! costs no task spawn between the commit and its answer; an answer sent on the
//! writer thread goes through the [`Relay`], so the answers of one group commit wake
//! the loop's runtime once, not once each.
//!
//! **Invariant:** the answer goes out only after the commit (an acknowledged message
//! is durable), and exactly once; a commit callback that the store drops uncalled
//! counts as the store closed. A duplicate of the message that comes in before the
//! commit waits for it too ([`Ack::duplicate`]), and gets the same outcome.

use std::sync::{Arc, Mutex, PoisonError};

use agentd_core::TaskId;
use agentd_proto::control::ErrorCode;
use agentd_proto::text;
use agentd_store::{Outcome, StoreError};
use tokio::sync::mpsc;

use crate::control::{Replier, Reply};
use crate::replier::Relay;
use crate::supervisor::{err, StoreEvent};

/// One piece of new work waiting for its commit and its answer, and the answers to
/// duplicates of its message that came in before the commit.
pub(crate) struct Ack(Mutex<State>);

#[derive(Default)]
struct State {
    /// The store's outcome, once the commit's completion came in.
    settled: Option<Settled>,
    /// The loop's answer, until it is sent.
    answer: Option<Answer>,
    answered: bool,
    /// Duplicates of the message, answered with its outcome when it comes in.
    duplicates: Vec<Duplicate>,
}

/// The store's outcome for the insert, kept for duplicates that come in later.
#[derive(Clone)]
enum Settled {
    Inserted,
    /// The store held the message already, as this task.
    Stored(TaskId),
    Failed(StoreError),
}

impl From<Result<Outcome, StoreError>> for Settled {
    fn from(result: Result<Outcome, StoreError>) -> Settled {
        match result {
            Ok(Outcome::Duplicate(original)) => Settled::Stored(original),
            Ok(_) => Settled::Inserted,
            Err(e) => Settled::Failed(e),
        }
    }
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

/// The answer to a duplicate of a message whose insert is in flight: sent only with
/// the original's outcome (the loop's answer if it committed, else the original's
/// error), so that a duplicate is never acknowledged before its original is.
pub(crate) struct Duplicate {
    pub(crate) reply: Replier,
    pub(crate) answer: Reply,
    pub(crate) relay: Relay,
}

impl Ack {
    pub(crate) fn new() -> Arc<Ack> {
        Arc::new(Ack(Mutex::new(State::default())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store's outcome (on the writer or syncer thread).
    pub(crate) fn committed(&self, result: Result<Outcome, StoreError>) {
        let mut state = self.lock();
        if state.settled.is_some() {
            return;
        }
        let settled = Settled::from(result);
        state.settled = Some(settled.clone());
        let answer = state.answer.take();
        let duplicates = std::mem::take(&mut state.duplicates);
        drop(state);
        if let Some(answer) = answer {
            answer.send(&settled, true);
        }
        for duplicate in duplicates {
            duplicate.send(&settled, true);
        }
    }

    /// The loop's answer.
    pub(crate) fn answered(&self, answer: Answer) {
        let mut state = self.lock();
        if std::mem::replace(&mut state.answered, true) {
            return;
        }
        match state.settled.clone() {
            Some(settled) => {
                drop(state);
                answer.send(&settled, false);
            }
            None => state.answer = Some(answer),
        }
    }

    /// A duplicate of the message (on the loop): answered now if the commit is in,
    /// else with it.
    pub(crate) fn duplicate(&self, duplicate: Duplicate) {
        let mut state = self.lock();
        match state.settled.clone() {
            Some(settled) => {
                drop(state);
                duplicate.send(&settled, false);
            }
            None => state.duplicates.push(duplicate),
        }
    }

    /// The insert committed: a duplicate needs it no longer.
    pub(crate) fn inserted(&self) -> bool {
        matches!(self.lock().settled, Some(Settled::Inserted))
    }
}

impl Answer {
    /// Sends the answer for the store's outcome; `relayed` on a thread other than
    /// the loop's.
    fn send(self, settled: &Settled, relayed: bool) {
        let Answer {
            reply,
            answer,
            task_id,
            message,
            events,
            relay,
        } = self;
        let answer = match settled {
            Settled::Stored(original) => {
                let _ = events.send(StoreEvent::InsertFailed {
                    task_id,
                    message,
                    original: Some(*original),
                });
                super::send::duplicate_of_stored(answer, *original)
            }
            Settled::Inserted => answer,
            Settled::Failed(e) => {
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

impl Duplicate {
    /// Like [`Answer::send`], without telling the loop again.
    fn send(self, settled: &Settled, relayed: bool) {
        let answer = match settled {
            Settled::Inserted => self.answer,
            Settled::Stored(original) => super::send::duplicate_of_stored(self.answer, *original),
            Settled::Failed(e) => err(ErrorCode::StoreFailed, text::store_failed(e)),
        };
        if relayed {
            self.reply.send_relayed(answer, &self.relay);
        } else {
            self.reply.send(answer);
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

    fn duplicate() -> (Duplicate, tokio::sync::oneshot::Receiver<Reply>) {
        let (reply, rx) = Replier::channel();
        let duplicate = Duplicate {
            reply,
            answer: Ok(Typed::Tasks(Vec::new())),
            relay: Relay::gone(),
        };
        (duplicate, rx)
    }

    #[test]
    fn a_duplicate_is_answered_only_with_its_originals_commit_and_its_outcome() {
        let (events, mut failures) = mpsc::unbounded_channel();
        let outcomes: [fn(OnCommit); 4] = [
            |c| c.done(Ok(Outcome::Inserted)),
            |c| c.done(Ok(Outcome::Duplicate(TaskId::from_u128(7)))),
            |c| c.done(Err(StoreError::Closed)),
            drop,
        ];
        for (n, commit) in outcomes.into_iter().enumerate() {
            let ack = Ack::new();
            let on_commit = OnCommit::new(&ack);
            let (original, mut original_rx) = answer(&events);
            ack.answered(original);
            let (early, mut early_rx) = duplicate();
            ack.duplicate(early);
            // The original is in flight (agentd may die, the disk may be full):
            // its duplicate must not be acknowledged yet.
            assert!(early_rx.try_recv().is_err(), "{n}: not before the commit");
            assert!(!ack.inserted(), "{n}");
            commit(on_commit);
            let original: Result<Typed, ErrorBody> = original_rx.try_recv().expect("answered");
            let early: Result<Typed, ErrorBody> = early_rx.try_recv().expect("answered");
            // One that comes in after the commit is answered at once, the same way.
            let (late, mut late_rx) = duplicate();
            ack.duplicate(late);
            let late: Result<Typed, ErrorBody> = late_rx.try_recv().expect("answered at once");
            for got in [&early, &late] {
                match (&original, got) {
                    (Ok(_), Ok(Typed::Tasks(_))) => {}
                    (Err(o), Err(d)) => {
                        assert_eq!(o.code, ErrorCode::StoreFailed, "{n}");
                        assert_eq!((o.code, &o.message), (d.code, &d.message), "{n}");
                    }
                    _ => panic!("{n}: the duplicate's answer differs from the original's"),
                }
            }
            assert_eq!(ack.inserted(), n == 0, "{n}");
            // The loop hears of a failure once, from the original.
            let told = std::iter::from_fn(|| failures.try_recv().ok()).count();
            assert_eq!(told, usize::from(n > 0), "{n}");
        }
    }

    #[test]
    fn a_duplicate_after_a_commit_the_loop_has_not_answered_yet_is_answered_at_once() {
        let (events, _failures) = mpsc::unbounded_channel();
        let ack = Ack::new();
        OnCommit::new(&ack).done(Err(StoreError::Closed));
        let (late, mut late_rx) = duplicate();
        ack.duplicate(late);
        let got: Result<Typed, ErrorBody> = late_rx.try_recv().expect("answered at once");
        assert_eq!(got.unwrap_err().code, ErrorCode::StoreFailed);
        let (original, mut original_rx) = answer(&events);
        ack.answered(original);
        let got: Result<Typed, ErrorBody> = original_rx.try_recv().expect("answered");
        assert_eq!(got.unwrap_err().code, ErrorCode::StoreFailed);
    }
}
