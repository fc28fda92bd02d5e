//! The loop's store writes, handed to the store's writer together when the loop is
//! about to wait for its next event (or once [`MAX_HELD`] are held).
//!
//! A step often writes more than once: a task's end (`Finish`) admits the next task,
//! whose spawn writes `Start`; and a burst of requests is a burst of steps, one
//! `Insert` each. Submitted one by one, the writer thread wakes for the first,
//! commits it while the loop goes on, and wakes again for the next: a wake-up and a
//! transaction each. Submitted back to back when the loop has nothing else to do,
//! they are one wake-up and one transaction (handed over as one message, so the
//! writer cannot wake for the first and commit it alone before the next arrives).
//! Nothing waits for them meanwhile (the loop never blocks on the store;
//! acknowledgements are sent from the writer after the commit), and their order is
//! kept: ops reach the writer in the order they were submitted, whichever method
//! submitted them.

use std::cell::RefCell;

use agentd_store::{Batch, Op, Outcome, StoreError, StoreWriter};

/// Held writes are handed over at the end of a step once there are this many, even
/// if more events are ready: a flood of requests does not hold acknowledgements back.
pub(crate) const MAX_HELD: usize = 64;

/// The supervisor's handle on the store's writer: the methods of [`StoreWriter`],
/// held until [`StepWrites::flush`], which hands them over as one [`Batch`] (one
/// message on the writer's channel, so at most one wake-up of the writer).
pub(crate) struct StepWrites {
    writer: StoreWriter,
    /// A cell, so that the writes can be submitted through `&self` as with the
    /// writer itself (the supervisor is one thread's).
    held: RefCell<Batch>,
}

impl StepWrites {
    pub(crate) fn new(writer: StoreWriter) -> StepWrites {
        StepWrites {
            writer,
            held: RefCell::new(Batch::default()),
        }
    }

    /// [`StoreWriter::submit_with`], at the end of the step.
    pub(crate) fn submit_with(
        &self,
        op: Op,
        done: impl FnOnce(Result<Outcome, StoreError>) + Send + 'static,
    ) {
        self.held.borrow_mut().submit_with(op, done);
    }

    /// [`StoreWriter::submit_reporting`], at the end of the step.
    pub(crate) fn submit_reporting(
        &self,
        op: Op,
        done: impl FnOnce(Result<Outcome, StoreError>) + Send + 'static,
    ) {
        self.held.borrow_mut().submit_reporting(op, done);
    }

    /// [`StoreWriter::submit_detached`], at the end of the step.
    pub(crate) fn submit_detached(&self, op: Op) {
        self.held.borrow_mut().submit_detached(op);
    }

    /// Hands the held writes over if there are [`MAX_HELD`] or more (end of a step).
    pub(crate) fn flush_if_many(&self) {
        if self.held.borrow().len() >= MAX_HELD {
            self.flush();
        }
    }

    /// Hands every held write over, then never completes: the last branch of the
    /// loop's biased `select!`, polled only when no other branch is ready, that is
    /// when the loop is about to wait. A write is never held across a wait.
    pub(crate) async fn flush_before_waiting(&self) {
        self.flush();
        std::future::pending().await
    }

    /// Hands every held write to the store's writer, in order, in one hand-over.
    pub(crate) fn flush(&self) {
        if self.held.borrow().is_empty() {
            return;
        }
        let held = std::mem::take(&mut *self.held.borrow_mut());
        agentd_store::timeline::mark(agentd_store::timeline::Stage::Hand, held.len() as u32);
        self.writer.submit_batch(held);
    }
}
