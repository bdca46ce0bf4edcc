//! The LAPI's stream answer (`{"new": [...], "deleted": [...]}`), read within limits: each
//! list is counted entry by entry while it is parsed, and the parse stops at the first entry
//! past its limit, so an answer of millions of tiny entries costs no more memory than the
//! limit allows (a derived `Deserialize` would hold every entry before anyone could count
//! them). A snapshot's `deleted` list is read past without being kept.
//!
//! Each entry is read on its own terms: one that is not a decision (not an object, `scope`,
//! `value` or `type` missing or not a string, `simulated` not a bool, ...) becomes an
//! `Err` naming the problem, for the bridge to skip and log, and the rest of the answer is
//! read as usual. Field values of the wrong type are read past, never kept.

use std::cell::Cell;

use serde::de::{DeserializeSeed, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::crowdsec::LapiDecision;

/// A stream response (either list may be `null`, `[]` or absent on the wire: empty here).
#[derive(Debug, Default)]
pub struct StreamResponse {
    pub new: Vec<Entry>,
    /// Empty when read for a snapshot (see `Limits::deleted`).
    pub deleted: Vec<Entry>,
}

/// One list entry: a decision, or why it is not one.
pub type Entry = Result<LapiDecision, String>;

/// How many entries one stream answer may hold, counted while it is parsed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most `new` entries.
    pub new: usize,
    /// The most `deleted` entries; `None`: the list is read past and not kept.
    pub deleted: Option<usize>,
}

/// Why a stream answer was not read.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// This list (`new`, `deleted`) held more entries than its limit.
    TooMany(&'static str),
    /// Not JSON, or not the stream's shape.
    Unreadable(String),
}

/// Parses a stream body (`null` as the whole body counts as empty) within `limits`: each
/// list is counted entry by entry, and parsing stops at the first entry past its limit.
pub fn parse_stream(body: &[u8], limits: Limits) -> Result<StreamResponse, ParseError> {
    let over = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = DeserializeSeed::deserialize(
        Answer {
            limits,
            over: &over,
        },
        &mut de,
    )
    .and_then(|resp| de.end().map(|()| resp));
    parsed.map_err(|e| match over.get() {
        Some(list) => ParseError::TooMany(list),
        None => ParseError::Unreadable(e.to_string()),
    })
}

/// The stream answer's top level, read with `Limits`.
struct Answer<'a> {
    limits: Limits,
    /// Set to the list that went past its limit.
    over: &'a Cell<Option<&'static str>>,
}

/// The keys of a stream answer Wraith reads; the others are skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum AnswerField {
    New,
    Deleted,
    #[serde(other)]
    Other,
}

