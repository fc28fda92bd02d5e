//! `log`: a task's output log, a chunk at a time (for `agentctl log [-f]`).

use agentd_proto::control::{ErrorCode, LogChunk, MAX_LOG_CHUNK};
use agentd_proto::text;
use agentd_store::LogReader;

use crate::control::Reply;
use crate::supervisor::{err, json, Supervisor};

impl Supervisor {
    /// Up to [`MAX_LOG_CHUNK`] bytes of the task's log from `offset`. The read is of
    /// a local file (page cache), bounded by the chunk size.
    pub(crate) fn log(&self, task_id: &str, offset: u64) -> Reply {
        let id = self.resolve(task_id)?;
        let live = self.dispatcher.task(&id).is_some();
        let known = live || self.history.get(&id).is_some();
        let path = agentd_store::output::log_path(&self.config.state_dir, id);
        if !known && !path.exists() {
            return err(ErrorCode::NotFound, text::no_task(task_id));
        }
        let mut reader = LogReader::from_offset(&self.config.state_dir, id, offset);
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
        let pumping = self
            .pumps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id);
        json(LogChunk {
            task_id: id.to_string(),
            offset,
            next_offset: offset + used as u64,
            done: !live && !pumping && bytes.is_empty(),
            data,
        })
    }
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
