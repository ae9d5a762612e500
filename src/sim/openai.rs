//! OpenAI-compatible request parsing and response bodies, shaped exactly like vLLM 0.32's.

use serde_json::{Value, json};

/// A vLLM error answer: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "InvalidUserInput",
            message: message.into(),
            param: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "Bad Request",
            message: message.into(),
            param: None,
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            kind: "NotFoundError",
            message: message.into(),
            param: None,
        }
    }
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: 404,
            kind: "NotFoundError",
            message: format!("The model `{model}` does not exist."),
            param: Some("model"),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            kind: "InternalServerError",
            message: message.into(),
            param: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}})
            .to_string()
    }
}

/// Which endpoint a generation request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

/// A parsed generation request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub api: Api,
    pub model: Option<String>,
    pub prompt: String,
    pub max_tokens: Option<u32>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's `priority` (lower runs earlier; non-zero needs `--scheduling-policy priority`).
    pub priority: i64,
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(text_of).collect::<Vec<_>>().join(" "),
        Value::Object(o) => o
            .get("text")
            .or_else(|| o.get("content"))
            .map(text_of)
            .unwrap_or_default(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

/// Parses a completions or chat body; errors are vLLM's 400 validation answers.
pub fn parse_request(api: Api, body: &[u8]) -> Result<GenRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("JSON decode error: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad_request("Input should be a valid dictionary"));
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "model: Input should be a valid string",
            ));
        }
    };
    let prompt = match api {
        Api::Completions => match obj.get("prompt") {
            Some(p) => text_of(p),
            None => return Err(ApiError::bad_request("prompt: Field required")),
        },
        Api::Chat => match obj.get("messages") {
            Some(Value::Array(msgs)) => msgs
                .iter()
                .map(|m| {
                    let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
                    format!(
                        "<|{role}|>{}\n",
                        m.get("content").map(text_of).unwrap_or_default()
                    )
                })
                .collect(),
            _ => return Err(ApiError::bad_request("messages: Field required")),
        },
    };
    let max_tokens = obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n.min(u64::from(u32::MAX)) as u32);
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1, got 0.",
        ));
    }
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| ApiError::bad_request("priority: Input should be a valid integer"))?,
    };
    Ok(GenRequest {
        api,
        model,
        prompt,
        max_tokens,
        stream,
        include_usage,
        priority,
    })
}

/// Approximate token count (≈4 characters a token), at least one.
pub fn count_tokens(text: &str) -> u32 {
    (text.len() as u32).div_ceil(4).max(1)
}

const WORDS: &[&str] = &[
    "the", "model", "serves", "tokens", "quickly", "and", "routing", "keeps", "latency", "low",
    "while", "adapters", "share", "one", "base", "gpu", "cache", "prefix", "batch", "queue",
];

/// Deterministic token text for token `i` of request `seed`.
pub fn token_text(seed: u64, i: u32) -> String {
    let h = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(u64::from(i).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    format!(" {}", WORDS[(h >> 33) as usize % WORDS.len()])
}

/// `usage` object.
pub fn usage(prompt: u32, completion: u32, cached: Option<u32>) -> Value {
    json!({
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": cached.map(|c| json!({"cached_tokens": c})),
    })
}

/// Identity of one response.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// A full non-streaming response.
pub fn full_response(api: Api, meta: &ResponseMeta, text: &str, usage: Value) -> Value {
    match api {
        Api::Completions => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length",
                         "stop_reason": null, "token_ids": null, "prompt_logprobs": null, "prompt_token_ids": null}],
            "service_tier": null, "system_fingerprint": null, "usage": usage, "kv_transfer_params": null,
        }),
        Api::Chat => json!({
            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null,
                          "annotations": null, "audio": null, "function_call": null, "tool_calls": [],
                          "reasoning_content": null},
                         "logprobs": null, "finish_reason": "length", "stop_reason": null, "token_ids": null}],
            "service_tier": null, "system_fingerprint": null, "usage": usage,
            "prompt_logprobs": null, "prompt_token_ids": null, "kv_transfer_params": null,
        }),
    }
}

/// One SSE chunk carrying `text` (and, for chat, the role on the first chunk).
pub fn stream_chunk(api: Api, meta: &ResponseMeta, text: &str, role: bool, finish: bool) -> Value {
    let finish_reason = if finish { json!("length") } else { Value::Null };
    match api {
        Api::Completions => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason,
                         "stop_reason": null}],
        }),
        Api::Chat => {
            let delta = if role {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            json!({
                "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
            })
        }
    }
}

/// The final usage-only chunk (`stream_options.include_usage`).
pub fn usage_chunk(api: Api, meta: &ResponseMeta, usage: Value) -> Value {
    let object = match api {
        Api::Completions => "text_completion",
        Api::Chat => "chat.completion.chunk",
    };
    json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model,
           "choices": [], "usage": usage})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_and_completions() {
        let r = parse_request(
            Api::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(r.max_tokens, Some(3));
        assert!(r.stream && r.include_usage);
        assert!(r.prompt.contains("hi"));
        let r = parse_request(Api::Completions, br#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(r.prompt, "a b");
        assert_eq!(
            parse_request(Api::Completions, b"{nope")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse_request(Api::Chat, br#"{"model":"m"}"#)
                .unwrap_err()
                .message,
            "messages: Field required"
        );
    }

    #[test]
    fn error_body_shape() {
        let e = ApiError::model_not_found("nope");
        let v: Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["message"], "The model `nope` does not exist.");
        assert_eq!(v["error"]["type"], "NotFoundError");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], 404);
    }
}
