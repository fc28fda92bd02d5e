//! agentd's log output (stderr, the journal under systemd): lines reach it in the
//! order they were made, and the event loop's thread writes its lines together just
//! before it waits, instead of one `write` each.
//!
//! A trivial task logs two lines on the loop (`task started`, `task finished`); one
//! `write(2)` each was about 2% of the loop's CPU per task. Lines made on a thread
//! marked with [`hold_on_this_thread`] (the runtime's thread, which runs the loop)
//! are appended to one shared buffer; [`flush`] writes it, and the runtime calls it
//! right before it parks (`on_thread_park`), so a line is never held across a wait.
//! A line made on any other thread (the store's writer, the Killer, log pumps) is
//! appended to the same buffer and written at once with the lines held before it:
//! the order of all lines is the order they were made, as when each was written
//! on its own. The buffer is also written once it holds [`HOLD_LIMIT`] bytes (a
//! step that logs a lot, such as recovery), and by [`flush`] when agentd exits or
//! panics.
//!
//! [`Clock`] stamps lines as `tracing-subscriber`'s default clock does
//! (`2026-12-01T16:21:44.352364Z`), but formats the date and time of day once per
//! second instead of for every line.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Held bytes are written once there are this many, even before the thread waits.
pub const HOLD_LIMIT: usize = 64 * 1024;

/// Lines in the order they were made, not yet written.
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

thread_local! {
    static HOLDS: Cell<bool> = const { Cell::new(false) };
}

/// Lines made on this thread from now on are held until [`flush`] (or until
/// [`HOLD_LIMIT`] bytes are held, or a line from another thread is written), as
/// long as the returned guard lives: dropping it writes them and ends the holding.
#[must_use = "lines are held only while the guard lives"]
pub fn hold_on_this_thread() -> Holding {
    HOLDS.with(|h| h.set(true));
    Holding(std::marker::PhantomData)
}

/// Lines of this thread are held while it lives (see [`hold_on_this_thread`]).
pub struct Holding(std::marker::PhantomData<*const ()>);

impl Drop for Holding {
    fn drop(&mut self) {
        HOLDS.with(|h| h.set(false));
        flush();
    }
}

/// Writes every held line to stderr.
pub fn flush() {
    PENDING_SINK.flush_to(&mut io::stderr().lock());
}

/// What the log's `tracing-subscriber` layer writes through (`.with_writer(|| Line)`):
/// one whole line per `write_all`.
pub struct Line;

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let hold = HOLDS.with(Cell::get);
        PENDING_SINK.line(buf, hold, &mut io::stderr().lock());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The shared buffer and how it is written (a type of its own so that tests can
/// give it another sink).
struct Pending<'a>(&'a Mutex<Vec<u8>>);

static PENDING_SINK: Pending<'static> = Pending(&PENDING);

impl Pending<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while the lock was held left whole lines (or a part of one) in
        // the buffer: still worth writing.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `line`; writes the buffer to `sink` unless `hold` and it is small.
    /// The lock is held while writing, so lines cannot overtake each other.
    fn line(&self, line: &[u8], hold: bool, sink: &mut impl Write) {
        let mut pending = self.lock();
        pending.extend_from_slice(line);
        if !hold || pending.len() >= HOLD_LIMIT {
            write_out(&mut pending, sink);
        }
    }

    /// Writes the buffer to `sink`.
    fn flush_to(&self, sink: &mut impl Write) {
        let mut pending = self.lock();
        if !pending.is_empty() {
            write_out(&mut pending, sink);
        }
    }
}

fn write_out(pending: &mut Vec<u8>, sink: &mut impl Write) {
    // As `tracing-subscriber` does with its writer's errors: a log that cannot be
    // written is dropped, it does not stop agentd.
    let _ = sink.write_all(pending);
    pending.clear();
    if pending.capacity() > HOLD_LIMIT {
        pending.shrink_to(HOLD_LIMIT);
    }
}

/// The log lines' clock: UTC with microseconds, as `tracing-subscriber`'s default.
pub struct Clock;

thread_local! {
    /// The second last formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS.`.
    static SECOND: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
}

impl tracing_subscriber::fmt::time::FormatTime for Clock {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> fmt::Result {
        let now = SystemTime::now();
        let mut buf = [0u8; 27];
        match stamp(now, &mut buf) {
            Some(text) => w.write_str(text),
            None => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

/// `t` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` in `buf`; `None` before 1970 or after 9999
/// (left to `tracing-subscriber`'s own clock).
fn stamp(t: SystemTime, buf: &mut [u8; 27]) -> Option<&str> {
    let since = t.duration_since(UNIX_EPOCH).ok()?;
    let secs = since.as_secs();
    if secs >= 253_402_300_800 {
        return None;
    }
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, date_and_time(secs));
        }
        buf[..20].copy_from_slice(&cached.1);
    });
    let mut micros = since.subsec_micros();
    for i in (20..26).rev() {
        buf[i] = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    buf[26] = b'Z';
    std::str::from_utf8(buf).ok()
}

