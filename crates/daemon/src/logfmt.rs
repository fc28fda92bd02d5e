//! Plain Display forms for log fields: agentd's log lines never show Rust Debug
//! dumps (`Some(…)`, `Done { … }`), only words, numbers and quoted texts. And the
//! lines' clock ([`Clock`]).

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_core::{Ending, StopStep, Task, TaskState};

/// A text (a task text, a message) in double quotes, with quotes, backslashes and
/// control characters escaped, so it stays on its log line.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_debug())
    }
}

/// A field value given by a client or an agent (a session name, an agent's name):
/// as is when it is one plain word, else [`Quoted`], so that a space, a quote or a
/// newline in it can neither split its log line nor pass for another field.
pub struct Word<'a>(pub &'a str);

impl fmt::Display for Word<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '\\' | '='));
        if plain {
            f.write_str(self.0)
        } else {
            Quoted(self.0).fmt(f)
        }
    }
}

/// Pids as `12,34,56`.
pub struct Pids<'a>(pub &'a [u32]);

impl fmt::Display for Pids<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pid) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{pid}")?;
        }
        Ok(())
    }
}

/// A duration in seconds: `0.04s`, `1.5s`, `10s` (millisecond precision).
pub struct Secs(pub Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let (whole, frac) = (ms / 1000, ms % 1000);
        if frac == 0 {
            write!(f, "{whole}s")
        } else {
            let frac = format!("{frac:03}");
            write!(f, "{whole}.{}s", frac.trim_end_matches('0'))
        }
    }
}

/// A stop step as a word: `cooperative_cancel`, `sigterm`, `sigkill`.
pub fn step(step: StopStep) -> &'static str {
    match step {
        StopStep::CooperativeCancel => "cooperative_cancel",
        StopStep::Sigterm => "sigterm",
        StopStep::Sigkill => "sigkill",
    }
}

/// Logs a finished task as one line of plain fields:
/// `task finished task_id=… session=… state=cancelled by=cooperative_cancel after=0.04s signal=15`.
pub fn task_finished(task: &Task) {
    let TaskState::Done { ending, exit } = &task.state else {
        tracing::info!(task_id = %task.id, session = %Word(&task.session), "task finished");
        return;
    };
    let (state, by, after, reason, into) = match ending {
        Ending::Succeeded => ("succeeded", None, None, None, None),
        Ending::Failed { reason } => ("failed", None, None, Some(reason.as_str()), None),
        Ending::Cancelled { by, after } => ("cancelled", *by, Some(*after), None, None),
        Ending::Interrupted { by, after, why } => (
            "interrupted",
            *by,
            Some(*after),
            Some(crate::views::interruption_reason(*why)),
            None,
        ),
        Ending::Expired => ("expired", None, None, None, None),
        Ending::Dropped => ("dropped", None, None, None, None),
        Ending::Merged { into } => ("merged", None, None, None, Some(*into)),
    };
    tracing::info!(
        task_id = %task.id,
        session = %Word(&task.session),
        state = %state,
        by = by.map(|s| display(step(s))),
        after = after.map(|d| display(Secs(d))),
        reason = reason.map(|r| display(Quoted(r))),
        into = into.map(display),
        exit_code = exit.and_then(|e| e.code),
        signal = exit.and_then(|e| e.signal),
        "task finished"
    );
}

/// The log lines' clock: UTC with microseconds (`2026-12-01T16:21:44.352364Z`), as
/// `tracing-subscriber`'s default clock writes it, but the date and time of day are
/// formatted once per second instead of for every line (that was about 0.8% of the
/// loop's CPU per trivial task, which logs two lines; now 0.3%).
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

    #[test]
    fn forms() {
        assert_eq!(Secs(Duration::from_millis(40)).to_string(), "0.04s");
        assert_eq!(Secs(Duration::from_millis(1500)).to_string(), "1.5s");
        assert_eq!(Secs(Duration::from_secs(10)).to_string(), "10s");
        assert_eq!(Secs(Duration::from_micros(10)).to_string(), "0s");
        assert_eq!(Pids(&[1, 22, 333]).to_string(), "1,22,333");
        assert_eq!(Pids(&[]).to_string(), "");
        assert_eq!(Word("chat-1:a/b").to_string(), "chat-1:a/b");
        assert_eq!(Word("two words").to_string(), r#""two words""#);
        assert_eq!(Word("a=b").to_string(), r#""a=b""#);
        assert_eq!(Word("").to_string(), r#""""#);
        assert_eq!(Word("x\ny").to_string(), r#""x\ny""#);
        assert_eq!(Quoted("a \"b\"\nc").to_string(), r#""a \"b\"\nc""#);
    }

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
}
