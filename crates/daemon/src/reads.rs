//! The history reader: one thread with its own read-only connection to the store. It
//! answers the read-only requests that need finished tasks from disk (`tasks --all`,
//! `status ID` of a task no longer in memory), so the event loop never waits on the
//! disk. The loop takes what memory holds (live tasks, tasks whose ending is still
//! being written) and hands a job to this thread with the request's reply; the job
//! adds what the store holds and answers. WAL lets it read beside the writer, and it
//! sees committed data only.
//!
//! Bounded: at most [`MAX_WAITING`] jobs wait; past that a request is refused at once
//! (and a job is small: one page of views at most).

use std::sync::mpsc;

use crate::control::Replier;
use agentd_proto::control::{ErrorBody, ErrorCode};
use agentd_proto::text;
use agentd_store::Reader;

use crate::control::Reply;

/// One read of the store, run on the reader thread; its answer goes to `reply`.
pub struct Job {
    pub run: Box<dyn FnOnce(&Reader) -> Reply + Send>,
    pub reply: Replier,
}

/// Most jobs waiting for the reader thread.
pub const MAX_WAITING: usize = 64;

/// A handle to the reader thread; dropping it ends the thread once its jobs are done.
pub struct Reads {
    tx: mpsc::SyncSender<Job>,
}

impl Reads {
    /// Starts the reader thread on `reader` (a read-only connection).
    pub fn start(reader: Reader) -> std::io::Result<Reads> {
        let (tx, rx) = mpsc::sync_channel::<Job>(MAX_WAITING);
        std::thread::Builder::new()
            .name("agentd-reads".into())
            .spawn(move || {
                for job in rx {
                    let answer = (job.run)(&reader);
                    job.reply.send(answer);
                }
            })?;
        Ok(Reads { tx })
    }

    /// Queues the read `run`, answered on `reply`; if [`MAX_WAITING`] jobs wait
    /// already (or the thread is gone) it is answered at once that agentd is busy.
    pub fn submit(&self, run: impl FnOnce(&Reader) -> Reply + Send + 'static, reply: Replier) {
        let job = Job {
            run: Box::new(run),
            reply,
        };
        if let Err(mpsc::TrySendError::Full(job) | mpsc::TrySendError::Disconnected(job)) =
            self.tx.try_send(job)
        {
            job.reply
                .send(Err(ErrorBody::new(ErrorCode::Internal, text::HISTORY_BUSY)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::control::Answer;

    #[test]
    fn jobs_run_in_order_and_past_the_bound_a_request_is_answered_busy() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            agentd_store::Store::open(dir.path(), agentd_store::StoreOptions::default()).unwrap();
        let reads = Reads::start(store.reader().unwrap()).unwrap();
        let (hold_tx, hold_rx) = mpsc::channel::<()>();
        // The first job holds the thread until released.
        let (first, _first_rx) = Replier::channel();
        reads.submit(
            move |_| {
                let _ = hold_rx.recv();
                Ok(Answer::Tasks(Vec::new()))
            },
            first,
        );
        let (order_tx, order_rx) = mpsc::channel::<usize>();
        let mut answers = Vec::new();
        for i in 0..MAX_WAITING + 2 {
            let (reply, rx) = Replier::channel();
            let order = order_tx.clone();
            reads.submit(
                move |r: &Reader| {
                    assert!(r.counts().is_ok());
                    let _ = order.send(i);
                    Ok(Answer::Tasks(Vec::new()))
                },
                reply,
            );
            answers.push(rx);
        }
        // Past the bound: answered at once, busy.
        let mut busy = 0;
        for rx in &mut answers {
            if let Ok(Err(e)) = rx.try_recv() {
                assert_eq!(e.code, ErrorCode::Internal);
                busy += 1;
            }
        }
        assert!(busy >= 1, "a full queue answers busy");
        drop(hold_tx);
        let ran: Vec<usize> = (0..MAX_WAITING + 2 - busy)
            .map(|_| order_rx.recv().unwrap())
            .collect();
        let mut sorted = ran.clone();
        sorted.sort();
        assert_eq!(ran, sorted, "in order");
    }
}
