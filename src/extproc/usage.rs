//! Response-side reading: token usage from JSON or SSE bodies, and the model name put back.

use serde::Deserialize;

/// The one field read from a response object; serde skips every other field without building
/// it (a whole `Value` tree of a completion cost ~10 % of the EPP's CPU per request).
#[derive(Deserialize)]
struct WithUsage {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: Option<u64>,
}

/// `(prompt_tokens, completion_tokens)` of one JSON object, if it reports usage.
fn usage_of(json: &[u8]) -> Result<Option<(u64, u64)>, serde_json::Error> {
    let w: WithUsage = serde_json::from_slice(json)?;
    Ok(w.usage
        .map(|u| (u.prompt_tokens, u.completion_tokens.unwrap_or(0))))
}

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
        if let Ok(u) = usage_of(&self.buf) {
            return u;
        }
        // Server-sent events: the last `data:` object that reports usage.
        self.buf
            .split(|&b| b == b'\n')
            .rev()
            .filter_map(|l| l.strip_prefix(b"data:"))
            .map(<[u8]>::trim_ascii)
            .filter(|d| *d != b"[DONE]")
            .find_map(|d| usage_of(d).ok().flatten())
    }
}

/// Puts the client's model name back into a response body (`"model":"<target>"` ->
/// `"model":"<requested>"`), chunk by chunk. Works on bytes, so a character split between
/// chunks passes through intact, and holds back a chunk's tail while it could be the start of
/// the pattern, so a pattern split between chunks is still found.
#[derive(Debug)]
pub struct ModelRestorer {
    /// (pattern, replacement) pairs: with and without a space after the colon.
    pairs: [(Vec<u8>, Vec<u8>); 2],
    carry: Vec<u8>,
}

impl ModelRestorer {
    pub fn new(target: &str, requested: &str) -> Self {
        let t = serde_json::to_string(target).unwrap_or_default();
        let r = serde_json::to_string(requested).unwrap_or_default();
        let pair = |sep: &str| {
            (
                format!("\"model\":{sep}{t}").into_bytes(),
                format!("\"model\":{sep}{r}").into_bytes(),
            )
        };
        Self {
            pairs: [pair(""), pair(" ")],
            carry: Vec::new(),
        }
    }

    /// The rewritten bytes of `chunk` that are final; the rest waits for the next chunk
    /// (all of it is returned when `end` is set).
    pub fn feed(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            let Some(q) = memchr::memchr(b'"', &data[i..]) else {
                out.extend_from_slice(&data[i..]);
                break;
            };
            out.extend_from_slice(&data[i..i + q]);
            i += q;
            let rest = &data[i..];
            if let Some((from, to)) = self.pairs.iter().find(|(f, _)| rest.starts_with(f)) {
                out.extend_from_slice(to);
                i += from.len();
                continue;
            }
            if !end && self.pairs.iter().any(|(f, _)| f.starts_with(rest)) {
                // Could be the pattern cut by the chunk boundary: decide with the next chunk.
                self.carry = rest.to_vec();
                return out;
            }
            out.push(b'"');
            i += 1;
        }
        out
    }
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
    fn usage_edge_cases() {
        let finish = |body: &[u8]| {
            let mut p = UsageParser::default();
            p.feed(body);
            p.finish()
        };
        // Whitespace around the object, nested objects and arrays skipped, fields in any order.
        assert_eq!(
            finish(b"\n {\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":9}}\n"),
            Some((9, 2))
        );
        // Missing completion_tokens counts as 0; null or incomplete usage reports nothing.
        assert_eq!(finish(br#"{"usage":{"prompt_tokens":4}}"#), Some((4, 0)));
        assert_eq!(finish(br#"{"usage":null}"#), None);
        assert_eq!(finish(br#"{"usage":{"completion_tokens":4}}"#), None);
        assert_eq!(finish(br#"{"error":{"message":"no"}}"#), None);
        // SSE with CRLF line ends; a later chunk without usage does not hide an earlier one.
        assert_eq!(
            finish(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\r\n\r\ndata: {\"choices\":[]}\r\n\r\ndata: [DONE]\r\n\r\n"),
            Some((1, 1))
        );
    }

    #[test]
    fn model_restored() {
        let mut r = ModelRestorer::new("fr-1", "fr");
        assert_eq!(
            r.feed(br#"{"model":"fr-1","x":1}"#, true),
            br#"{"model":"fr","x":1}"#
        );
        let mut r = ModelRestorer::new("fr-1", "fr");
        assert_eq!(
            r.feed(br#"{"model": "fr-1", "y": "fr-10"}"#, true),
            br#"{"model": "fr", "y": "fr-10"}"#
        );
    }

    /// Every split point of a body with multi-byte characters and the pattern, in two and
    /// three chunks: the output is always the one-chunk rewrite.
    #[test]
    fn restore_at_every_split() {
        let body = "data: {\"model\":\"food-review-1\",\"text\":\"中文 ünï \\\"q\\\" 😀\"}\n\ndata: {\"model\": \"food-review-1\"}\n\n";
        let want = body.replace("food-review-1", "food-review");
        let bytes = body.as_bytes();
        for i in 0..=bytes.len() {
            let mut r = ModelRestorer::new("food-review-1", "food-review");
            let mut out = r.feed(&bytes[..i], false);
            out.extend(r.feed(&bytes[i..], true));
            assert_eq!(String::from_utf8(out).unwrap(), want, "split at {i}");
            for j in i..=bytes.len() {
                let mut r = ModelRestorer::new("food-review-1", "food-review");
                let mut out = r.feed(&bytes[..i], false);
                out.extend(r.feed(&bytes[i..j], false));
                out.extend(r.feed(&bytes[j..], true));
                assert_eq!(String::from_utf8(out).unwrap(), want, "split at {i}, {j}");
            }
        }
    }
}
