//! A small lenient JSON reader: one pass over an item's bytes into a [`Json`] tree, from
//! which both the typed fields (with the paths of those that do not fit) and the canonical
//! form behind the event id are computed. Each item is parsed once.
//!
//! Where it differs from serde_json (SPEC §2.3):
//! - a lone surrogate escape (`"\ud800"`) is read as U+FFFD instead of failing the item;
//!   the string remembers its exact code units, so the canonical form keeps it apart from a
//!   real U+FFFD;
//! - a duplicated object key is allowed; the last one wins, as in JavaScript's `JSON.parse`;
//! - a number is kept as its literal, so nothing is lost to `f64` before a field asks for it.
//!
//! It recurses once per nesting level and refuses more than `max_depth` levels, so its
//! stack use is bounded; everything else is a linear scan. It never panics.

use std::{borrow::Cow, cmp::Ordering};

/// A parsed JSON value borrowing from the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    /// The literal as sent, checked against JSON's number grammar.
    Number(&'a str),
    String(Text<'a>),
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// A decoded JSON string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<'a> {
    /// The decoded value; each lone surrogate reads as U+FFFD.
    pub value: Cow<'a, str>,
    /// Only for a string with lone surrogates: its canonical literal body (see
    /// [`write_string`]), in which they appear as `\udxxx`. Keeps it distinct from the same
    /// text with a real U+FFFD, for identity and for telling keys apart. Rare, so behind a
    /// thin pointer: it keeps every [`Json`] node at 32 bytes rather than 40.
    exact: Option<Box<Exact>>,
}

/// The canonical literal body of a string with lone surrogates.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Exact(String);

impl<'a> Text<'a> {
    /// A string without lone surrogates.
    pub(crate) fn plain(value: &'a str) -> Self {
        Self {
            value: Cow::Borrowed(value),
            exact: None,
        }
    }

    /// Whether the string held a lone surrogate escape (its value has U+FFFD there).
    pub fn has_lone_surrogates(&self) -> bool {
        self.exact.is_some()
    }

    fn cmp_key(&self, other: &Self) -> Ordering {
        self.value
            .as_bytes()
            .cmp(other.value.as_bytes())
            .then_with(|| self.exact.cmp(&other.exact))
    }
}

/// An object's members sorted by key (UTF-8 bytes of the decoded key, i.e. code point
/// order), one per key: the last one sent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object<'a> {
    /// A boxed slice, not a `Vec`, so that with the key bits every node stays 32 bytes.
    members: Box<[(Text<'a>, Json<'a>)]>,
    /// One bit per member key ([`key_bit`]): a key whose bit is clear is not a member.
    /// The readers of Spike's shapes ask for about 40 keys of an item that has 10, so most
    /// lookups are misses, and this answers them without a search.
    keys: u64,
}

/// The bit of `key` in [`Object::keys`]: from its length and its first and last bytes,
/// which tell Spike's field names apart well (a shared bit only costs a search).
fn key_bit(key: &[u8]) -> u64 {
    let (first, last) = (key.first().copied(), key.last().copied());
    let mixed =
        key.len() * 31 + usize::from(first.unwrap_or(0)) * 7 + usize::from(last.unwrap_or(0));
    1 << (mixed % 64)
}

impl<'a> Object<'a> {
    /// The member named `key` (a key with lone surrogates never matches a plain `&str`).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        if self.keys & key_bit(key.as_bytes()) == 0 {
            return None;
        }
        self.members
            .binary_search_by(|(k, _)| {
                k.value
                    .as_bytes()
                    .cmp(key.as_bytes())
                    .then(k.exact.is_some().cmp(&false))
            })
            .ok()
            .map(|at| &self.members[at].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Text<'a>, &Json<'a>)> {
        self.members.iter().map(|(k, v)| (k, v))
    }

    fn from_members(mut members: Vec<(Text<'a>, Json<'a>)>) -> Self {
        // Reversed, a stable sort puts the last-sent member first among equal keys, and
        // dedup keeps the first of each run.
        members.reverse();
        members.sort_by(|a, b| a.0.cmp_key(&b.0));
        members.dedup_by(|later, kept| later.0.cmp_key(&kept.0).is_eq());
        let keys = members
            .iter()
            .fold(0, |keys, (key, _)| keys | key_bit(key.value.as_bytes()));
        Self {
            members: members.into_boxed_slice(),
            keys,
        }
    }
}

