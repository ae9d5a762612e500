//! OpenAI request bodies: the model, the prompt text for prefix matching, model rewriting.

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
}

/// What routing needs from a body.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    /// Prompt text in a stable form, for prefix-cache affinity.
    pub prompt: String,
    /// The parsed body, kept for rewriting without a second parse.
    pub body: Value,
}

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

/// Parses a request body.
pub fn parse_body(api: ApiKind, body: &[u8]) -> Result<ParsedRequest, RequestError> {
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
        body: v,
    })
}

/// The body with `model` replaced (key order kept).
pub fn with_model(req: &ParsedRequest, model: &str) -> Vec<u8> {
    rewrite(req, model, None)
}

/// The body with `model` replaced and, when given, vLLM's `priority` field set (lower runs
/// earlier on a server started with `--scheduling-policy priority`).
pub fn rewrite(req: &ParsedRequest, model: &str, priority: Option<i64>) -> Vec<u8> {
    let mut v = req.body.clone();
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
        let r = parse_body(
            ApiKind::Completions,
            br#"{"model":"a","prompt":"p","max_tokens":3}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(with_model(&r, "b")).unwrap(),
            r#"{"model":"b","prompt":"p","max_tokens":3}"#
        );
        assert_eq!(
            String::from_utf8(rewrite(&r, "a", Some(-1))).unwrap(),
            r#"{"model":"a","prompt":"p","max_tokens":3,"priority":-1}"#
        );
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
