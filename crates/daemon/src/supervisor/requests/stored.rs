//! `status ID` and `tasks --all` over finished tasks that only the store holds (from
//! earlier runs, or past the in-memory history): the loop gathers what memory holds
//! and hands the rest to the reader thread ([`crate::reads`]) with the reply, so it
//! never waits on the disk.
//!
//! Finished tasks are listed from the store (as the retention keeps them), plus the
//! ones whose ending is still being written (`Supervisor::finishing`), from memory.

use std::borrow::Cow;
use std::collections::HashSet;

use crate::control::Replier;
use agentd_core::{Task, TaskId};
use agentd_proto::control::{ErrorBody, ErrorCode, TaskView, MAX_TASKS_PAGE};
use agentd_proto::text;
use agentd_store::Reader;

use crate::control::Reply;
use crate::durable;
use crate::listing;
use crate::supervisor::history::{pick, Lookup};
use crate::supervisor::requests::chat_answer;
use crate::supervisor::{json, Supervisor};
use crate::views;

/// Most store matches of a prefix that are told apart (an ambiguous prefix says
/// how many it matched, up to this).
const PREFIX_MATCHES: usize = 16;

impl Supervisor {
    /// `status ID` (and a chat's `/status ID`, given its session): answered now when
    /// memory knows the task, else by the reader thread.
    pub(crate) fn status_of(&self, text: &str, chat: Option<String>, reply: Replier) {
        let answer = move |view: Result<TaskView, ErrorBody>| status_answer(view, chat.as_deref());
        let lookup = match self.lookup_in_memory(text) {
            Ok(lookup) => lookup,
            Err(e) => {
                reply.send(Err(e));
                return;
            }
        };
        let not_found = {
            let text = text.trim().to_string();
            move || ErrorBody::new(ErrorCode::NotFound, text::no_task(&text))
        };
        // What memory can answer, and what only the store can.
        let (memory_view, prefix) = match lookup {
            Lookup::Id(id) => match self.cached_view(&id) {
                Some(view) => {
                    reply.send(answer(Ok(view)));
                    return;
                }
                None => (None, Err(id)),
            },
            Lookup::Prefix {
                prefix,
                text,
                matches,
            } => {
                let mut matches = matches;
                matches.sort();
                matches.dedup();
                if matches.len() > 1 {
                    // More in the store cannot make it unique.
                    let ambiguous = text::ambiguous_prefix(&text, matches.len());
                    reply.send(Err(ErrorBody::new(ErrorCode::BadRequest, ambiguous)));
                    return;
                }
                let view = matches.first().and_then(|id| self.cached_view(id));
                (view, Ok((prefix, text, matches)))
            }
        };
        let Some(reads) = &self.reads else {
            // No reader: the synchronous path (an indexed read on the loop).
            let view = match prefix {
                Err(id) => self.view(&id).ok_or_else(not_found),
                Ok((_, text, _)) => self
                    .resolve(&text)
                    .and_then(|id| self.view(&id).ok_or_else(not_found)),
            };
            reply.send(answer(view));
            return;
        };
        reads.submit(
            move |reader: &Reader| {
                let view = match prefix {
                    Err(id) => stored_view(reader, id).and_then(|v| v.ok_or_else(not_found)),
                    Ok((prefix, text, mut matches)) => {
                        let stored = reader
                            .ids_with_prefix(&prefix, PREFIX_MATCHES)
                            .map_err(store_error)?;
                        matches.extend(stored);
                        pick(&text, matches).and_then(|id| match &memory_view {
                            Some(view) if view.task_id == id.to_string() => Ok(view.clone()),
                            _ => stored_view(reader, id).and_then(|v| v.ok_or_else(not_found)),
                        })
                    }
                };
                answer(view)
            },
            reply,
        );
    }

