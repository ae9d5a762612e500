//! Prometheus text-format helpers shared by the simulator's hand-written metrics pages.

/// Escapes a label value (backslash, double quote, newline), as prometheus_client does.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
