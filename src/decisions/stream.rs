//! The LAPI's stream answer (`{"new": [...], "deleted": [...]}`), read within limits: each
//! list is counted entry by entry while it is parsed, and the parse stops at the first entry
//! past its limit, so an answer of millions of tiny entries costs no more memory than the
//! limit allows (a derived `Deserialize` would hold every entry before anyone could count
//! them). A snapshot's `deleted` list is read past without being kept.

use std::cell::Cell;

use serde::de::{DeserializeSeed, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::crowdsec::LapiDecision;

/// A stream response (either list may be `null`, `[]` or absent on the wire: empty here).
#[derive(Debug, Default)]
pub struct StreamResponse {
    pub new: Vec<LapiDecision>,
    /// Empty when read for a snapshot (see `Limits::deleted`).
    pub deleted: Vec<LapiDecision>,
}

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
    type Value = Vec<LapiDecision>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for List<'_> {
    type Value = Vec<LapiDecision>;

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
        while let Some(entry) = seq.next_element()? {
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
