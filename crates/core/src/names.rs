//! The spelling of every enum that users and clients name: one table per enum.
//!
//! Each table maps every variant to its one spelling, in the order help texts list
//! them. serde (agentd-proto), agentctl's flags, the chat parser, the config file and
//! every "expected one of …" list read these tables; a spelling is matched in any
//! case everywhere. Core stays serde-free: agentd-proto serializes through them.

use crate::queue::{DropPolicy, Mode, Priority};
use crate::task::StopStep;

/// An enum with a spelling table.
pub trait Named: Copy + Eq + Sized + 'static {
    /// What a value is called in an error ("queue mode").
    const WHAT: &'static str;
    /// Every variant and its spelling, in the order help texts list them.
    const NAMES: &'static [(Self, &'static str)];

    /// The variant's spelling.
    fn name(self) -> &'static str {
        // Every variant is in its table (the `every_variant_has_one_spelling` test);
        // "?" is never shown.
        Self::NAMES
            .iter()
            .find(|(v, _)| *v == self)
            .map_or("?", |(_, n)| n)
    }

    /// The variant spelled `word`, in any case.
    fn from_name(word: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(word.trim()))
            .map(|(v, _)| *v)
    }

    /// Every variant, in table order.
    fn all() -> impl Iterator<Item = Self> {
        Self::NAMES.iter().map(|(v, _)| *v)
    }

    /// The spellings joined by `separator`: `old|new|summarize`.
    fn joined(separator: &str) -> String {
        Self::NAMES
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(separator)
    }

    /// `collect, followup, steer, steer-backlog, interrupt`.
    fn one_of() -> String {
        Self::joined(", ")
    }

    /// The error for a word that names no variant:
    /// `unknown drop policy "newest" (expected one of old, new, summarize)`.
    fn unknown(word: &str) -> String {
        format!(
            "unknown {} {word:?} (expected one of {})",
            Self::WHAT,
            Self::one_of()
        )
    }

    /// Parses `word`, or says what was expected.
    fn parse_name(word: &str) -> Result<Self, String> {
        Self::from_name(word).ok_or_else(|| Self::unknown(word))
    }
}

impl Named for Mode {
    const WHAT: &'static str = "queue mode";
    const NAMES: &'static [(Mode, &'static str)] = &[
        (Mode::Collect, "collect"),
        (Mode::Followup, "followup"),
        (Mode::Steer, "steer"),
        (Mode::SteerBacklog, "steer-backlog"),
        (Mode::Interrupt, "interrupt"),
    ];
}

impl Named for DropPolicy {
    const WHAT: &'static str = "drop policy";
    const NAMES: &'static [(DropPolicy, &'static str)] = &[
        (DropPolicy::Old, "old"),
        (DropPolicy::New, "new"),
        (DropPolicy::Summarize, "summarize"),
    ];
}

impl Named for Priority {
    const WHAT: &'static str = "priority";
    const NAMES: &'static [(Priority, &'static str)] = &[
        (Priority::Interactive, "interactive"),
        (Priority::Background, "background"),
    ];
}

impl Named for StopStep {
    const WHAT: &'static str = "stop step";
    const NAMES: &'static [(StopStep, &'static str)] = &[
        (StopStep::CooperativeCancel, "cooperative_cancel"),
        (StopStep::Sigterm, "sigterm"),
        (StopStep::Sigkill, "sigkill"),
    ];
}

/// Checks a table: every variant listed by `every` (an exhaustive list the caller
/// keeps, e.g. from a `match`) has exactly one spelling, spellings are unique in any
/// case, and each spelling parses back to its variant in any case.
pub fn check_table<T: Named + std::fmt::Debug>(every: &[T]) -> Result<(), String> {
    for v in every {
        let n = T::NAMES.iter().filter(|(w, _)| w == v).count();
        if n != 1 {
            return Err(format!("{} {v:?} has {n} spellings", T::WHAT));
        }
    }
    if T::NAMES.len() != every.len() {
        return Err(format!("{} table lists unknown variants", T::WHAT));
    }
    for (v, name) in T::NAMES {
        for word in [name.to_string(), name.to_uppercase(), capitalised(name)] {
            if T::from_name(&word) != Some(*v) {
                return Err(format!("{} {word:?} does not parse to {v:?}", T::WHAT));
            }
        }
        if T::NAMES
            .iter()
            .filter(|(_, other)| other.eq_ignore_ascii_case(name))
            .count()
            != 1
        {
            return Err(format!("{} spelling {name:?} is ambiguous", T::WHAT));
        }
    }
    Ok(())
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Adding a variant breaks these matches, which leads here to add its spelling.
    fn every_mode() -> Vec<Mode> {
        let all = [
            Mode::Collect,
            Mode::Followup,
            Mode::Steer,
            Mode::SteerBacklog,
            Mode::Interrupt,
        ];
        for m in all {
            match m {
                Mode::Collect
                | Mode::Followup
                | Mode::Steer
                | Mode::SteerBacklog
                | Mode::Interrupt => {}
            }
        }
        all.to_vec()
    }

    fn every_drop() -> Vec<DropPolicy> {
        let all = [DropPolicy::Old, DropPolicy::New, DropPolicy::Summarize];
        for d in all {
            match d {
                DropPolicy::Old | DropPolicy::New | DropPolicy::Summarize => {}
            }
        }
        all.to_vec()
    }

    fn every_priority() -> Vec<Priority> {
        let all = [Priority::Interactive, Priority::Background];
        for p in all {
            match p {
                Priority::Interactive | Priority::Background => {}
            }
        }
        all.to_vec()
    }

    fn every_step() -> Vec<StopStep> {
        let all = [
            StopStep::CooperativeCancel,
            StopStep::Sigterm,
            StopStep::Sigkill,
        ];
        for s in all {
            match s {
                StopStep::CooperativeCancel | StopStep::Sigterm | StopStep::Sigkill => {}
            }
        }
        all.to_vec()
    }

    #[test]
    fn every_variant_has_one_spelling() {
        check_table(&every_mode()).unwrap();
        check_table(&every_drop()).unwrap();
        check_table(&every_priority()).unwrap();
        check_table(&every_step()).unwrap();
        assert_eq!(Mode::SteerBacklog.name(), "steer-backlog");
        assert_eq!(Mode::from_name(" Steer-BACKLOG "), Some(Mode::SteerBacklog));
        assert_eq!(
            DropPolicy::parse_name("newest"),
            Err("unknown drop policy \"newest\" (expected one of old, new, summarize)".into())
        );
        assert_eq!(DropPolicy::joined("|"), "old|new|summarize");
    }

    #[test]
    fn help_lists_every_spelling() {
        let help = crate::HELP_TEXT;
        assert!(
            help.contains(&format!("drop:{}", DropPolicy::joined("|"))),
            "{help}"
        );
        assert!(
            help.contains(&format!("(modes: {})", Mode::one_of())),
            "{help}"
        );
    }
}
