//! OpenAI request bodies: the model, the prompt text for prefix matching, model rewriting.

use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use thiserror::Error;

/// The OpenAI API a request uses, from its `:path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    Completions,
    ChatCompletions,
    Embeddings,
    Responses,
    Other,
}

impl ApiKind {
    /// Classifies a request path (query string ignored).
    pub fn from_path(path: &str) -> Self {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            ApiKind::ChatCompletions
        } else if path.ends_with("/completions") {
            ApiKind::Completions
        } else if path.ends_with("/embeddings") {
            ApiKind::Embeddings
        } else if path.ends_with("/responses") {
            ApiKind::Responses
        } else {
            ApiKind::Other
        }
    }
}

/// Why a body cannot be routed (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("request body has no \"model\" field; set it to the model or adapter name")]
    MissingModel,
    #[error("\"model\" must be a non-empty string")]
    BadModel,
    /// The server would read the last copy; a router reading another could send the request
    /// to the wrong model, so a repeated field routing reads is refused.
    #[error("request body repeats a field routing reads ({0}); send each field once")]
    RepeatedField(String),
}

/// What routing needs from a body.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    /// Prompt text in a stable form, for prefix-cache affinity.
    pub prompt: String,
}

/// The top-level fields routing reads; serde skips every other field without building it.
#[derive(Deserialize)]
struct Fields {
    model: Option<Value>,
    stream: Option<Value>,
    prompt: Option<Text>,
    messages: Option<Text>,
    input: Option<Text>,
}

/// The text of a prompt-like value, collected while parsing (see [`Collect`]).
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = String::new();
        Collect(&mut out).deserialize(d)?;
        Ok(Text(out))
    }
}

/// Appends a JSON value's text to a string: strings as they are, numbers followed by a
/// space, array items each followed by a newline, and of an object its `role` (then `: `)
/// followed by its `content`, `text` and `input`, in that order.
struct Collect<'a>(&'a mut String);

impl<'de> DeserializeSeed<'de> for Collect<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Which of the object keys [`Collect`] reads a key is (`role`, `content`, `text`, `input`).
struct PartKey;

impl<'de> DeserializeSeed<'de> for PartKey {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for PartKey {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<Option<usize>, E> {
        Ok(["role", "content", "text", "input"]
            .iter()
            .position(|p| *p == k))
    }
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.0.push_str(v);
        Ok(())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.0.push_str(&serde_json::Number::from(v).to_string());
        self.0.push(' ');
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.0.push_str(&serde_json::Number::from(v).to_string());
        self.0.push(' ');
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        if let Some(n) = serde_json::Number::from_f64(v) {
            self.0.push_str(&n.to_string());
            self.0.push(' ');
        }
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Collect(self.0))?.is_some() {
            self.0.push('\n');
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Keys may come in any order; the text keeps role, content, text, input order (a
        // repeated key counts once, its last value, as in a parsed object).
        let mut parts: [Option<String>; 4] = Default::default();
        while let Some(k) = map.next_key_seed(PartKey)? {
            match k {
                Some(i) => {
                    let mut s = String::new();
                    map.next_value_seed(Collect(&mut s))?;
                    parts[i] = Some(s);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let [role, rest @ ..] = parts;
        if let Some(r) = role {
            self.0.push_str(&r);
            self.0.push_str(": ");
        }
        for p in rest.into_iter().flatten() {
            self.0.push_str(&p);
        }
        Ok(())
    }
}

#[cfg(test)]
fn push_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(items) => {
            for i in items {
                push_text(i, out);
                out.push('\n');
            }
        }
        Value::Object(o) => {
            if let Some(r) = o.get("role") {
                push_text(r, out);
                out.push_str(": ");
            }
            for key in ["content", "text", "input"] {
                if let Some(c) = o.get(key) {
                    push_text(c, out);
                }
            }
        }
        Value::Number(n) => {
            out.push_str(&n.to_string());
            out.push(' ');
        }
        _ => {}
    }
}

/// Parses a request body: only the fields routing reads are built (the prompt's text is
/// collected while parsing), everything else is checked for syntax and skipped.
pub fn parse_body(api: ApiKind, body: &[u8]) -> Result<ParsedRequest, RequestError> {
    let invalid = |e: serde_json::Error| RequestError::InvalidJson(e.to_string());
    // A struct would also accept a JSON array (fields by position): only objects are bodies.
    if body.trim_ascii_start().first() != Some(&b'{') {
        serde_json::from_slice::<IgnoredAny>(body).map_err(invalid)?;
        return Err(RequestError::NotAnObject);
    }
    let f: Fields = serde_json::from_slice(body).map_err(|e| match e.classify() {
        // Every field accepts any JSON value: a data error can only be a repeated field.
        serde_json::error::Category::Data => RequestError::RepeatedField(e.to_string()),
        _ => invalid(e),
    })?;
    let model = match f.model {
        None => return Err(RequestError::MissingModel),
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(_) => return Err(RequestError::BadModel),
    };
    let stream = f.stream.as_ref().and_then(Value::as_bool).unwrap_or(false);
    let text = match api {
        ApiKind::Completions | ApiKind::Other => f.prompt,
        ApiKind::ChatCompletions => f.messages,
        ApiKind::Embeddings | ApiKind::Responses => f.input,
    };
    Ok(ParsedRequest {
        model,
        stream,
        prompt: text.map(|t| t.0).unwrap_or_default(),
    })
}

/// The reference [`parse_body`]: the whole body as a `Value`, then the fields read from it.
#[cfg(test)]
fn parse_body_via_value(api: ApiKind, body: &[u8]) -> Result<ParsedRequest, RequestError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    let obj = v.as_object().ok_or(RequestError::NotAnObject)?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => return Err(RequestError::MissingModel),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(RequestError::BadModel),
    };
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut prompt = String::new();
    let field = match api {
        ApiKind::Completions => "prompt",
        ApiKind::ChatCompletions => "messages",
        ApiKind::Embeddings | ApiKind::Responses => "input",
        ApiKind::Other => "prompt",
    };
    if let Some(p) = obj.get(field) {
        push_text(p, &mut prompt);
    }
    Ok(ParsedRequest {
        model,
        stream,
        prompt,
    })
}

