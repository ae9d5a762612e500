//! Parsing vLLM's `/v1/models` listing into base models and adapters.

use serde::Deserialize;
use thiserror::Error;

use crate::plan::Actual;

/// `/v1/models` could not be understood.
#[derive(Debug, Error)]
#[error("unexpected /v1/models body: {0}")]
pub struct ModelsError(#[from] serde_json::Error);

#[derive(Debug, Deserialize)]
struct Entry {
    id: String,
    #[serde(default)]
    root: Option<String>,
    #[serde(default)]
    parent: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Listing {
    data: Vec<Entry>,
}

/// Splits a `/v1/models` body into base models (`parent: null`) and adapters (id -> root).
pub fn parse_models(body: &[u8]) -> Result<Actual, ModelsError> {
    let listing: Listing = serde_json::from_slice(body)?;
    let mut actual = Actual::default();
    for e in listing.data {
        match e.parent {
            Some(_) => {
                actual.adapters.insert(e.id, e.root.unwrap_or_default());
            }
            None => {
                actual.base_models.push(e.id);
                if let Some(r) = e.root {
                    actual.base_models.push(r);
                }
            }
        }
    }
    Ok(actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_base_and_adapters() {
        let body = br#"{"object":"list","data":[
            {"id":"base","object":"model","root":"/models/base","parent":null,"max_model_len":4096},
            {"id":"a1","object":"model","root":"/adapters/a1","parent":"base","max_model_len":null}]}"#;
        let a = parse_models(body).unwrap();
        assert_eq!(a.base_models, ["base", "/models/base"]);
        assert_eq!(
            a.adapters.get("a1").map(String::as_str),
            Some("/adapters/a1")
        );
        assert!(parse_models(b"{}").is_err());
    }
}
