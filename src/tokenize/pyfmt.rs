//! Python's `str()`, `repr()` and `json.dumps` for template values.
//!
//! Hugging Face renders chat templates with Jinja2, so whatever a template
//! prints goes through Python's `str()` and its `tojson` filter is
//! `json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...)`.
//! minijinja prints `true`/`none` and formats floats its own way; these
//! functions reproduce Python's output byte for byte.

use std::fmt::Write;

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};

/// Nesting deeper than this is rejected instead of risking the stack.
const MAX_DEPTH: usize = 256;

/// The options of `json.dumps` that chat templates use.
#[derive(Clone, Debug)]
pub struct JsonDumpOptions {
    pub ensure_ascii: bool,
    /// `None` writes everything on one line.
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub sort_keys: bool,
}

impl JsonDumpOptions {
    /// `json.dumps` defaults for the given indent, as Hugging Face's `tojson` calls it.
    pub fn hf_default(indent: Option<String>) -> Self {
        let item_separator = if indent.is_some() { "," } else { ", " };
        JsonDumpOptions {
            ensure_ascii: false,
            indent,
            item_separator: item_separator.to_owned(),
            key_separator: ": ".to_owned(),
            sort_keys: false,
        }
    }
}

/// `json.dumps(value, ...)`.
pub fn json_dumps(value: &Value, options: &JsonDumpOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_json(&mut out, value, options, 0)?;
    Ok(out)
}

fn not_serializable(value: &Value) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "Object of type {} is not JSON serializable",
            python_type_name(value)
        ),
    )
}

fn python_type_name(value: &Value) -> &'static str {
    match value.kind() {
        ValueKind::Undefined => "Undefined",
        ValueKind::None => "NoneType",
        ValueKind::Bool => "bool",
        ValueKind::Number if value.is_integer() => "int",
        ValueKind::Number => "float",
        ValueKind::String => "str",
        ValueKind::Bytes => "bytes",
        ValueKind::Seq => "list",
        ValueKind::Map => "dict",
        _ => "object",
    }
}

fn write_newline_indent(out: &mut String, indent: &str, depth: usize) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str(indent);
    }
}

fn write_json(
    out: &mut String,
    value: &Value,
    options: &JsonDumpOptions,
    depth: usize,
) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "maximum recursion depth exceeded while encoding a JSON object",
        ));
    }
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_json_number(out, value),
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or(""), options.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_separator);
                }
                if let Some(indent) = &options.indent {
                    write_newline_indent(out, indent, depth + 1);
                }
                write_json(out, item, options, depth + 1)?;
            }
            if let Some(indent) = &options.indent {
                write_newline_indent(out, indent, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = map_entries(value)?;
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if options.sort_keys {
                sort_entries(&mut entries)?;
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_separator);
                }
                if let Some(indent) = &options.indent {
                    write_newline_indent(out, indent, depth + 1);
                }
                write_json_key(out, key, options.ensure_ascii)?;
                out.push_str(&options.key_separator);
                write_json(out, item, options, depth + 1)?;
            }
            if let Some(indent) = &options.indent {
                write_newline_indent(out, indent, depth);
            }
            out.push('}');
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

fn map_entries(value: &Value) -> Result<Vec<(Value, Value)>, Error> {
    let keys: Vec<Value> = value.try_iter()?.collect();
    keys.into_iter()
        .map(|key| {
            let item = value.get_item(&key)?;
            Ok((key, item))
        })
        .collect()
}

/// Python sorts the original keys, so mixing strings and numbers is a `TypeError`.
fn sort_entries(entries: &mut [(Value, Value)]) -> Result<(), Error> {
    let all_strings = entries.iter().all(|(k, _)| k.kind() == ValueKind::String);
    let all_numbers = entries
        .iter()
        .all(|(k, _)| matches!(k.kind(), ValueKind::Number | ValueKind::Bool));
    if !all_strings && !all_numbers {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "'<' not supported between instances of mixed key types",
        ));
    }
    if all_strings {
        // Python orders strings by code point, which is UTF-8 byte order.
        entries.sort_by(|(a, _), (b, _)| a.as_str().cmp(&b.as_str()));
    } else {
        entries.sort_by(|(a, _), (b, _)| {
            let a = f64::try_from(a.clone()).unwrap_or(f64::NAN);
            let b = f64::try_from(b.clone()).unwrap_or(f64::NAN);
            a.total_cmp(&b)
        });
    }
    Ok(())
}