    /// `tasks` with `all`: the live tasks and the finished ones, from memory and the
    /// store, as one page (with `limit` or `cursor`) or as the whole listing.
    pub(crate) fn tasks_all(
        &self,
        session: Option<String>,
        limit: Option<u32>,
        cursor: Option<&str>,
        reply: Replier,
    ) {
        let Some(reads) = &self.reads else {
            reply.send(self.tasks(session.as_deref(), true, limit, cursor));
            return;
        };
        let retention = self.config.retention;
        if limit.is_none() && cursor.is_none() {
            let in_session = |t: &&Task| session.as_deref().is_none_or(|s| t.session == s);
            if self.dispatcher.tasks().filter(in_session).count() > MAX_TASKS_PAGE as usize {
                reply.send(Err(listing::too_large()));
                return;
            }
            let live = self.list(session.as_deref(), false);
            let mut finishing = self.finishing_tasks(session.as_deref(), None);
            finishing.sort_by_key(|t| (t.finished_at, t.id));
            let finishing: Vec<TaskView> = finishing
                .iter()
                .map(|t| views::task_view(t, None))
                .collect();
            let run = move |reader: &Reader| {
                // One more than fits says that it does not.
                let room = MAX_TASKS_PAGE as usize + 1 - live.len();
                let stored = reader
                    .finished_oldest_first(session.as_deref(), room, &retention)
                    .map_err(store_error)?;
                let known: HashSet<&str> = finishing.iter().map(|v| v.task_id.as_str()).collect();
                let stored: Vec<TaskView> = stored
                    .iter()
                    .filter_map(durable::stored_view)
                    .filter(|v| !known.contains(v.task_id.as_str()))
                    .collect();
                let mut whole = live;
                whole.extend(stored);
                whole.extend(finishing);
                listing::whole(whole).and_then(json)
            };
            reads.submit(run, reply);
        } else {
            let after = match listing::parse_cursor(cursor) {
                Ok(after) => after,
                Err(e) => {
                    reply.send(Err(e));
                    return;
                }
            };
            let limit = listing::page_limit(limit);
            let position = |id: &TaskId| self.dispatcher.position(id);
            let live = self.dispatcher.tasks().map(Cow::Borrowed);
            let finishing = self.finishing_tasks(session.as_deref(), after).into_iter();
            let memory: Vec<TaskView> =
                listing::first_by_id(live.chain(finishing), session.as_deref(), after, limit + 1)
                    .iter()
                    .map(|t| views::task_view(t, position(&t.id)))
                    .collect();
            let run = move |reader: &Reader| {
                let stored = reader
                    .finished_by_id(session.as_deref(), after, limit + 1, &retention)
                    .map_err(store_error)?;
                let mut candidates = memory;
                let known: HashSet<String> = candidates.iter().map(|v| v.task_id.clone()).collect();
                candidates.extend(
                    stored
                        .iter()
                        .filter_map(durable::stored_view)
                        .filter(|v| !known.contains(&v.task_id)),
                );
                candidates.sort_by(|a, b| a.task_id.cmp(&b.task_id));
                candidates.truncate(limit + 1);
                json(listing::page_of_views(candidates, limit))
            };
            reads.submit(run, reply);
        }
    }

    /// Finished tasks whose ending is still being written (of `session`, after
    /// `after`), from memory: the store does not list them yet.
    fn finishing_tasks(&self, session: Option<&str>, after: Option<TaskId>) -> Vec<Cow<'_, Task>> {
        let finishing = crate::supervisor::lock(&self.finishing);
        finishing
            .iter()
            .filter(|id| after.is_none_or(|after| **id > after))
            .filter_map(|id| self.history.cached(id))
            .filter(|t| session.is_none_or(|s| t.session == s))
            .collect()
    }

    /// A task's view from the dispatcher or the in-memory history (no disk read).
    fn cached_view(&self, id: &TaskId) -> Option<TaskView> {
        if let Some(task) = self.dispatcher.task(id) {
            return Some(self.live_view(task));
        }
        self.history.cached(id).map(|t| views::task_view(&t, None))
    }
}

fn stored_view(reader: &Reader, id: TaskId) -> Result<Option<TaskView>, ErrorBody> {
    match reader.task(id) {
        Ok(record) => Ok(record.as_ref().and_then(durable::stored_view)),
        Err(e) => Err(store_error(e)),
    }
}

fn store_error(e: agentd_store::StoreError) -> ErrorBody {
    ErrorBody::new(ErrorCode::StoreFailed, text::history_read_failed(e))
}

/// `status`'s answer: the view, or in a chat its status line (the chat's own tasks
/// only).
fn status_answer(view: Result<TaskView, ErrorBody>, chat: Option<&str>) -> Reply {
    let view = view?;
    match chat {
        None => json(view),
        Some(session) => {
            if view.session != session {
                return Err(ErrorBody::new(
                    ErrorCode::Forbidden,
                    text::task_not_in_this_chat(&view.task_id),
                ));
            }
            Ok(chat_answer(
                "status",
                text::chat_task_status(&view),
                serde_json::to_value(&view).unwrap_or_default(),
            ))
        }
    }
}
