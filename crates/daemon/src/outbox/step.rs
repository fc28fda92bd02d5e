//! Holding what the supervisor loop queues during one step until the step's
//! `status` snapshot is published.
//!
//! The connections run on a thread of their own and answer `status` from the
//! loop's snapshot ([`crate::info::ServerInfo::status`]). The loop refreshes that
//! snapshot at the end of each step; the answers and events it queues during the
//! step would otherwise be written by the connections' thread at once, so a client
//! could read an answer (or a `started` event) and ask another connection for a
//! `status` that does not count it yet. So, on the loop's thread, between
//! [`StepHold::install`] and the hold's drop, an outbox that a line is queued on
//! holds it and everything queued after it (by any thread, so a connection's order
//! is kept) until [`StepHold::release`], which the loop calls right after it
//! published the snapshot: one lock and at most one wake-up of each outbox the step
//! touched. Lines queued on other threads (the connections' own answers, the
//! store's acknowledgements through the relay, the history reader's) are not held
//! unless they queue behind held ones.
//!
//! **Invariant:** a line held is released by the next [`StepHold::release`] or the
//! hold's drop; the loop calls `release` at the end of every step.

use std::cell::RefCell;
use std::sync::Arc;

use super::Outbox;

thread_local! {
    /// The outboxes holding lines of the current step (`None`: this thread holds
    /// nothing; only the supervisor loop's thread installs a hold).
    static HELD: RefCell<Option<Vec<Arc<Outbox>>>> = const { RefCell::new(None) };
}

/// The loop's hold on its steps' output (see the module documentation). Not `Send`:
/// it belongs to the thread that installed it.
pub struct StepHold {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl StepHold {
    /// Holds, from now on, what this thread queues on any outbox, until
    /// [`StepHold::release`].
    pub fn install() -> StepHold {
        HELD.with(|held| *held.borrow_mut() = Some(Vec::new()));
        StepHold {
            _not_send: std::marker::PhantomData,
        }
    }

    /// Lets every outbox's writer take what this thread queued since the last
    /// release (call it once the step's snapshot is published).
    pub fn release(&self) {
        let outboxes = HELD.with(|held| {
            held.borrow_mut()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default()
        });
        for outbox in outboxes {
            outbox.release_step();
        }
    }
}

impl Drop for StepHold {
    fn drop(&mut self) {
        self.release();
        HELD.with(|held| *held.borrow_mut() = None);
    }
}

/// Whether this thread holds lines queued on `outbox` now; registers `outbox` for
/// the next release. Called under the outbox's lock, only when it holds nothing
/// yet, so each outbox is registered once per step.
pub(super) fn holds(outbox: &Arc<Outbox>) -> bool {
    HELD.with(|held| match held.try_borrow_mut() {
        Ok(mut held) => match held.as_mut() {
            Some(outboxes) => {
                outboxes.push(outbox.clone());
                true
            }
            None => false,
        },
        // Queued while releasing (a writer cannot run on this thread): not held.
        Err(_) => false,
    })
}