impl<'de> DeserializeSeed<'de> for Answer<'_> {
    type Value = StreamResponse;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<StreamResponse, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Answer<'_> {
    type Value = StreamResponse;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a decision stream object")
    }

    fn visit_unit<E>(self) -> Result<StreamResponse, E> {
        Ok(StreamResponse::default())
    }

    fn visit_none<E>(self) -> Result<StreamResponse, E> {
        Ok(StreamResponse::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<StreamResponse, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StreamResponse, A::Error> {
        let mut resp = StreamResponse::default();
        // A list given twice would be held twice at once: refused, as a derived struct would.
        let (mut new_seen, mut deleted_seen) = (false, false);
        while let Some(key) = map.next_key::<AnswerField>()? {
            match key {
                AnswerField::New if std::mem::replace(&mut new_seen, true) => {
                    return Err(A::Error::duplicate_field("new"))
                }
                AnswerField::Deleted if std::mem::replace(&mut deleted_seen, true) => {
                    return Err(A::Error::duplicate_field("deleted"))
                }
                AnswerField::New => {
                    resp.new = map.next_value_seed(List {
                        name: "new",
                        max: self.limits.new,
                        over: self.over,
                    })?
                }
                AnswerField::Deleted => match self.limits.deleted {
                    Some(max) => {
                        resp.deleted = map.next_value_seed(List {
                            name: "deleted",
                            max,
                            over: self.over,
                        })?
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                },
                AnswerField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(resp)
    }
}

/// One list of a stream answer (`null` is empty), refused at its `max + 1`th entry.
struct List<'a> {
    name: &'static str,
    max: usize,
    over: &'a Cell<Option<&'static str>>,
}

impl<'de> DeserializeSeed<'de> for List<'_> {
    type Value = Vec<Entry>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for List<'_> {
    type Value = Vec<Entry>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a list of at most {} decisions", self.max)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // No capacity from the answer's own claims: it grows with what actually arrives.
        let mut out = Vec::new();
        while let Some(Lenient(entry)) = seq.next_element()? {
            if out.len() == self.max {
                self.over.set(Some(self.name));
                return Err(Error::custom(format!(
                    "more than {} entries in {:?}",
                    self.max, self.name
                )));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

/// An `Entry` as read from the wire.
struct Lenient(Entry);

/// The keys of a decision Wraith reads; the others are skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum DecisionField {
    Id,
    Duration,
    Origin,
    Scope,
    Value,
    #[serde(rename = "type")]
    Kind,
    Scenario,
    Simulated,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Lenient, D::Error> {
        d.deserialize_any(EntryVisitor)
    }
}

struct EntryVisitor;

impl EntryVisitor {
    fn not_an_object<E>(what: &str) -> Result<Lenient, E> {
        Ok(Lenient(Err(format!("entry is {what}, not an object"))))
    }
}

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = Lenient;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a decision")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lenient, A::Error> {
        let mut id = None;
        let mut duration = None;
        let mut origin = None;
        let mut scope = None;
        let mut value = None;
        let mut kind = None;
        let mut scenario = None;
        let mut simulated = None;
        // The first field that made this entry unusable (the others are still read past).
        let mut bad: Option<String> = None;
        while let Some(field) = map.next_key::<DecisionField>()? {
            match field {
                // Anything but an integer is no id, as before ids were checked at all.
                DecisionField::Id => {
                    id = match map.next_value()? {
                        Scalar::Int(n) => Some(n),
                        _ => None,
                    }
                }
                DecisionField::Duration => {
                    text("duration", map.next_value()?, &mut duration, &mut bad)
                }
                DecisionField::Origin => text("origin", map.next_value()?, &mut origin, &mut bad),
                DecisionField::Scope => text("scope", map.next_value()?, &mut scope, &mut bad),
                DecisionField::Value => text("value", map.next_value()?, &mut value, &mut bad),
                DecisionField::Kind => text("type", map.next_value()?, &mut kind, &mut bad),
                // Only shown with the decision: of another type, it is just not shown.
                DecisionField::Scenario => {
                    scenario = match map.next_value()? {
                        Scalar::Str(s) => Some(s),
                        _ => None,
                    }
                }
                DecisionField::Simulated => match map.next_value()? {
                    Scalar::Bool(b) => simulated = Some(b),
                    Scalar::Null => simulated = None,
                    // Perhaps simulated: never enforced on a guess.
                    other => {
                        bad.get_or_insert_with(|| {
                            format!("\"simulated\" is {}, not a bool", other.what())
                        });
                    }
                },
                DecisionField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if let Some(why) = bad {
            return Ok(Lenient(Err(why)));
        }
        let (Some(scope), Some(value), Some(kind)) = (scope, value, kind) else {
            return Ok(Lenient(Err(
                "an entry needs \"scope\", \"value\" and \"type\" strings".into(),
            )));
        };
        Ok(Lenient(Ok(LapiDecision {
            id,
            duration,
            origin,
            scope,
            value,
            kind,
            scenario,
            simulated,
        })))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Self::not_an_object("a list")
    }

    fn visit_str<E>(self, _: &str) -> Result<Lenient, E> {
        Self::not_an_object("a string")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Lenient, E> {
        Self::not_an_object("a bool")
    }

    fn visit_i64<E>(self, _: i64) -> Result<Lenient, E> {
        Self::not_an_object("a number")
    }

    fn visit_u64<E>(self, _: u64) -> Result<Lenient, E> {
        Self::not_an_object("a number")
    }

    fn visit_f64<E>(self, _: f64) -> Result<Lenient, E> {
        Self::not_an_object("a number")
    }

    fn visit_unit<E>(self) -> Result<Lenient, E> {
        Self::not_an_object("null")
    }
}

/// Keeps a string field's value (`null`: none), or notes in `bad` that it is no string.
fn text(field: &str, v: Scalar, into: &mut Option<String>, bad: &mut Option<String>) {
    match v {
        Scalar::Str(s) => *into = Some(s),
        Scalar::Null => *into = None,
        other => {
            bad.get_or_insert_with(|| format!("{field:?} is {}, not a string", other.what()));
        }
    }
}

/// One field's value: what Wraith takes (a string, a bool, an integer, `null`), or the kind
/// of anything else, read past without being kept.
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Other(&'static str),
}

impl Scalar {
    /// What it is, for a message.
    fn what(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "a bool",
            Scalar::Int(_) => "a number",
            Scalar::Str(_) => "a string",
            Scalar::Other(what) => what,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Scalar, E> {
        Ok(Scalar::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Scalar, E> {
        Ok(Scalar::Int(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Scalar, E> {
        Ok(i64::try_from(n).map_or(Scalar::Other("a number"), Scalar::Int))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Scalar, E> {
        Ok(Scalar::Other("a number"))
    }

    fn visit_str<E>(self, s: &str) -> Result<Scalar, E> {
        Ok(Scalar::Str(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Scalar, E> {
        Ok(Scalar::Str(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("a list"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("an object"))
    }
}
