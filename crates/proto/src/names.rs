//! serde through the spelling tables of [`agentd_core::Named`]: the queue modes, drop
//! policies, priorities and stop steps on the wire are core's own enums, spelled by
//! their one table and read back in any case.
//!
//! Use as `#[serde(with = "crate::names")]` on a field of such a type, and
//! `#[serde(with = "crate::names::option")]` on an `Option` of one.

use agentd_core::Named;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<T: Named, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(value.name())
}

pub fn deserialize<'de, T: Named, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
    let word = String::deserialize(deserializer)?;
    T::parse_name(&word).map_err(D::Error::custom)
}

/// The same for an `Option` (`null` or absent is `None`).
pub mod option {
    use super::*;

    pub fn serialize<T: Named, S: Serializer>(
        value: &Option<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => serializer.serialize_some(v.name()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Named, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<T>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            Some(word) => T::parse_name(&word).map(Some).map_err(D::Error::custom),
            None => Ok(None),
        }
    }
}