/// The body with `model` replaced (key order kept).
pub fn with_model(body: &[u8], model: &str) -> Vec<u8> {
    rewrite(body, model, None)
}

/// The body (one [`parse_body`] accepted) with `model` replaced and, when given, vLLM's
/// `priority` field set (lower runs earlier on a server started with
/// `--scheduling-policy priority`). Only rewritten requests pay for a whole parse.
pub fn rewrite(body: &[u8], model: &str, priority: Option<i64>) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return body.to_vec();
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("model".into(), Value::String(model.to_string()));
        if let Some(p) = priority {
            o.insert("priority".into(), Value::from(p));
        }
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Chained 64-bit hashes of `text` in `block_chars`-character blocks, seeded by `seed` (the
/// target model, as the server's cache is per model/adapter). Only full blocks count.
pub fn prefix_blocks(seed: &str, text: &str, block_chars: usize, max_blocks: usize) -> Vec<u64> {
    let bytes = text.as_bytes();
    let block_chars = block_chars.max(8);
    let n = (bytes.len() / block_chars).min(max_blocks);
    let mut out = Vec::with_capacity(n);
    let mut h = mix(0x51_7c_c1_b7_27_22_0a_95, seed.as_bytes());
    for i in 0..n {
        h = mix(h, &bytes[i * block_chars..(i + 1) * block_chars]);
        out.push(h);
    }
    out
}

/// A fast word-at-a-time hash (not cryptographic; collisions only cost a worse pick).
fn mix(mut h: u64, data: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K).rotate_left(29);
    }
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions?x=1"),
            ApiKind::ChatCompletions
        );
        assert_eq!(ApiKind::from_path("/v1/completions"), ApiKind::Completions);
        assert_eq!(ApiKind::from_path("/v1/embeddings"), ApiKind::Embeddings);
        assert_eq!(ApiKind::from_path("/v1/responses"), ApiKind::Responses);
        assert_eq!(ApiKind::from_path("/healthz"), ApiKind::Other);
    }

    #[test]
    fn bodies() {
        let r = parse_body(
            ApiKind::ChatCompletions,
            br#"{"model":"m","stream":true,"messages":[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream);
        assert!(r.prompt.starts_with("system: be nice"));
        assert!(r.prompt.contains("hi"));
        assert_eq!(
            parse_body(ApiKind::Completions, b"{"),
            Err(RequestError::InvalidJson(
                "EOF while parsing an object at line 1 column 1".into()
            ))
        );
        assert_eq!(
            parse_body(ApiKind::Completions, br#"{"prompt":"x"}"#),
            Err(RequestError::MissingModel)
        );
        assert_eq!(
            parse_body(ApiKind::Completions, br#"{"model":3}"#),
            Err(RequestError::BadModel)
        );
        assert_eq!(
            parse_body(ApiKind::Completions, b"[1]"),
            Err(RequestError::NotAnObject)
        );
    }

    #[test]
    fn rewrite_keeps_other_fields_and_order() {
        let body = br#"{"model":"a","prompt":"p","max_tokens":3}"#;
        assert_eq!(parse_body(ApiKind::Completions, body).unwrap().model, "a");
        assert_eq!(
            String::from_utf8(with_model(body, "b")).unwrap(),
            r#"{"model":"b","prompt":"p","max_tokens":3}"#
        );
        assert_eq!(
            String::from_utf8(rewrite(body, "a", Some(-1))).unwrap(),
            r#"{"model":"a","prompt":"p","max_tokens":3,"priority":-1}"#
        );
    }

    #[test]
    fn repeated_routing_fields_are_refused() {
        let e = parse_body(
            ApiKind::Completions,
            br#"{"model":"cheap","prompt":"x","model":"expensive"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&e, RequestError::RepeatedField(m) if m.contains("duplicate field `model`")),
            "{e}"
        );
        // Other repeated fields are the server's business.
        assert!(parse_body(ApiKind::Completions, br#"{"model":"m","n":1,"n":2}"#).is_ok());
    }

    #[test]
    fn errors_match_the_value_parse() {
        for body in [
            &b"{"[..],
            b"",
            b"  [1]",
            b"[1",
            b"\"x\"",
            b"{\"model\": }",
            b"{model:1}",
            b"{\"model\":\"m\"} x",
            b"{\"model\":\"m\",\"messages\":[{\"content\":\"a\"]}",
            b"{\"model\":null,\"prompt\":\"x\"}",
            b"{\"model\":\"\"}",
            b"{\"model\":[\"m\"]}",
        ] {
            for api in [ApiKind::Completions, ApiKind::ChatCompletions] {
                assert_eq!(
                    parse_body(api, body),
                    parse_body_via_value(api, body),
                    "{}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// JSON values shaped like OpenAI bodies: the keys the text collection reads, others,
        /// every scalar kind, nesting.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                (-1e9f64..1e9).prop_map(Value::from),
                "[a-z \\n\"\\\\é]{0,8}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                    prop::collection::vec(
                        (
                            prop::sample::select(vec![
                                "role", "content", "text", "input", "type", "name", "x"
                            ]),
                            inner
                        ),
                        0..5
                    )
                    .prop_map(|kv| Value::Object(
                        kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                    )),
                ]
            })
        }

        fn body() -> impl Strategy<Value = Vec<u8>> {
            (
                prop::option::of(prop_oneof!["[a-z0-9-]{0,6}".prop_map(Value::from), json()]),
                prop::option::of(json()),
                prop::collection::vec(
                    (
                        prop::sample::select(vec![
                            "prompt",
                            "messages",
                            "input",
                            "max_tokens",
                            "temperature",
                            "tools",
                        ]),
                        json(),
                    ),
                    0..4,
                ),
            )
                .prop_map(|(model, stream, rest)| {
                    let mut o = serde_json::Map::new();
                    for (k, v) in rest {
                        o.insert(k.to_string(), v);
                    }
                    if let Some(m) = model {
                        o.insert("model".into(), m);
                    }
                    if let Some(s) = stream {
                        o.insert("stream".into(), s);
                    }
                    serde_json::to_vec(&Value::Object(o)).unwrap()
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            /// Collecting while parsing reads the same model, stream flag and prompt text as
            /// building the whole `Value` and reading it.
            #[test]
            fn typed_parse_equals_value_parse(body in body(), api in prop::sample::select(vec![
                ApiKind::Completions, ApiKind::ChatCompletions, ApiKind::Embeddings,
                ApiKind::Responses, ApiKind::Other,
            ])) {
                prop_assert_eq!(parse_body(api, &body), parse_body_via_value(api, &body));
            }
        }
    }

    #[test]
    fn prefix_blocks_chain_and_seed() {
        let text = "x".repeat(200);
        let a = prefix_blocks("m1", &text, 64, 100);
        assert_eq!(a.len(), 3);
        let b = prefix_blocks("m1", &format!("{text}yyy"), 64, 100);
        assert_eq!(a, b[..3]);
        assert_ne!(prefix_blocks("m2", &text, 64, 100), a);
        assert_eq!(prefix_blocks("m1", &text, 64, 2).len(), 2);
    }
}