fn write_json_key(out: &mut String, key: &Value, ensure_ascii: bool) -> Result<(), Error> {
    match key.kind() {
        ValueKind::String => write_json_string(out, key.as_str().unwrap_or(""), ensure_ascii),
        ValueKind::Bool => out.push_str(if key.is_true() {
            "\"true\""
        } else {
            "\"false\""
        }),
        ValueKind::None => out.push_str("\"null\""),
        ValueKind::Number => {
            let mut text = String::new();
            if key.is_integer() {
                write_int(&mut text, key);
            } else {
                write_float_repr(&mut text, f64::try_from(key.clone()).unwrap_or(f64::NAN));
            }
            write_json_string(out, &text, ensure_ascii);
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "keys must be str, int, float, bool or None, not {}",
                    python_type_name(key)
                ),
            ))
        }
    }
    Ok(())
}

fn write_json_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        write_int(out, value);
        return;
    }
    let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    if f.is_nan() {
        out.push_str("NaN");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        write_float_repr(out, f);
    }
}

fn write_int(out: &mut String, value: &Value) {
    if let Ok(i) = i128::try_from(value.clone()) {
        let _ = write!(out, "{i}");
    } else if let Ok(u) = u128::try_from(value.clone()) {
        let _ = write!(out, "{u}");
    }
}

/// Writes a JSON string literal exactly as Python's `json` encoder does.
pub fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut plain_start = 0;
    for (i, c) in s.char_indices() {
        let escape: Option<&str> = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            '\u{08}' => Some("\\b"),
            '\u{0c}' => Some("\\f"),
            _ => None,
        };
        let needs_unicode_escape = escape.is_none() && (c < ' ' || (ensure_ascii && !c.is_ascii()));
        if escape.is_none() && !needs_unicode_escape {
            continue;
        }
        out.push_str(&s[plain_start..i]);
        plain_start = i + c.len_utf8();
        match escape {
            Some(e) => out.push_str(e),
            None => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push_str(&s[plain_start..]);
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed
/// notation when the decimal exponent is in [-4, 16), else `1e+16` style.
pub fn write_float_repr(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("nan");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "inf" } else { "-inf" });
        return;
    }
    // `{:e}` prints the shortest round-trip digits, e.g. "-1.2345e-7".
    let scientific = format!("{f:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    // Python's decpt: value = 0.DIGITS x 10^decpt.
    let decpt = exponent + 1;
    if negative {
        out.push('-');
    }
    if !(-4 < decpt && decpt <= 16) {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exponent < 0 { '-' } else { '+' },
            exponent.abs()
        );
    } else if decpt <= 0 {
        out.push_str("0.");
        for _ in 0..(-decpt) {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let decpt = decpt as usize;
        if decpt < digits.len() {
            out.push_str(&digits[..decpt]);
            out.push('.');
            out.push_str(&digits[decpt..]);
        } else {
            out.push_str(&digits);
            for _ in digits.len()..decpt {
                out.push('0');
            }
            out.push_str(".0");
        }
    }
}

/// Python's `str(value)` as Jinja2 prints it (`Undefined` prints nothing).
pub fn write_python_str(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::String => out.push_str(value.as_str().unwrap_or("")),
        ValueKind::Undefined => {}
        _ => write_python_repr(out, value, 0),
    }
}

