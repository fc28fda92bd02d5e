//! `queue`: a session's queue settings.

use std::sync::{Arc, Mutex};

use crate::control::Replier;
use agentd_core::QueueChange;
use agentd_proto::control::{ErrorBody, ErrorCode};
use agentd_proto::text;
use agentd_store::Op;

use crate::control::Reply;
use crate::supervisor::requests::check_session;
use crate::supervisor::{err, RequestError, Supervisor};
use crate::views;

impl Supervisor {
    /// Shows, changes or resets a session's queue settings. The changes take effect
    /// at once; what must be written to the store is pushed on `saves` (see
    /// [`Supervisor::answer_when_saved`]).
    pub(crate) fn queue_settings(
        &mut self,
        session: &str,
        reset: bool,
        change: QueueChange,
        saves: &mut Vec<Op>,
    ) -> Result<agentd_proto::control::QueueSettingsView, RequestError> {
        check_session(session)?;
        if change.cap == Some(0) {
            return err(ErrorCode::BadRequest, text::CAP_TOO_SMALL);
        }
        if change
            .debounce
            .is_some_and(|d| d > agentd_core::MAX_DEBOUNCE)
        {
            return err(ErrorCode::BadRequest, text::DEBOUNCE_TOO_LONG);
        }
        if reset {
            self.dispatcher.reset_settings(session);
            saves.push(Op::ResetSettings {
                session: session.to_string(),
            });
        }
        if change != QueueChange::default() {
            let settings = change.apply(self.dispatcher.settings(session));
            self.dispatcher.set_settings(session, settings);
            saves.push(crate::durable::settings_op(session, settings));
        }
        Ok(views::settings_view(
            session,
            self.dispatcher.settings(session),
            self.dispatcher.has_own_settings(session),
        ))
    }

    /// Answers `reply` with `answer` once every op of `saves` is committed (settings a
    /// user is told are saved must survive a crash), or with `store_failed` if one
    /// could not be written: the settings are in effect then and the store keeps
    /// trying to write them (in order), but until it can a restart would lose them,
    /// and the user is told so. Without saves, answers at once.
    pub(crate) fn answer_when_saved(&self, saves: Vec<Op>, reply: Replier, answer: Reply) {
        if saves.is_empty() || answer.is_err() {
            reply.send(answer);
            return;
        }
        struct Waiting {
            left: usize,
            failed: Option<String>,
            reply: Option<(Replier, Reply)>,
        }
        let waiting = Arc::new(Mutex::new(Waiting {
            left: saves.len(),
            failed: None,
            reply: Some((reply, answer)),
        }));
        for op in saves {
            let waiting = Arc::clone(&waiting);
            self.store.submit_reporting(op, move |result| {
                let Ok(mut w) = waiting.lock() else { return };
                w.left -= 1;
                if let Err(e) = result {
                    w.failed.get_or_insert(e.to_string());
                }
                if w.left == 0 {
                    if let Some((reply, answer)) = w.reply.take() {
                        let answer = match w.failed.take() {
                            Some(e) => Err(ErrorBody::new(
                                ErrorCode::StoreFailed,
                                text::settings_not_saved(e),
                            )),
                            None => answer,
                        };
                        reply.send(answer);
                    }
                }
            });
        }
    }
}
