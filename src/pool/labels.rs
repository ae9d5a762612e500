//! How client-chosen names appear in metrics and logs: bounded, whatever clients send.

use super::state::PoolSnapshot;

/// The metric label of every model name no rule and no server knows.
pub const OTHER_MODEL: &str = "other";
/// Longest client-chosen value (model name, request id) written into a log line.
const LOG_VALUE_MAX: usize = 128;

/// `s` cut to [`LOG_VALUE_MAX`] bytes at a character boundary, for logs.
pub fn for_log(s: &str) -> &str {
    if s.len() <= LOG_VALUE_MAX {
        return s;
    }
    let mut end = LOG_VALUE_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The metric label for a model name: itself when a rule names or targets it or a server of
/// the pool lists it, else [`OTHER_MODEL`].
pub fn model_label(snap: &PoolSnapshot, name: &str) -> String {
    let known = name.is_empty()
        || snap.rules.knows(name)
        || snap.rules.targets(name)
        || snap
            .endpoints
            .iter()
            .any(|h| h.models.load().as_ref().is_some_and(|m| m.contains(name)));
    if known {
        name.to_string()
    } else {
        OTHER_MODEL.to_string()
    }
}
