//! `log`: a task's output log, a chunk at a time (for `agentctl log [-f]`).

use std::collections::HashSet;
use std::path::Path;

use crate::control::Replier;
use agentd_core::TaskId;
use agentd_proto::control::{ErrorBody, ErrorCode, LogChunk, MAX_LOG_CHUNK};
use agentd_proto::text;
use agentd_store::{LogReader, Reader};

use crate::control::Reply;
use crate::output::Pumps;
use crate::supervisor::history::{pick, Lookup};
use crate::supervisor::{err, json, Supervisor};

impl Supervisor {
    /// Up to [`MAX_LOG_CHUNK`] bytes of the task's log from `offset`, read by the
    /// reader thread (the file, and the store for a task memory does not know), so
    /// the loop touches no disk.
    pub(crate) fn log(&self, task_id: &str, offset: u64, reply: Replier) {
        let Some(reads) = &self.reads else {
            reply.send(self.log_now(task_id, offset));
            return;
        };
        let (prefix, mut matches) = match self.lookup_in_memory(task_id) {
            Ok(Lookup::Id(id)) => (None, vec![id]),
            Ok(Lookup::Prefix {
                prefix,
                text,
                matches,
            }) => (Some((prefix, text)), matches),
            Err(e) => {
                reply.send(Err(e));
                return;
            }
        };
        matches.sort();
        matches.dedup();
        if let (Some((_, text)), true) = (&prefix, matches.len() > 1) {
            let ambiguous = text::ambiguous_prefix(text, matches.len());
            reply.send(err(ErrorCode::BadRequest, ambiguous));
            return;
        }
        let live: HashSet<TaskId> = matches
            .iter()
            .filter(|id| self.dispatcher.task(id).is_some())
            .copied()
            .collect();
        let known: HashSet<TaskId> = matches
            .iter()
            .filter(|id| live.contains(id) || self.history.cached(id).is_some())
            .copied()
            .collect();
        let state_dir = self.config.state_dir.clone();
        let pumps = self.pumps.clone();
        let asked = task_id.trim().to_string();
        let run = move |reader: &Reader| {
            let read_failed = |e: agentd_store::StoreError| {
                ErrorBody::new(ErrorCode::StoreFailed, text::history_read_failed(e))
            };
            let id = match prefix {
                None => matches[0],
                Some((prefix, text)) => {
                    let stored = reader.ids_with_prefix(&prefix, 16).map_err(read_failed)?;
                    matches.extend(stored);
                    pick(&text, matches)?
                }
            };
            let known = known.contains(&id) || reader.task(id).map_err(read_failed)?.is_some();
            read_chunk(
                &state_dir,
                &pumps,
                id,
                &asked,
                offset,
                known,
                live.contains(&id),
            )
        };
        reads.submit(run, reply);
    }

    /// [`Supervisor::log`] on the loop (when the reader thread is not there).
    fn log_now(&self, task_id: &str, offset: u64) -> Reply {
        let id = self.resolve(task_id)?;
        let live = self.dispatcher.task(&id).is_some();
        let known = live || self.history.get(&id).is_some();
        read_chunk(
            &self.config.state_dir,
            &self.pumps,
            id,
            task_id,
            offset,
            known,
            live,
        )
    }
}

/// One chunk of task `id`'s log (`asked`: the id as the request gave it). `known`:
/// the task exists (a log without one is still shown); `live`: it may still run.
fn read_chunk(
    state_dir: &Path,
    pumps: &Pumps,
    id: TaskId,
    asked: &str,
    offset: u64,
    known: bool,
    live: bool,
) -> Reply {
    let path = agentd_store::output::log_path(state_dir, id);
    if !known && !path.exists() {
        return err(ErrorCode::NotFound, text::no_task(asked));
    }
    // Looked at before the read: a log whose pump had ended is complete, so an empty
    // read of it is its end.
    let pumping = pumps
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&id);
    let mut reader = LogReader::from_offset(state_dir, id, offset);
    let bytes = match reader.read_chunk(MAX_LOG_CHUNK) {
        Ok(bytes) => bytes,
        Err(e) => {
            return err(
                ErrorCode::Internal,
                format!("cannot read {}: {e}", path.display()),
            )
        }
    };
    let (data, used) = utf8_prefix(&bytes);
    json(LogChunk {
        task_id: id.to_string(),
        offset,
        next_offset: offset + used as u64,
        done: !live && !pumping && bytes.is_empty(),
        data,
    })
}

/// The text of `bytes` without a character cut at its end (that one comes with the
/// next chunk); other invalid bytes become U+FFFD. Returns the text and the bytes used.
fn utf8_prefix(bytes: &[u8]) -> (String, usize) {
    let mut used = bytes.len();
    if let Err(e) = std::str::from_utf8(bytes) {
        if e.error_len().is_none() && bytes.len() - e.valid_up_to() < 4 {
            used = e.valid_up_to();
        }
    }
    (String::from_utf8_lossy(&bytes[..used]).into_owned(), used)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_chunk_never_splits_a_character() {
        let text = "héllo".as_bytes();
        assert_eq!(super::utf8_prefix(&text[..2]), ("h".to_string(), 1));
        assert_eq!(super::utf8_prefix(text), ("héllo".to_string(), 6));
        assert_eq!(super::utf8_prefix(b"a\xffb"), ("a\u{fffd}b".to_string(), 3));
    }
}