/// Why bytes could not be read. Carries the byte offset only: never payload content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("not valid JSON (at byte {0})")]
    Malformed(usize),
}

/// Parses one JSON document (surrounding whitespace allowed) nested at most `max_depth`.
pub fn parse(text: &str, max_depth: usize) -> Result<Json<'_>, ReadError> {
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        at: 0,
        max_depth,
    };
    let value = parser.value(0)?;
    parser.whitespace();
    if parser.at != parser.bytes.len() {
        return Err(ReadError::Malformed(parser.at));
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    max_depth: usize,
}

impl<'a> Parser<'a> {
    fn malformed<T>(&self) -> Result<T, ReadError> {
        Err(ReadError::Malformed(self.at))
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        self.whitespace();
        let found = self.bytes.get(self.at) == Some(&byte);
        if found {
            self.at += 1;
        }
        found
    }

    fn value(&mut self, depth: usize) -> Result<Json<'a>, ReadError> {
        self.whitespace();
        match self.bytes.get(self.at) {
            Some(b'{' | b'[') if depth >= self.max_depth => Err(ReadError::TooDeep(self.max_depth)),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Json::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => self.keyword(),
        }
    }

    fn keyword(&mut self) -> Result<Json<'a>, ReadError> {
        let rest = &self.bytes[self.at..];
        let (value, len) = if rest.starts_with(b"null") {
            (Json::Null, 4)
        } else if rest.starts_with(b"true") {
            (Json::Bool(true), 4)
        } else if rest.starts_with(b"false") {
            (Json::Bool(false), 5)
        } else {
            return self.malformed();
        };
        self.at += len;
        Ok(value)
    }

    fn object(&mut self, depth: usize) -> Result<Json<'a>, ReadError> {
        self.at += 1; // '{'
        let mut members = Vec::new();
        if !self.eat(b'}') {
            loop {
                self.whitespace();
                if self.bytes.get(self.at) != Some(&b'"') {
                    return self.malformed();
                }
                let key = self.string()?;
                if !self.eat(b':') {
                    return self.malformed();
                }
                members.push((key, self.value(depth)?));
                if self.eat(b'}') {
                    break;
                }
                if !self.eat(b',') {
                    return self.malformed();
                }
            }
        }
        Ok(Json::Object(Object::from_members(members)))
    }

    fn array(&mut self, depth: usize) -> Result<Json<'a>, ReadError> {
        self.at += 1; // '['
        let mut items = Vec::new();
        if !self.eat(b']') {
            loop {
                items.push(self.value(depth)?);
                if self.eat(b']') {
                    break;
                }
                if !self.eat(b',') {
                    return self.malformed();
                }
            }
        }
        Ok(Json::Array(items))
    }

    fn number(&mut self) -> Result<Json<'a>, ReadError> {
        let start = self.at;
        let digits = |p: &mut Self| {
            let from = p.at;
            while p.bytes.get(p.at).is_some_and(u8::is_ascii_digit) {
                p.at += 1;
            }
            p.at - from
        };
        if self.bytes[self.at] == b'-' {
            self.at += 1;
        }
        match self.bytes.get(self.at) {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return self.malformed(),
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if digits(self) == 0 {
                return self.malformed();
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return self.malformed();
            }
        }
        Ok(Json::Number(&self.text[start..self.at]))
    }

    /// A string starting at the opening quote. Borrowed when it has no escapes.
    fn string(&mut self) -> Result<Text<'a>, ReadError> {
        self.at += 1; // '"'
        let start = self.at;
        let mut escaped = false;
        loop {
            match self.bytes.get(self.at) {
                None => return self.malformed(),
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    self.escape()?;
                }
                Some(0..=0x1f) => return self.malformed(),
                Some(_) => self.at += 1,
            }
        }
        let body = &self.text[start..self.at];
        self.at += 1; // '"'
        if !escaped {
            return Ok(Text {
                value: Cow::Borrowed(body),
                exact: None,
            });
        }
        let (value, lone) = unescape(body.as_bytes(), false);
        let exact = lone.then(|| Box::new(Exact(unescape(body.as_bytes(), true).0)));
        Ok(Text {
            value: Cow::Owned(value),
            exact,
        })
    }

    /// Checks one escape sequence at `self.at` (the backslash) and steps over it.
    fn escape(&mut self) -> Result<(), ReadError> {
        match self.bytes.get(self.at + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.at += 2,
            Some(b'u')
                if self
                    .bytes
                    .get(self.at + 2..self.at + 6)
                    .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) =>
            {
                self.at += 6
            }
            _ => return self.malformed(),
        }
        Ok(())
    }
}

