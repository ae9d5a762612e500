//! Classification of vLLM's load/unload answers into done, already-so, or failed for one adapter.

/// What a load or unload answer means for the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The change was made.
    Done,
    /// Nothing to do: already loaded (load) or already absent (unload).
    AlreadySo,
    /// This adapter failed (bad path, broken weights, rejected); retry it later with backoff
    /// while other adapters proceed.
    AdapterFailed { status: u16, message: String },
    /// The server itself is unavailable or broken (5xx not about the adapter, 404 route
    /// missing because runtime updating is off): retry the whole reconcile.
    ServerUnavailable { status: u16, message: String },
}

/// The `error.message` of a vLLM JSON error, or the raw body.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.get("message"))
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .or_else(|| v.get("detail").map(|d| d.to_string()))
        })
        .unwrap_or_else(|| body.trim().chars().take(500).collect())
}

fn is_route_missing(status: u16, body: &str) -> bool {
    status == 404 && body.contains("\"detail\"")
}

/// Classifies the answer to `POST /v1/load_lora_adapter`.
pub fn classify_load(status: u16, body: &str) -> Outcome {
    let message = error_message(body);
    match status {
        200..=299 => Outcome::Done,
        400 if message.contains("has already been loaded") => Outcome::AlreadySo,
        _ if is_route_missing(status, body) => Outcome::ServerUnavailable {
            status,
            message: format!(
                "{message} (the server has no runtime LoRA API: set VLLM_ALLOW_RUNTIME_LORA_UPDATING=true on vLLM)"
            ),
        },
        // vLLM reports adapter problems as 404 (no adapter at path) and 500 (worker failed).
        400 | 404 | 422 => Outcome::AdapterFailed { status, message },
        500 if message.contains("add_lora")
            || message.contains("LoRA")
            || message.contains("lora") =>
        {
            Outcome::AdapterFailed { status, message }
        }
        _ => Outcome::ServerUnavailable { status, message },
    }
}

/// Classifies the answer to `POST /v1/unload_lora_adapter`.
pub fn classify_unload(status: u16, body: &str) -> Outcome {
    let message = error_message(body);
    match status {
        200..=299 => Outcome::Done,
        _ if is_route_missing(status, body) => Outcome::ServerUnavailable {
            status,
            message: format!(
                "{message} (the server has no runtime LoRA API: set VLLM_ALLOW_RUNTIME_LORA_UPDATING=true on vLLM)"
            ),
        },
        404 => Outcome::AlreadySo,
        400 | 422 => Outcome::AdapterFailed { status, message },
        _ => Outcome::ServerUnavailable { status, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_answers() {
        assert_eq!(
            classify_load(200, "Success: LoRA adapter 'a1' added successfully."),
            Outcome::Done
        );
        assert_eq!(
            classify_load(
                400,
                r#"{"error":{"message":"The lora adapter 'a1' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.","type":"InvalidUserInput","param":null,"code":400}}"#
            ),
            Outcome::AlreadySo
        );
        assert!(matches!(
            classify_load(404, r#"{"error":{"message":"Loading lora ghost failed: No adapter found for /x","type":"NotFoundError","param":null,"code":404}}"#),
            Outcome::AdapterFailed { status: 404, ref message } if message == "Loading lora ghost failed: No adapter found for /x"
        ));
        assert!(matches!(
            classify_load(
                500,
                r#"{"error":{"message":"Call to add_lora method failed: Worker failed with error 'x'","type":"InternalServerError","param":null,"code":500}}"#
            ),
            Outcome::AdapterFailed { status: 500, .. }
        ));
        assert!(matches!(
            classify_load(503, ""),
            Outcome::ServerUnavailable { .. }
        ));
        assert!(matches!(
            classify_load(404, r#"{"detail":"Not Found"}"#),
            Outcome::ServerUnavailable { ref message, .. } if message.contains("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        ));
        assert_eq!(classify_unload(200, "Success"), Outcome::Done);
        assert_eq!(
            classify_unload(
                404,
                r#"{"error":{"message":"The lora adapter 'a2' cannot be found.","type":"NotFoundError","param":null,"code":404}}"#
            ),
            Outcome::AlreadySo
        );
        assert!(matches!(
            classify_unload(404, r#"{"detail":"Not Found"}"#),
            Outcome::ServerUnavailable { .. }
        ));
    }
}
