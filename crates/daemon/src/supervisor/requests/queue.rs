//! `queue`: a session's queue settings.

use agentd_core::QueueChange;
use agentd_proto::control::ErrorCode;
use agentd_proto::text;

use crate::supervisor::requests::check_session;
use crate::supervisor::{err, RequestError, Supervisor};
use crate::views;

impl Supervisor {
    /// Shows, changes or resets a session's queue settings.
    pub(crate) fn queue_settings(
        &mut self,
        session: &str,
        reset: bool,
        change: QueueChange,
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
            self.store.submit_detached(agentd_store::Op::ResetSettings {
                session: session.to_string(),
            });
        }
        if change != QueueChange::default() {
            let settings = change.apply(self.dispatcher.settings(session));
            self.dispatcher.set_settings(session, settings);
            self.store
                .submit_detached(crate::durable::settings_op(session, settings));
        }
        Ok(views::settings_view(
            session,
            self.dispatcher.settings(session),
            self.dispatcher.has_own_settings(session),
        ))
    }
}
