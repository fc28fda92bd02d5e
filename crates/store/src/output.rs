//! Per-task output logs: `logs/<task id>.log` in the state dir. The writer keeps the
//! first `cap` bytes of a task's output, then writes one truncation marker and counts
//! what it drops; a closing line says how much was not kept. The reader pages through
//! a log by offset, which is all `agentctl log` (whole file) and `log -f` (follow from
//! the first byte while the task runs) need.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// Name of the logs directory in the state dir.
pub const LOGS_DIR: &str = "logs";

/// Default cap of one task's log.
pub const DEFAULT_LOG_CAP: u64 = 16 * 1024 * 1024;

/// Where task `id`'s log lives under `state_dir`.
pub fn log_path(state_dir: &Path, id: Uuid) -> PathBuf {
    state_dir.join(LOGS_DIR).join(format!("{id}.log"))
}

/// The line written once when a log reaches its cap.
pub fn truncation_marker(cap: u64) -> String {
    format!("\n[agentd: output truncated: this log keeps the first {cap} bytes]\n")
}

/// The line written when a truncated log is finished.
pub fn dropped_line(dropped: u64) -> String {
    format!("[agentd: {dropped} more bytes of output were not kept]\n")
}

/// Appends a task's output to its log, up to a cap.
#[derive(Debug)]
pub struct TaskLog {
    file: File,
    path: PathBuf,
    cap: u64,
    written: u64,
    dropped: u64,
}

impl TaskLog {
    /// Opens (creating, mode 0600) the log of task `id`, appending to what an earlier
    /// writer left, which counts against the cap.
    pub fn open(state_dir: &Path, id: Uuid, cap: u64) -> io::Result<TaskLog> {
        let path = log_path(state_dir, id);
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        let written = file.metadata()?.len();
        Ok(TaskLog {
            file,
            path,
            cap,
            written,
            dropped: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `bytes`, keeping what fits under the cap. The first append that does
    /// not fit writes the truncation marker; later bytes are only counted.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.dropped > 0 || self.written >= self.cap && !bytes.is_empty() {
            if self.dropped == 0 {
                self.file
                    .write_all(truncation_marker(self.cap).as_bytes())?;
            }
            self.dropped += bytes.len() as u64;
            return Ok(());
        }
        let room = self.cap.saturating_sub(self.written) as usize;
        let (keep, rest) = bytes.split_at(bytes.len().min(room));
        self.file.write_all(keep)?;
        self.written += keep.len() as u64;
        if !rest.is_empty() {
            self.file
                .write_all(truncation_marker(self.cap).as_bytes())?;
            self.dropped += rest.len() as u64;
        }
        Ok(())
    }

    /// Bytes dropped so far because of the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Ends the log: a truncated log gets a line saying how much was not kept.
    pub fn finish(mut self) -> io::Result<()> {
        if self.dropped > 0 {
            self.file.write_all(dropped_line(self.dropped).as_bytes())?;
        }
        self.file.flush()
    }
}

/// Reads a task's log from an offset. A missing log reads as empty (a task that wrote
/// nothing has none).
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
}

impl LogReader {
    pub fn new(state_dir: &Path, id: Uuid) -> LogReader {
        LogReader::at(log_path(state_dir, id))
    }

    pub fn at(path: PathBuf) -> LogReader {
        LogReader {
            path,
            file: None,
            offset: 0,
        }
    }

    /// A reader of task `id`'s log that starts at byte `offset`.
    pub fn from_offset(state_dir: &Path, id: Uuid, offset: u64) -> LogReader {
        LogReader {
            offset,
            ..LogReader::new(state_dir, id)
        }
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Up to `max` bytes past what was read before; empty at the current end of the
    /// log (call again later to follow a log that is still being written).
    pub fn read_chunk(&mut self, max: usize) -> io::Result<Vec<u8>> {
        // A file offset is an i64, and the kernel refuses a read whose end would not
        // fit in one: no log reaches there, so past it is past the end.
        if self.offset.saturating_add(max as u64) > i64::MAX as u64 {
            return Ok(Vec::new());
        }
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(self.offset))?;
                    self.file = Some(file);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
        let file = self.file.as_mut().expect("opened above");
        let mut buf = Vec::with_capacity(max.min(64 * 1024));
        file.take(max as u64).read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        Ok(buf)
    }

    /// The whole rest of the log.
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read_chunk(1024 * 1024)?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }
}

/// Removes task `id`'s log, if it has one.
pub fn remove_log(state_dir: &Path, id: Uuid) -> io::Result<()> {
    match std::fs::remove_file(log_path(state_dir, id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_cap_bytes_then_one_marker_and_a_count() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::now_v7();
        let mut log = TaskLog::open(dir.path(), id, 10).unwrap();
        log.append(b"0123456").unwrap();
        log.append(b"789abc").unwrap();
        log.append(b"more").unwrap();
        assert_eq!(log.dropped(), 7);
        log.finish().unwrap();
        let text =
            String::from_utf8(LogReader::new(dir.path(), id).read_to_end().unwrap()).unwrap();
        assert_eq!(
            text,
            format!("0123456789{}{}", truncation_marker(10), dropped_line(7))
        );
    }

    #[test]
    fn a_log_reopened_after_a_restart_keeps_counting_against_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::now_v7();
        let mut log = TaskLog::open(dir.path(), id, 8).unwrap();
        log.append(b"abcdef").unwrap();
        drop(log);
        let mut log = TaskLog::open(dir.path(), id, 8).unwrap();
        log.append(b"ghij").unwrap();
        log.finish().unwrap();
        let bytes = LogReader::new(dir.path(), id).read_to_end().unwrap();
        assert!(bytes.starts_with(b"abcdefgh\n[agentd: output truncated"));
    }

    #[test]
    fn follows_a_log_being_written_from_its_first_byte() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::now_v7();
        let mut reader = LogReader::new(dir.path(), id);
        assert!(reader.read_chunk(100).unwrap().is_empty(), "no log yet");
        let mut log = TaskLog::open(dir.path(), id, 1000).unwrap();
        log.append(b"line 1\n").unwrap();
        assert_eq!(reader.read_chunk(3).unwrap(), b"lin");
        assert_eq!(reader.read_chunk(100).unwrap(), b"e 1\n");
        assert!(reader.read_chunk(100).unwrap().is_empty());
        log.append(b"line 2\n").unwrap();
        assert_eq!(reader.read_chunk(100).unwrap(), b"line 2\n");
        assert_eq!(reader.offset(), 14);
        remove_log(dir.path(), id).unwrap();
        remove_log(dir.path(), id).unwrap();
    }
}
