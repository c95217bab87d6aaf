//! An order-preserving JSON value with Python `json.loads` semantics.
//!
//! Chat templates print tool schemas and tool-call arguments with `tojson`, so
//! the key order a client sent must survive parsing exactly as it does in
//! Python (vLLM parses request bodies with `json.loads` into `dict`s, which keep
//! insertion order; a repeated key keeps its first position and its last
//! value). `serde_json::Value` sorts keys unless a crate-wide feature is on,
//! and `serde_json` reads `-0` as a float and long decimals only
//! approximately, all of which a template's `tojson` would print differently
//! from Python; so kvgate carries its own small parser and value type.

use std::fmt;

use minijinja::Value;

/// A parsed JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum JsonValue {
    Null,
    Bool(bool),
    /// Integers that fit `i64`.
    Int(i64),
    /// Integers above `i64::MAX` that fit `u64`.
    UInt(u64),
    /// Larger integers, as their decimal digits (Python integers are exact).
    BigInt(String),
    Float(f64),
    String(String),
    Array(Vec<JsonValue>),
    Object(JsonObject),
}

/// A JSON object whose entries keep the order in which keys first appeared.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsonObject {
    entries: Vec<(String, JsonValue)>,
}

impl JsonObject {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&JsonValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` like a Python `dict` does: an existing key keeps its position.
    pub fn insert(&mut self, key: String, value: JsonValue) {
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, slot)) => *slot = value,
            None => self.entries.push((key, value)),
        }
    }

    /// Removes `key`, keeping the order of the other entries.
    pub fn remove(&mut self, key: &str) -> Option<JsonValue> {
        let position = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(position).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &JsonValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl FromIterator<(String, JsonValue)> for JsonObject {
    fn from_iter<I: IntoIterator<Item = (String, JsonValue)>>(iter: I) -> Self {
        let mut object = JsonObject::new();
        for (key, value) in iter {
            object.insert(key, value);
        }
        object
    }
}

impl JsonValue {
    /// The JSON type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            JsonValue::Null => "null",
            JsonValue::Bool(_) => "a boolean",
            JsonValue::Int(_) | JsonValue::UInt(_) | JsonValue::BigInt(_) => "an integer",
            JsonValue::Float(_) => "a number",
            JsonValue::String(_) => "a string",
            JsonValue::Array(_) => "an array",
            JsonValue::Object(_) => "an object",
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, JsonValue::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            JsonValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Converts to a template value; maps keep their key order.
    pub fn to_template_value(&self) -> Value {
        match self {
            JsonValue::Null => Value::from(()),
            JsonValue::Bool(b) => Value::from(*b),
            JsonValue::Int(i) => Value::from(*i),
            JsonValue::UInt(u) => Value::from(*u),
            // Beyond 128 bits a template only gets the nearest float.
            JsonValue::BigInt(digits) => match (digits.parse::<i128>(), digits.parse::<u128>()) {
                (Ok(i), _) => Value::from(i),
                (_, Ok(u)) => Value::from(u),
                _ => Value::from(digits.parse::<f64>().unwrap_or(f64::NAN)),
            },
            JsonValue::Float(f) => Value::from(*f),
            JsonValue::String(s) => Value::from(s.as_str()),
            JsonValue::Array(items) => Value::from(
                items
                    .iter()
                    .map(JsonValue::to_template_value)
                    .collect::<Vec<_>>(),
            ),
            JsonValue::Object(object) => object.to_template_value(),
        }
    }
}

impl JsonObject {
    pub fn to_template_value(&self) -> Value {
        Value::from_pairs(
            self.entries
                .iter()
                .map(|(k, v)| (Value::from(k.as_str()), v.to_template_value())),
        )
    }
}

/// Config values (`defaultChatTemplateKwargs`) keep the key order they were written in,
/// as vLLM's flag, parsed by Python's `json.loads`, does.
impl<'de> serde::Deserialize<'de> for JsonValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

impl<'de> serde::Deserialize<'de> for JsonObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_map(ValueVisitor)
            .and_then(|value| match value {
                JsonValue::Object(object) => Ok(object),
                other => Err(serde::de::Error::custom(format!(
                    "expected a mapping, found {}",
                    other.type_name()
                ))),
            })
    }
}

struct ValueVisitor;

impl<'de> serde::de::Visitor<'de> for ValueVisitor {
    type Value = JsonValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<JsonValue, E> {
        Ok(JsonValue::Null)
    }

    fn visit_none<E>(self) -> Result<JsonValue, E> {
        Ok(JsonValue::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<JsonValue, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E>(self, b: bool) -> Result<JsonValue, E> {
        Ok(JsonValue::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<JsonValue, E> {
        Ok(JsonValue::Int(i))
    }

    fn visit_u64<E>(self, u: u64) -> Result<JsonValue, E> {
        Ok(i64::try_from(u).map_or(JsonValue::UInt(u), JsonValue::Int))
    }

    fn visit_f64<E>(self, f: f64) -> Result<JsonValue, E> {
        Ok(JsonValue::Float(f))
    }

    fn visit_str<E>(self, s: &str) -> Result<JsonValue, E> {
        Ok(JsonValue::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<JsonValue, E> {
        Ok(JsonValue::String(s))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<JsonValue, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(JsonValue::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<JsonValue, A::Error> {
        let mut object = JsonObject::new();
        while let Some((key, value)) = map.next_entry::<String, JsonValue>()? {
            object.insert(key, value);
        }
        Ok(JsonValue::Object(object))
    }
}

/// Objects with more keys than this deduplicate through a hash index instead of a scan.
const LINEAR_DEDUP_LIMIT: usize = 16;

/// Deeper nesting is refused rather than risking the stack.
const MAX_DEPTH: usize = 256;

/// Why a text is not JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError {
    pub message: String,
    /// Byte offset into the input.
    pub offset: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

impl std::error::Error for JsonError {}

/// Parses JSON text the way Python's `json.loads` does: key order kept, a
/// repeated key keeps its first position and last value, integers exact
/// (`-0` is the integer 0), floats correctly rounded, and the `NaN`,
/// `Infinity` and `-Infinity` literals accepted.
pub fn parse(text: &[u8]) -> Result<JsonValue, JsonError> {
    let text = std::str::from_utf8(text).map_err(|e| JsonError {
        message: "invalid UTF-8".into(),
        offset: e.valid_up_to(),
    })?;
    let mut parser = Parser { text, pos: 0 };
    parser.skip_whitespace();
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.pos != text.len() {
        return Err(parser.error("extra data after the JSON value"));
    }
    Ok(value)
}

struct Parser<'t> {
    text: &'t str,
    pos: usize,
}

impl<'t> Parser<'t> {
    fn error(&self, message: &str) -> JsonError {
        JsonError {
            message: message.into(),
            offset: self.pos,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat_literal(&mut self, literal: &str) -> bool {
        if self.text[self.pos..].starts_with(literal) {
            self.pos += literal.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<JsonValue, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nesting too deep"));
        }
        match self.peek() {
            None => Err(self.error("expected a value, found the end")),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(JsonValue::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => {
                for (literal, value) in [
                    ("true", JsonValue::Bool(true)),
                    ("false", JsonValue::Bool(false)),
                    ("null", JsonValue::Null),
                    ("NaN", JsonValue::Float(f64::NAN)),
                    ("Infinity", JsonValue::Float(f64::INFINITY)),
                ] {
                    if self.eat_literal(literal) {
                        return Ok(value);
                    }
                }
                Err(self.error("expected a value"))
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<JsonValue, JsonError> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(JsonValue::Array(items));
        }
        loop {
            self.skip_whitespace();
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(JsonValue::Array(items));
                }
                _ => return Err(self.error("expected ',' or ']'")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<JsonValue, JsonError> {
        self.pos += 1;
        let mut entries: Vec<(String, JsonValue)> = Vec::new();
        let mut index: Option<hashbrown::HashMap<String, usize>> = None;
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(JsonValue::Object(JsonObject { entries }));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a property name in double quotes"));
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("expected ':'"));
            }
            self.pos += 1;
            self.skip_whitespace();
            let value = self.value(depth + 1)?;
            if index.is_none() && entries.len() >= LINEAR_DEDUP_LIMIT {
                index = Some(
                    entries
                        .iter()
                        .enumerate()
                        .map(|(i, (k, _))| (k.clone(), i))
                        .collect(),
                );
            }
            let existing = match &index {
                Some(index) => index.get(&key).copied(),
                None => entries.iter().position(|(k, _)| *k == key),
            };
            match existing.and_then(|i| entries.get_mut(i)) {
                Some(slot) => slot.1 = value,
                None => {
                    if let Some(index) = &mut index {
                        index.insert(key.clone(), entries.len());
                    }
                    entries.push((key, value));
                }
            }
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(JsonValue::Object(JsonObject { entries }));
                }
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.pos += 1;
        let bytes = self.text.as_bytes();
        let mut out = String::new();
        loop {
            let run = bytes[self.pos..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .ok_or_else(|| self.error("unterminated string"))?;
            out.push_str(&self.text[self.pos..self.pos + run]);
            self.pos += run;
            match bytes[self.pos] {
                b'"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    self.pos += 1;
                    let escape = self
                        .peek()
                        .ok_or_else(|| self.error("unterminated string"))?;
                    self.pos += 1;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => out.push(self.unicode_escape()?),
                        _ => {
                            self.pos -= 1;
                            return Err(self.error("invalid escape"));
                        }
                    }
                }
                _ => return Err(self.error("invalid control character in string")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.error("invalid \\uXXXX escape"))?;
        self.pos += 4;
        u32::from_str_radix(digits, 16).map_err(|_| self.error("invalid \\uXXXX escape"))
    }

    fn unicode_escape(&mut self) -> Result<char, JsonError> {
        let first = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&first) && self.text[self.pos..].starts_with("\\u")
        {
            let resume = self.pos;
            self.pos += 2;
            let second = self.hex4()?;
            if (0xDC00..0xE000).contains(&second) {
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            } else {
                self.pos = resume;
                first
            }
        } else {
            first
        };
        // Python keeps lone surrogates; a Rust string cannot hold them.
        char::from_u32(code).ok_or_else(|| self.error("lone surrogate in \\u escape"))
    }

    fn number(&mut self) -> Result<JsonValue, JsonError> {
        let start = self.pos;
        let bytes = self.text.as_bytes();
        if self.peek() == Some(b'-') {
            self.pos += 1;
            if self.eat_literal("Infinity") {
                return Ok(JsonValue::Float(f64::NEG_INFINITY));
            }
        }
        let digits = |p: &mut Self| {
            let from = p.pos;
            while p.peek().is_some_and(|b| b.is_ascii_digit()) {
                p.pos += 1;
            }
            p.pos - from
        };
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.error("invalid number")),
        }
        let mut is_float = false;
        if self.peek() == Some(b'.') && bytes.get(self.pos + 1).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
            digits(self);
            is_float = true;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            let mark = self.pos;
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if digits(self) == 0 {
                // Python's number pattern does not take a dangling exponent.
                self.pos = mark;
            } else {
                is_float = true;
            }
        }
        let literal = &self.text[start..self.pos];
        if is_float {
            return literal
                .parse::<f64>()
                .map(JsonValue::Float)
                .map_err(|_| self.error("invalid number"));
        }
        if let Ok(i) = literal.parse::<i64>() {
            return Ok(JsonValue::Int(i));
        }
        if let Ok(u) = literal.parse::<u64>() {
            return Ok(JsonValue::UInt(u));
        }
        Ok(JsonValue::BigInt(literal.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_key_order_and_python_duplicate_semantics() {
        let v = parse(br#"{"b": 1, "a": 2, "b": 3}"#).unwrap();
        let JsonValue::Object(o) = v else {
            panic!("not an object")
        };
        let keys: Vec<_> = o.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["b", "a"]);
        assert_eq!(o.get("b"), Some(&JsonValue::Int(3)));
    }

    #[test]
    fn deduplicates_large_objects() {
        let mut text = String::from("{");
        for i in 0..40 {
            text.push_str(&format!("\"k{i}\": {i},"));
        }
        text.push_str("\"k3\": \"last\"}");
        let JsonValue::Object(o) = parse(text.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(o.len(), 40);
        assert_eq!(
            o.iter().nth(3),
            Some(("k3", &JsonValue::String("last".into())))
        );
    }

    #[test]
    fn numbers_follow_python() {
        let v = parse(b"[1, 1.0, 18446744073709551615, -5, 1e2, -0, -0.0, 123456789012345678901234567890, NaN, -Infinity, 0.1e-2]").unwrap();
        let JsonValue::Array(items) = v else { panic!() };
        assert_eq!(items[0], JsonValue::Int(1));
        assert_eq!(items[1], JsonValue::Float(1.0));
        assert_eq!(items[2], JsonValue::UInt(u64::MAX));
        assert_eq!(items[3], JsonValue::Int(-5));
        assert_eq!(items[4], JsonValue::Float(100.0));
        assert_eq!(items[5], JsonValue::Int(0));
        assert!(matches!(items[6], JsonValue::Float(f) if f == 0.0 && f.is_sign_negative()));
        assert_eq!(
            items[7],
            JsonValue::BigInt("123456789012345678901234567890".into())
        );
        assert!(matches!(items[8], JsonValue::Float(f) if f.is_nan()));
        assert_eq!(items[9], JsonValue::Float(f64::NEG_INFINITY));
        assert_eq!(items[10], JsonValue::Float(0.001));
    }

    #[test]
    fn strings_and_errors() {
        let v = parse("[\"a\\\"b\\\\c\\/\\n\\u00e9\\ud83d\\ude00\", \"é\"]".as_bytes()).unwrap();
        assert_eq!(
            v,
            JsonValue::Array(vec![
                JsonValue::String("a\"b\\c/\né😀".into()),
                JsonValue::String("é".into())
            ])
        );
        for bad in [
            &b"{"[..],
            b"[1,]",
            b"01",
            b"1 2",
            b"\"\\x\"",
            b"\"\\ud800\"",
            b"\"a\nb\"",
            b"{1: 2}",
            b"[1e]",
            b"\xff",
            b"tru",
            b"-",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "[".repeat(MAX_DEPTH + 2);
        assert!(parse(deep.as_bytes()).is_err());
        assert_eq!(
            parse(b" \t\n{} ").unwrap(),
            JsonValue::Object(JsonObject::new())
        );
    }
}