/// Python's `repr(value)` for the value kinds JSON and templates produce.
pub fn write_python_repr(out: &mut String, value: &Value, depth: usize) {
    if depth > MAX_DEPTH {
        out.push_str("...");
        return;
    }
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => write_int(out, value),
        ValueKind::Number => {
            write_float_repr(out, f64::try_from(value.clone()).unwrap_or(f64::NAN))
        }
        ValueKind::String => write_python_string_repr(out, value.as_str().unwrap_or("")),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_python_repr(out, &item, depth + 1);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(entries) = map_entries(value) {
                for (i, (key, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_python_repr(out, key, depth + 1);
                    out.push_str(": ");
                    write_python_repr(out, item, depth + 1);
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Characters `str.isprintable()` rejects, as far as a chat prompt can hold them:
/// controls, format characters, separators other than the space, private use.
fn is_python_unprintable(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{a0}' | '\u{ad}'
        | '\u{600}'..='\u{605}' | '\u{61c}' | '\u{6dd}' | '\u{70f}' | '\u{180e}'
        | '\u{1680}' | '\u{2000}'..='\u{200f}' | '\u{2028}'..='\u{202f}'
        | '\u{205f}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{3000}'
        | '\u{e000}'..='\u{f8ff}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}'
        | '\u{f0000}'..='\u{10ffff}')
}

/// Python's `repr(str)`: single quotes unless the text holds a single quote and no double quote.
pub fn write_python_string_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if is_python_unprintable(c) => {
                let code = c as u32;
                let _ = if code <= 0xff {
                    write!(out, "\\x{code:02x}")
                } else if code <= 0xffff {
                    write!(out, "\\u{code:04x}")
                } else {
                    write!(out, "\\U{code:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repr(f: f64) -> String {
        let mut s = String::new();
        write_float_repr(&mut s, f);
        s
    }

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1.5, "1.5"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.2345e-7, "1.2345e-07"),
            (1e100, "1e+100"),
            (-2.5e-300, "-2.5e-300"),
            (123456789.125, "123456789.125"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
        ];
        for (f, want) in cases {
            assert_eq!(repr(f), want, "repr({f:e})");
        }
    }

    #[test]
    fn json_dumps_matches_python_defaults() {
        let v = Value::from_pairs([
            ("b", Value::from(vec![Value::from(1), Value::from(2.0)])),
            ("a", Value::from("é\"\n\u{1}<>&'")),
            ("c", Value::from(())),
            ("d", Value::from(true)),
        ]);
        let compact = json_dumps(&v, &JsonDumpOptions::hf_default(None)).unwrap();
        assert_eq!(
            compact,
            r#"{"b": [1, 2.0], "a": "é\"\n\u0001<>&'", "c": null, "d": true}"#
        );
        let indented = json_dumps(&v, &JsonDumpOptions::hf_default(Some("  ".into()))).unwrap();
        assert_eq!(
            indented,
            "{\n  \"b\": [\n    1,\n    2.0\n  ],\n  \"a\": \"é\\\"\\n\\u0001<>&'\",\n  \"c\": null,\n  \"d\": true\n}"
        );
        let mut ascii = JsonDumpOptions::hf_default(None);
        ascii.ensure_ascii = true;
        ascii.sort_keys = true;
        assert_eq!(
            json_dumps(&Value::from_pairs([("z", "😀"), ("y", "é")]), &ascii).unwrap(),
            r#"{"y": "\u00e9", "z": "\ud83d\ude00"}"#
        );
        assert_eq!(
            json_dumps(&Value::from(Vec::<Value>::new()), &ascii).unwrap(),
            "[]"
        );
        assert!(json_dumps(&Value::UNDEFINED, &ascii).is_err());
    }

    #[test]
    fn python_str_and_repr() {
        let mut s = String::new();
        let v = Value::from(vec![
            Value::from("it's"),
            Value::from("a\tb"),
            Value::from(()),
            Value::from(false),
            Value::from(3),
            Value::from_pairs([("k", 1.5)]),
        ]);
        write_python_str(&mut s, &v);
        assert_eq!(s, r#"["it's", 'a\tb', None, False, 3, {'k': 1.5}]"#);
        s.clear();
        write_python_string_repr(&mut s, "\u{a0}x\u{7f}");
        assert_eq!(s, r"'\xa0x\x7f'");
    }
}