/// Decodes a string body (between the quotes). Lenient: an invalid escape is kept as
/// sent, invalid UTF-8 reads as U+FFFD, so it can run on arbitrary bytes. A lone surrogate
/// reads as U+FFFD, or, with `exact`, as the canonical escape `\udxxx`, with every other
/// character escaped as in [`write_string`]. Also says whether there was a lone surrogate.
pub(crate) fn unescape(body: &[u8], exact: bool) -> (String, bool) {
    let mut out = String::with_capacity(body.len());
    let mut lone = false;
    let mut rest = body;
    while !rest.is_empty() {
        let plain = rest.iter().position(|&b| b == b'\\').unwrap_or(rest.len());
        let text = String::from_utf8_lossy(&rest[..plain]);
        if exact {
            escape_into(&text, &mut out);
        } else {
            out.push_str(&text);
        }
        rest = &rest[plain..];
        if rest.is_empty() {
            break;
        }
        let (decoded, used) = escape_at(rest);
        match decoded {
            Decoded::Char(c) if exact => escape_into(c.encode_utf8(&mut [0; 4]), &mut out),
            Decoded::Char(c) => out.push(c),
            Decoded::Lone(unit) => {
                lone = true;
                if exact {
                    out.push_str(&format!("\\u{unit:04x}"));
                } else {
                    out.push(char::REPLACEMENT_CHARACTER);
                }
            }
            Decoded::Invalid => out.push_str(&String::from_utf8_lossy(&rest[..used])),
        }
        rest = &rest[used..];
    }
    (out, lone)
}

enum Decoded {
    Char(char),
    Lone(u16),
    Invalid,
}

/// The escape sequence at the start of `rest` (which starts with a backslash), and how
/// many bytes it used.
fn escape_at(rest: &[u8]) -> (Decoded, usize) {
    let simple = match rest.get(1) {
        Some(b'"') => '"',
        Some(b'\\') => '\\',
        Some(b'/') => '/',
        Some(b'b') => '\u{8}',
        Some(b'f') => '\u{c}',
        Some(b'n') => '\n',
        Some(b'r') => '\r',
        Some(b't') => '\t',
        Some(b'u') => return unicode_escape(rest),
        Some(_) => return (Decoded::Invalid, 2),
        None => return (Decoded::Invalid, 1),
    };
    (Decoded::Char(simple), 2)
}

