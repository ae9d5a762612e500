//! Response-side reading: token usage from JSON or SSE bodies, and the model name put back.

use serde_json::Value;

/// Most response bytes kept to find `usage` (a non-streaming body is small; SSE keeps the tail).
const KEEP: usize = 256 * 1024;

/// Collects a response body (bounded) and extracts `usage` at the end.
#[derive(Debug, Default)]
pub struct UsageParser {
    buf: Vec<u8>,
}

impl UsageParser {
    pub fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > KEEP {
            // Usage comes last in a stream; keep the tail.
            let cut = self.buf.len() - KEEP;
            self.buf.drain(..cut);
        }
    }

    /// `(prompt_tokens, completion_tokens)` if the body reported usage.
    pub fn finish(self) -> Option<(u64, u64)> {
        let text = String::from_utf8_lossy(&self.buf);
        let of = |v: &Value| -> Option<(u64, u64)> {
            let u = v.get("usage")?;
            Some((
                u.get("prompt_tokens")?.as_u64()?,
                u.get("completion_tokens")?.as_u64().unwrap_or(0),
            ))
        };
        if let Ok(v) = serde_json::from_str::<Value>(text.trim()) {
            return of(&v);
        }
        text.lines()
            .rev()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|v| of(&v))
    }
}

/// Puts the client's model name back into a response chunk (`"model":"<target>"`).
pub fn restore_model(chunk: &[u8], target: &str, requested: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(chunk);
    let t = serde_json::to_string(target).unwrap_or_default();
    let r = serde_json::to_string(requested).unwrap_or_default();
    text.replace(&format!("\"model\":{t}"), &format!("\"model\":{r}"))
        .replace(&format!("\"model\": {t}"), &format!("\"model\": {r}"))
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_sse_usage() {
        let mut p = UsageParser::default();
        p.feed(br#"{"id":"x","usage":{"prompt_tokens":5,"#);
        p.feed(br#""completion_tokens":7,"total_tokens":12}}"#);
        assert_eq!(p.finish(), Some((5, 7)));
        let mut p = UsageParser::default();
        p.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        p.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
        assert_eq!(p.finish(), Some((3, 2)));
        assert_eq!(UsageParser::default().finish(), None);
    }

    #[test]
    fn model_restored() {
        let out = restore_model(br#"{"model":"fr-1","x":1}"#, "fr-1", "fr");
        assert_eq!(out, br#"{"model":"fr","x":1}"#);
    }
}
