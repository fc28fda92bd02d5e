//! Liveness: when a running agent counts as hung, and when a task has run too long.
//!
//! The daemon owns the clocks; this module only decides. For each live agent the
//! daemon knows how long ago it last heard from it (any frame counts: heartbeat,
//! progress, a steer answer) and how long ago the task started, and asks
//! [`Liveness::verdict`] at the time the previous verdict said to look again. One
//! timer per agent suffices: hearing from an agent only moves its "last heard"
//! instant, it never re-arms anything.

use std::time::Duration;

/// The limits, from the daemon's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// An agent silent for this long is hung (`None`: never).
    pub hung_after: Option<Duration>,
    /// A task running for this long is timed out (`None`: no limit).
    pub task_timeout: Option<Duration>,
}

/// What [`Liveness::verdict`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do; look again after `recheck_in` (`None`: no limit applies).
    Alive { recheck_in: Option<Duration> },
    /// Silent for at least `hung_after`: stop it with [`crate::StopCause::Hung`].
    Hung,
    /// Ran for at least `task_timeout`: stop it with [`crate::StopCause::TimedOut`].
    /// Wins over `Hung` when both hold (it is the stronger cause).
    TimedOut,
}

/// How many heartbeat intervals of silence make an agent hung by default.
pub const DEFAULT_HUNG_INTERVALS: u32 = 5;

impl Liveness {
    /// The verdict for an agent last heard from `since_heard` ago, whose task started
    /// `since_start` ago. `since_heard` is `None` while the handshake is under way
    /// (the handshake timeout governs then; the run-time limit still counts).
    pub fn verdict(&self, since_heard: Option<Duration>, since_start: Duration) -> Verdict {
        if self.task_timeout.is_some_and(|limit| since_start >= limit) {
            return Verdict::TimedOut;
        }
        if let (Some(limit), Some(silent)) = (self.hung_after, since_heard) {
            if silent >= limit {
                return Verdict::Hung;
            }
        }
        let hung_in = match (self.hung_after, since_heard) {
            (Some(limit), Some(silent)) => Some(limit - silent),
            _ => None,
        };
        let timeout_in = self.task_timeout.map(|limit| limit - since_start);
        let recheck_in = match (hung_in, timeout_in) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // While handshaking with no run-time limit, look again once the handshake may
        // have completed: the daemon re-asks after it anyway, so any finite value is
        // correct; `hung_after` itself is the natural one.
        let recheck_in = recheck_in.or(match since_heard {
            None => self.hung_after,
            Some(_) => None,
        });
        Verdict::Alive { recheck_in }
    }

    /// The default silence limit for a heartbeat interval.
    pub fn default_hung_after(heartbeat: Duration) -> Duration {
        heartbeat.saturating_mul(DEFAULT_HUNG_INTERVALS)
    }