fn unicode_escape(rest: &[u8]) -> (Decoded, usize) {
    let Some(unit) = hex4(rest.get(2..6)) else {
        return (Decoded::Invalid, 2);
    };
    match unit {
        0xd800..=0xdbff => match (rest.get(6..8), hex4(rest.get(8..12))) {
            (Some(b"\\u"), Some(low @ 0xdc00..=0xdfff)) => {
                let code = 0x10000 + ((u32::from(unit) - 0xd800) << 10) + (u32::from(low) - 0xdc00);
                match char::from_u32(code) {
                    Some(c) => (Decoded::Char(c), 12),
                    None => (Decoded::Lone(unit), 6),
                }
            }
            _ => (Decoded::Lone(unit), 6),
        },
        0xdc00..=0xdfff => (Decoded::Lone(unit), 6),
        _ => match char::from_u32(u32::from(unit)) {
            Some(c) => (Decoded::Char(c), 6),
            None => (Decoded::Lone(unit), 6),
        },
    }
}

fn hex4(digits: Option<&[u8]>) -> Option<u16> {
    let digits = std::str::from_utf8(digits?).ok()?;
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(digits, 16).ok()
}

/// Escapes `text` for the canonical form: `"` and `\` with a backslash, control
/// characters as `\u00xx`, everything else as itself.
fn escape_into(text: &str, out: &mut String) {
    // Every character that needs an escape is ASCII, and no byte of a multi-byte UTF-8
    // character is below 0x80, so the text is copied in runs between escapes: one
    // `push_str` per run instead of one `push` per character (the canonical form of a bulk
    // body is most of its bytes).
    let mut run = 0;
    for (at, &byte) in text.as_bytes().iter().enumerate() {
        match byte {
            b'"' | b'\\' => {
                out.push_str(&text[run..at]);
                out.push('\\');
                out.push(char::from(byte));
            }
            0..=0x1f => {
                out.push_str(&text[run..at]);
                push_unicode_escape(byte, out);
            }
            _ => continue,
        }
        run = at + 1;
    }
    out.push_str(&text[run..]);
}