/// `YYYY-MM-DDTHH:MM:SS.` of `secs` since the epoch (UTC, proleptic Gregorian).
fn date_and_time(secs: u64) -> [u8; 20] {
    let days = (secs / 86_400) as i64;
    let of_day = secs % 86_400;
    // Days to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [0u8; 20];
    let mut put = |at: usize, value: u64, width: usize| {
        let mut v = value;
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year as u64, 4);
    put(5, month as u64, 2);
    put(8, day as u64, 2);
    put(11, of_day / 3600, 2);
    put(14, of_day / 60 % 60, 2);
    put(17, of_day % 60, 2);
    out[4] = b'-';
    out[7] = b'-';
    out[10] = b'T';
    out[13] = b':';
    out[16] = b':';
    out[19] = b'.';
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_match_the_rfc3339_form_with_microseconds() {
        let mut buf = [0u8; 27];
        // Every day of 1970..2100 at a varying time of day (leap years, centuries,
        // month ends), then the same second twice (the cached date).
        let mut secs = 0u64;
        while secs < 4_102_444_800 {
            let micros = (secs * 7919) % 1_000_000;
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
            let want = humantime::format_rfc3339_micros(t).to_string();
            assert_eq!(stamp(t, &mut buf), Some(want.as_str()));
            let later = t + Duration::from_micros(1_000_000 - micros - 1);
            let want = humantime::format_rfc3339_micros(later).to_string();
            assert_eq!(stamp(later, &mut buf), Some(want.as_str()));
            secs += 86_400 + 3_607;
        }
        let edge = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
        assert_eq!(stamp(edge, &mut buf), Some("9999-12-31T23:59:59.000000Z"));
        assert_eq!(
            stamp(edge + Duration::from_secs(1), &mut buf),
            None,
            "year 10000 is left to tracing-subscriber"
        );
        assert_eq!(stamp(UNIX_EPOCH - Duration::from_secs(1), &mut buf), None);
    }

    #[test]
    fn the_clock_writes_what_tracing_subscribers_default_clock_writes() {
        use tracing_subscriber::fmt::format::Writer;
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime as Default};
        // Both read the clock: retried if a second boundary fell between them.
        for _ in 0..100 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            Clock.format_time(&mut Writer::new(&mut ours)).unwrap();
            Default.format_time(&mut Writer::new(&mut theirs)).unwrap();
            assert_eq!(ours.len(), theirs.len(), "{ours} vs {theirs}");
            if ours[..19] == theirs[..19] {
                assert_eq!(ours.as_bytes()[19], b'.');
                assert!(ours.ends_with('Z') && theirs.ends_with('Z'));
                return;
            }
        }
        panic!("the two clocks never agreed on the second");
    }

    #[test]
    fn held_lines_wait_for_a_flush_and_keep_their_order_with_other_threads_lines() {
        static BUF: Mutex<Vec<u8>> = Mutex::new(Vec::new());
        let pending = Pending(&BUF);
        let mut sink = Vec::new();
        pending.line(b"loop 1\n", true, &mut sink);
        pending.line(b"loop 2\n", true, &mut sink);
        assert!(sink.is_empty(), "held until the flush");
        // A line from another thread writes the held ones first.
        pending.line(b"store 1\n", false, &mut sink);
        assert_eq!(sink, b"loop 1\nloop 2\nstore 1\n");
        pending.line(b"loop 3\n", true, &mut sink);
        assert_eq!(sink, b"loop 1\nloop 2\nstore 1\n");
        pending.flush_to(&mut sink);
        assert_eq!(sink, b"loop 1\nloop 2\nstore 1\nloop 3\n");
        pending.flush_to(&mut sink);
        assert_eq!(sink, b"loop 1\nloop 2\nstore 1\nloop 3\n", "nothing twice");
        // A step that logs a lot does not hold more than the limit.
        let mut sink = Vec::new();
        let line = [b'x'; 1000];
        let under = HOLD_LIMIT / line.len();
        for _ in 0..under {
            pending.line(&line, true, &mut sink);
        }
        assert!(sink.is_empty(), "{} bytes are held", under * line.len());
        pending.line(&line, true, &mut sink);
        assert_eq!(sink.len(), (under + 1) * line.len(), "written at the limit");
        pending.line(&line, true, &mut sink);
        assert_eq!(sink.len(), (under + 1) * line.len());
        pending.flush_to(&mut sink);
        assert_eq!(sink.len(), (under + 2) * line.len());
    }
}
