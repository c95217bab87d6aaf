//! vLLM's request `priority` in the forwarded body (`flowControl.forwardPriority`): the
//! field is added after the body's opening brace, everything else is forwarded byte for
//! byte, and a body that sets `priority` itself keeps the client's value.

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

/// Whether the top-level object has a `priority` key, whatever its value (`null` too).
#[derive(Deserialize)]
struct PriorityKey {
    #[serde(default, deserialize_with = "present")]
    priority: bool,
}

fn present<'de, D: Deserializer<'de>>(value: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(value).map(|_| true)
}

/// `body` with `"priority":<priority>` as its first field; `None` when the client set a
/// priority or the body is not a JSON object (it is forwarded as it is then).
pub fn with_priority(body: &[u8], priority: i32) -> Option<Bytes> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let key: PriorityKey = serde_json::from_slice(body).ok()?;
    if key.priority {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let field = format!("\"priority\":{priority}{}", if empty { "" } else { "," });
    let mut out = Vec::with_capacity(body.len() + field.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(rest);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_goes_first_and_the_rest_is_untouched() {
        let body = br#" {"model":"m","messages":[{"role":"user","content":"{\"priority\":3}"}]}"#;
        let out = with_priority(body, -1).expect("an object without priority");
        assert_eq!(
            &out[..],
            &br#" {"priority":-1,"model":"m","messages":[{"role":"user","content":"{\"priority\":3}"}]}"#[..]
        );
        let parsed: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(parsed["priority"], -1);
        assert_eq!(
            &with_priority(b"{ }", 2).expect("empty object")[..],
            b"{\"priority\":2 }"
        );
    }

    #[test]
    fn a_clients_own_priority_and_non_objects_are_left_alone() {
        assert_eq!(with_priority(br#"{"model":"m","priority":5}"#, -1), None);
        assert_eq!(with_priority(br#"{"priority":null,"model":"m"}"#, -1), None);
        assert_eq!(with_priority(b"[1]", -1), None);
        assert_eq!(with_priority(b"{\"model\":", -1), None);
    }
}
