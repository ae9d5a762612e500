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
    /// Model names are short identifiers; a huge one would only cost memory and log volume.
    #[error("`model` is {0} bytes long; model names are at most {MAX_MODEL_NAME_BYTES} bytes")]
    ModelTooLong(usize),
}

/// Longest `model` accepted (vLLM's served names and hub ids are far shorter).
pub const MAX_MODEL_NAME_BYTES: usize = 1024;

/// What routing needs from a body.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    /// Prompt text in a stable form, for prefix-cache affinity.
    pub prompt: String,
    /// The body's own `priority`: absent, or present (as an integer when it is one). A
    /// client's priority is clamped to what its objective allows before it reaches a server.
    pub priority: Option<Option<i64>>,
}

/// The top-level fields routing reads; serde skips every other field without building it.
#[derive(Deserialize)]
struct Fields {
    model: Option<Value>,
    stream: Option<Value>,
    prompt: Option<Text>,
    messages: Option<Text>,
    input: Option<Text>,
    priority: Option<Value>,
}

/// The text of a prompt-like value, collected while parsing (see [`Collect`]).
struct Text(String);

std::thread_local! {
    /// Most prompt bytes [`parse_body_capped`] keeps (routing hashes only a prefix); set for
    /// the duration of one parse on this thread, since serde's derive passes no context.
    static PROMPT_CAP: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Collected text, bounded: once an append does not fit whole, it is cut at a character
/// boundary and nothing more is taken (so the text is always a prefix of the whole).
struct Sink {
    s: String,
    cap: usize,
    full: bool,
}

impl Sink {
    fn new(cap: usize) -> Self {
        Self {
            s: String::new(),
            cap,
            full: false,
        }
    }

    fn push(&mut self, v: &str) {
        if self.full {
            return;
        }
        let room = self.cap.saturating_sub(self.s.len());
        if v.len() <= room {
            self.s.push_str(v);
        } else {
            let mut end = room;
            while !v.is_char_boundary(end) {
                end -= 1;
            }
            self.s.push_str(&v[..end]);
            self.full = true;
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Sink::new(PROMPT_CAP.with(|c| c.get()));
        Collect(&mut out).deserialize(d)?;
        Ok(Text(out.s))
    }
}

/// Appends a JSON value's text to a string: strings as they are, numbers followed by a
/// space, array items each followed by a newline, and of an object its `role` (then `: `)
/// followed by its `content`, `text` and `input`, in that order.
struct Collect<'a>(&'a mut Sink);

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
        self.0.push(v);
        Ok(())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.0.push(&serde_json::Number::from(v).to_string());
        self.0.push(" ");
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.0.push(&serde_json::Number::from(v).to_string());
        self.0.push(" ");
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        if let Some(n) = serde_json::Number::from_f64(v) {
            self.0.push(&n.to_string());
            self.0.push(" ");
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
            self.0.push("\n");
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Keys may come in any order; the text keeps role, content, text, input order (a
        // repeated key counts once, its last value, as in a parsed object).
        let mut parts: [Option<Sink>; 4] = Default::default();
        while let Some(k) = map.next_key_seed(PartKey)? {
            match k {
                Some(i) => {
                    // Each part may be all the room left; the joined text is capped below.
                    let mut s = Sink::new(self.0.cap.saturating_sub(self.0.s.len()));
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
            self.0.push(&r.s);
            if r.full {
                self.0.full = true;
            }
            self.0.push(": ");
        }
        for p in rest.into_iter().flatten() {
            self.0.push(&p.s);
            if p.full {
                self.0.full = true;
            }
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
    parse_body_capped(api, body, usize::MAX)
}

/// [`parse_body`] keeping at most `max_prompt_bytes` of the prompt's text (its prefix, all
/// that prefix-cache routing hashes): memory stays bounded whatever the body's size.
pub fn parse_body_capped(
    api: ApiKind,
    body: &[u8],
    max_prompt_bytes: usize,
) -> Result<ParsedRequest, RequestError> {
    struct Reset(usize);
    impl Drop for Reset {
        fn drop(&mut self) {
            PROMPT_CAP.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(PROMPT_CAP.with(|c| c.replace(max_prompt_bytes)));
    parse_body_inner(api, body)
}

fn parse_body_inner(api: ApiKind, body: &[u8]) -> Result<ParsedRequest, RequestError> {
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
        Some(Value::String(s)) if s.len() > MAX_MODEL_NAME_BYTES => {
            return Err(RequestError::ModelTooLong(s.len()));
        }
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
        priority: f.priority.map(|v| v.as_i64()),
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
        Some(Value::String(s)) if s.len() > MAX_MODEL_NAME_BYTES => {
            return Err(RequestError::ModelTooLong(s.len()));
        }
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
        priority: obj
            .get("priority")
            .filter(|v| !v.is_null())
            .map(Value::as_i64),
    })
}

/// The body with `model` replaced (key order kept).
pub fn with_model(body: &[u8], model: &str) -> Result<Vec<u8>, RequestError> {
    rewrite(body, model, None)
}

/// Where the top-level fields a rewrite writes sit in the body (borrowed slices of it);
/// every other field is skipped without being built.
#[derive(Deserialize)]
struct Spans<'a> {
    #[serde(borrow)]
    model: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    priority: Option<&'a serde_json::value::RawValue>,
}

/// [`Spans`] when only `model` is written: a repeated `priority` is then none of our business.
#[derive(Deserialize)]
struct ModelSpan<'a> {
    #[serde(borrow)]
    model: Option<&'a serde_json::value::RawValue>,
}

/// The byte range of `raw` inside `body` (it is a slice of it).
fn span(body: &[u8], raw: &serde_json::value::RawValue) -> std::ops::Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// The body (one [`parse_body`] accepted) with `model` replaced and, when given, vLLM's
/// `priority` field set (lower runs earlier on a server started with
/// `--scheduling-policy priority`). See [`rewrite_in_place`].
pub fn rewrite(body: &[u8], model: &str, priority: Option<i64>) -> Result<Vec<u8>, RequestError> {
    let mut out = body.to_vec();
    rewrite_in_place(&mut out, model, priority)?;
    Ok(out)
}

/// [`rewrite`] on the body itself: the values are patched where they are, so a huge body
/// is never parsed into a tree nor copied (the tail moves within the buffer; it grows only
/// when the new values are longer than the room left in its capacity).
pub fn rewrite_in_place(
    body: &mut Vec<u8>,
    model: &str,
    priority: Option<i64>,
) -> Result<(), RequestError> {
    // (range to replace, replacement), found while the body is borrowed by the parse.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::with_capacity(2);
    {
        let classify = |e: serde_json::Error| match e.classify() {
            serde_json::error::Category::Data => RequestError::RepeatedField(e.to_string()),
            _ => RequestError::InvalidJson(e.to_string()),
        };
        let spans: Spans<'_> = if priority.is_some() {
            serde_json::from_slice(body).map_err(classify)?
        } else {
            let m: ModelSpan<'_> = serde_json::from_slice(body).map_err(classify)?;
            Spans {
                model: m.model,
                priority: None,
            }
        };
        match spans.model {
            Some(m) => edits.push((
                span(body, m),
                serde_json::to_string(model).unwrap_or_default(),
            )),
            None => return Err(RequestError::MissingModel),
        }
        if let Some(p) = priority {
            match spans.priority {
                Some(old) => edits.push((span(body, old), p.to_string())),
                None => {
                    // After the last member, before the object's closing brace.
                    let end = body
                        .iter()
                        .rposition(|&b| b == b'}')
                        .ok_or(RequestError::NotAnObject)?;
                    edits.push((end..end, format!(",\"priority\":{p}")));
                }
            }
        }
    }
    // Last first, so earlier ranges stay valid.
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    for (r, s) in edits {
        body.splice(r, s.into_bytes());
    }
    Ok(())
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
            String::from_utf8(with_model(body, "b").unwrap()).unwrap(),
            r#"{"model":"b","prompt":"p","max_tokens":3}"#
        );
        assert_eq!(
            String::from_utf8(rewrite(body, "a", Some(-1)).unwrap()).unwrap(),
            r#"{"model":"a","prompt":"p","max_tokens":3,"priority":-1}"#
        );
        // Spacing, escapes and an existing priority are handled in place.
        let body = b" {\n \"priority\" : 5, \"model\" : \"a\\u0041\", \"x\": {\"model\": 1} }\n";
        assert_eq!(
            String::from_utf8(rewrite(body, "q\"r", Some(-2)).unwrap()).unwrap(),
            " {\n \"priority\" : -2, \"model\" : \"q\\\"r\", \"x\": {\"model\": 1} }\n"
        );
        assert!(matches!(
            rewrite(br#"{"model":"a","priority":1,"priority":2}"#, "b", Some(1)),
            Err(RequestError::RepeatedField(_))
        ));
        // Not writing the priority, a repeated one is left as the client sent it.
        assert_eq!(
            rewrite(br#"{"model":"a","priority":1,"priority":2}"#, "b", None).unwrap(),
            br#"{"model":"b","priority":1,"priority":2}"#
        );
    }

    #[test]
    fn prompt_text_is_capped_at_a_char_boundary() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"\u4e2d\u6587 abcdef"},{"role":"user","content":"tail"}]}"#;
        let full = parse_body(ApiKind::ChatCompletions, body).unwrap().prompt;
        for cap in 0..full.len() + 3 {
            let p = parse_body_capped(ApiKind::ChatCompletions, body, cap)
                .unwrap()
                .prompt;
            assert!(p.len() <= cap, "{cap}: {p:?}");
            assert!(
                full.starts_with(&p),
                "{cap}: {p:?} not a prefix of {full:?}"
            );
            assert!(
                p.len() + 3 > cap.min(full.len()),
                "{cap}: {p:?} cut too short"
            );
        }
        // The cap is per call: the next parse on this thread is whole again.
        assert_eq!(
            parse_body(ApiKind::ChatCompletions, body).unwrap().prompt,
            full
        );
    }

    /// The in-place rewrite means the same as rebuilding the object: equal JSON values.
    #[test]
    fn rewrite_in_place_equals_a_rebuilt_object() {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::from),
            "[a-z \\\\\"\\n\\u{4e2d}\\u{1F600}]{0,12}".prop_map(Value::from),
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let bodies = (
            prop::collection::btree_map("[a-z]{1,8}", value, 0..6),
            prop::option::of(any::<i32>()),
            any::<bool>(),
        );
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(2000));
        runner
            .run(
                &(
                    bodies,
                    "[a-z0-9/\"\\\\-]{1,10}",
                    prop::option::of(any::<i32>()),
                ),
                |((fields, prio, pretty), model, set)| {
                    let mut obj: serde_json::Map<String, Value> = fields
                        .into_iter()
                        .filter(|(k, _)| k != "model" && k != "priority")
                        .collect();
                    obj.insert("model".into(), Value::from("orig"));
                    if let Some(p) = prio {
                        obj.insert("priority".into(), Value::from(p));
                    }
                    let v = Value::Object(obj);
                    let body = if pretty {
                        serde_json::to_vec_pretty(&v).unwrap()
                    } else {
                        serde_json::to_vec(&v).unwrap()
                    };
                    let out = rewrite(&body, &model, set.map(i64::from)).unwrap();
                    let got: Value = serde_json::from_slice(&out).unwrap();
                    let mut want = v.clone();
                    want["model"] = Value::from(model.clone());
                    if let Some(p) = set {
                        want["priority"] = Value::from(p);
                    }
                    prop_assert_eq!(got, want);
                    Ok(())
                },
            )
            .unwrap();
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