/// `\u00xx` for a control character, in lower-case hex.
fn push_unicode_escape(byte: u8, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push_str("\\u00");
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

/// Writes `text` as a canonical JSON string literal.
pub(crate) fn write_string(text: &Text<'_>, out: &mut String) {
    out.push('"');
    match &text.exact {
        Some(exact) => out.push_str(&exact.0),
        None => escape_into(&text.value, out),
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(json: &str) -> Text<'_> {
        match parse(json, 4).unwrap() {
            Json::String(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn escapes_decode_and_lone_surrogates_read_as_replacement_characters() {
        assert_eq!(text(r#""\u0041\n\/""#).value, "A\n/");
        assert_eq!(text(r#""\ud83d\ude00""#).value, "😀");
        let lone = text(r#""a\ud800b""#);
        assert_eq!(lone.value, "a\u{fffd}b");
        assert_ne!(
            lone,
            text("\"a\u{fffd}b\""),
            "kept apart from a real U+FFFD"
        );
        assert_eq!(lone, text(r#""a\uD800b""#), "same code units, same string");
        assert_eq!(text(r#""\udc00\ud800""#).value, "\u{fffd}\u{fffd}");
    }

    #[test]
    fn the_last_duplicate_key_wins() {
        let Json::Object(object) = parse(r#"{"a":1,"b":2,"a":3}"#, 4).unwrap() else {
            panic!()
        };
        assert_eq!(object.get("a"), Some(&Json::Number("3")));
        assert_eq!(object.iter().count(), 2);
    }

    #[test]
    fn numbers_are_kept_as_sent_and_checked() {
        assert_eq!(parse(" -1.5e400 ", 1), Ok(Json::Number("-1.5e400")));
        for bad in ["01", "1.", ".5", "-", "1e", "+1", "1e+", "NaN"] {
            assert!(parse(bad, 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_input_and_deep_nesting_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "{\"a\":1,}",
            "\"\\x\"",
            "\"\\u12\"",
            "nul",
            "[1 2]",
            "\"a\u{1}\"",
            "{} {}",
        ] {
            assert!(
                matches!(parse(bad, 4), Err(ReadError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(parse("[[[]]]", 3).map(|_| ()), Ok(()));
        assert_eq!(parse("[[[[]]]]", 3), Err(ReadError::TooDeep(3)));
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn nodes_stay_small() {
        // A tree costs about this much per value of the item: keep it from growing.
        assert_eq!(std::mem::size_of::<Json<'_>>(), 32);
    }

    #[test]
    fn lenient_unescape_runs_on_arbitrary_bytes() {
        assert_eq!(unescape(b"a\\q\\u12\xff\\", false).0, "a\\q\\u12\u{fffd}\\");
    }

    /// The tree as serde_json would have read it (numbers through serde_json's own parser).
    fn to_serde(json: &Json<'_>) -> serde_json::Value {
        match json {
            Json::Null => serde_json::Value::Null,
            Json::Bool(b) => (*b).into(),
            Json::Number(n) => serde_json::from_str(n).unwrap(),
            Json::String(t) => t.value.as_ref().into(),
            Json::Array(items) => items.iter().map(to_serde).collect(),
            Json::Object(o) => o
                .iter()
                .map(|(k, v)| (k.value.to_string(), to_serde(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }

    /// The canonical escaping as first written, one character at a time: the reference the
    /// run-copying [`escape_into`] must match byte for byte (event ids hash its output).
    fn escape_one_by_one(text: &str) -> String {
        let mut out = String::new();
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\0'..='\u{1f}' => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out
    }

    #[test]
    fn escaping_copies_runs_and_escapes_quotes_backslashes_and_controls() {
        let mut out = String::new();
        escape_into("a\"b\\c\u{0}\u{1f}\né\u{7f}", &mut out);
        assert_eq!(out, "a\\\"b\\\\c\\u0000\\u001f\\u000aé\u{7f}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
        ))]

        #[test]
        fn escaping_matches_the_one_by_one_reference(text in "\\PC*|[\"\\\\\u{0}-\u{1f}a-zé😀]{0,32}") {
            let mut out = String::new();
            escape_into(&text, &mut out);
            proptest::prop_assert_eq!(out, escape_one_by_one(&text));
        }

        /// The key filter never hides a member: `get` finds exactly what a scan finds.
        #[test]
        fn get_finds_what_a_scan_finds(
            keys in proptest::collection::vec("[a-z_]{0,12}|\\PC{0,4}", 0..24),
            asked in "[a-z_]{0,12}",
        ) {
            let members: Vec<String> = keys
                .iter()
                .enumerate()
                .map(|(i, key)| format!("{}:{i}", serde_json::to_string(key).unwrap()))
                .collect();
            let json = format!("{{{}}}", members.join(","));
            let Json::Object(object) = parse(&json, 4).unwrap() else { unreachable!() };
            for key in keys.iter().chain([&asked]) {
                let scanned = object.iter().find(|(k, _)| k.value == key.as_str()).map(|(_, v)| v);
                proptest::prop_assert_eq!(object.get(key), scanned, "{:?} in {}", key, json);
            }
        }

        /// Without lone surrogates or duplicate keys, this reader accepts exactly the JSON
        /// serde_json accepts (which split the body before), and reads the same values.
        #[test]
        fn agrees_with_serde_json(text in r#"[\[\]{}:,"\\ \n0-9.eE+\-a-z/]{0,24}|\{"[a-c]":[ 0-9.eE+\-\[\]",]{0,16}\}"#) {
            let ours = parse(&text, 128);
            let theirs = serde_json::from_str::<serde_json::Value>(&text);
            match (&ours, &theirs) {
                (Ok(tree), Ok(value)) => proptest::prop_assert_eq!(&to_serde(tree), value),
                (Err(_), Err(_)) => {}
                // serde_json refuses numbers beyond f64, which this reader keeps.
                (Ok(_), Err(e)) if e.to_string().contains("number out of range") => {}
                _ => proptest::prop_assert!(false, "{text:?}: {ours:?} vs {theirs:?}"),
            }
        }
    }
}