    /// Whether `hung_after` leaves an agent that heartbeats every `heartbeat` room to
    /// be late: it must be more than one interval, or every agent would be hung.
    pub fn check_hung_after(heartbeat: Duration, hung_after: Duration) -> Result<(), String> {
        if hung_after <= heartbeat {
            Err(format!(
                "the silence limit ({hung_after:?}) must be longer than the heartbeat interval ({heartbeat:?})"
            ))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn both() -> Liveness {
        Liveness {
            hung_after: Some(S(10)),
            task_timeout: Some(S(60)),
        }
    }

    #[test]
    fn silent_past_the_limit_is_hung() {
        assert_eq!(both().verdict(Some(S(10)), S(20)), Verdict::Hung);
        assert_eq!(
            both().verdict(Some(S(9)), S(20)),
            Verdict::Alive {
                recheck_in: Some(S(1))
            }
        );
    }

    #[test]
    fn the_run_time_limit_wins_over_silence() {
        assert_eq!(both().verdict(Some(S(30)), S(60)), Verdict::TimedOut);
        assert_eq!(both().verdict(None, S(61)), Verdict::TimedOut);
    }

    #[test]
    fn a_handshaking_agent_is_never_hung() {
        assert!(matches!(
            both().verdict(None, S(59)),
            Verdict::Alive {
                recheck_in: Some(_)
            }
        ));
        let no_limit = Liveness {
            hung_after: Some(S(10)),
            task_timeout: None,
        };
        assert_eq!(
            no_limit.verdict(None, S(1000)),
            Verdict::Alive {
                recheck_in: Some(S(10))
            }
        );
    }

    #[test]
    fn without_limits_nothing_is_ever_decided() {
        let none = Liveness {
            hung_after: None,
            task_timeout: None,
        };
        assert_eq!(
            none.verdict(Some(S(1_000_000)), S(1_000_000)),
            Verdict::Alive { recheck_in: None }
        );
    }

    #[test]
    fn the_limit_must_exceed_the_interval() {
        assert!(Liveness::check_hung_after(S(2), S(2)).is_err());
        assert!(Liveness::check_hung_after(S(2), S(3)).is_ok());
        assert_eq!(Liveness::default_hung_after(S(2)), S(10));
    }

    fn limit() -> impl Strategy<Value = Option<Duration>> {
        prop::option::of((1u64..100_000).prop_map(Duration::from_millis))
    }

    proptest! {
        /// Hung exactly when silent for the limit (and not timed out); timed out exactly
        /// when past the run-time limit.
        #[test]
        fn verdicts_follow_the_limits(
            hung_after in limit(),
            task_timeout in limit(),
            heard in prop::option::of(0u64..200_000),
            start in 0u64..200_000,
        ) {
            let l = Liveness { hung_after, task_timeout };
            let heard = heard.map(Duration::from_millis);
            let start = Duration::from_millis(start);
            let timed_out = task_timeout.is_some_and(|t| start >= t);
            let hung = matches!((hung_after, heard), (Some(h), Some(s)) if s >= h);
            let expected = if timed_out {
                Verdict::TimedOut
            } else if hung {
                Verdict::Hung
            } else {
                match l.verdict(heard, start) {
                    Verdict::Alive { recheck_in } => Verdict::Alive { recheck_in },
                    other => return Err(TestCaseError::fail(format!("{other:?}"))),
                }
            };
            prop_assert_eq!(l.verdict(heard, start), expected);
        }

        /// Looking again when told to, without hearing from the agent, never skips past a
        /// verdict: the recheck is positive, and after it the agent is hung or timed out
        /// or still has time left on each limit that applies.
        #[test]
        fn rechecking_when_told_reaches_the_verdict_in_time(
            hung_after in limit(),
            task_timeout in limit(),
            heard in 0u64..100_000,
            start in 0u64..100_000,
        ) {
            let l = Liveness { hung_after, task_timeout };
            let mut heard = Duration::from_millis(heard);
            let mut start = Duration::from_millis(start).max(heard);
            let mut steps = 0;
            loop {
                match l.verdict(Some(heard), start) {
                    Verdict::Alive { recheck_in: None } => {
                        prop_assert!(hung_after.is_none() && task_timeout.is_none());
                        break;
                    }
                    Verdict::Alive { recheck_in: Some(dt) } => {
                        prop_assert!(dt > Duration::ZERO);
                        heard += dt;
                        start += dt;
                        steps += 1;
                        // Two limits: at most one recheck for each before a verdict.
                        prop_assert!(steps <= 2);
                    }
                    Verdict::Hung => {
                        let h = hung_after.unwrap();
                        // Not late: found hung exactly at the limit, not after it.
                        prop_assert!(steps == 0 || heard == h);
                        break;
                    }
                    Verdict::TimedOut => {
                        let t = task_timeout.unwrap();
                        prop_assert!(steps == 0 || start == t);
                        break;
                    }
                }
            }
        }
    }
}
