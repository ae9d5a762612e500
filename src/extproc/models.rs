//! `GET /v1/models` through the gateway: the pool's union (model rules, catalogue adapters, what any server lists) in OpenAI's format, answered by the EPP.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HeaderMutation, ImmediateResponse, ProcessingResponse, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use serde_json::json;

use super::proto::set_header;
use crate::pool::state::Shared;

/// Is this `/v1/models` (any query string)?
pub(super) fn is_models_path(path: &str) -> bool {
    path.split('?').next() == Some("/v1/models")
}

/// The union, as `{"object": "list", "data": [...]}`: base models, adapters (with their base
/// as `parent`), then model rules' names (with their first target as `root`).
pub(super) fn models_answer(shared: &Shared) -> ProcessingResponse {
    let snap = shared.snapshot.load();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // id -> (root, parent)
    let mut models: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
    let mut base: Option<String> = None;
    for h in &snap.endpoints {
        if let Some(m) = h.models.load().as_ref() {
            for b in &m.base {
                base.get_or_insert_with(|| b.clone());
                models.entry(b.clone()).or_insert((b.clone(), None));
            }
        }
    }
    let mut adapter = |id: &str, root: &str| {
        models
            .entry(id.to_string())
            .or_insert_with(|| (root.to_string(), base.clone()));
    };
    // Versions of catalogue adapters are shown by their id: clients ask for the id.
    let table = shared.fleet.table.load_full();
    let id_of = |name: &str| -> String {
        table
            .as_ref()
            .map_or(name, |t| t.table.shown(name))
            .to_string()
    };
    if let Some(t) = table.as_ref() {
        for (id, served) in &t.table.served {
            adapter(id, t.table.sources.get(served).map_or(served, |s| s));
        }
    }
    for h in &snap.endpoints {
        if let Some(m) = h.models.load().as_ref() {
            for a in &m.adapters {
                adapter(&id_of(a), a);
            }
        }
    }
    for name in snap.rules.model_names() {
        let root = snap
            .rules
            .targets_of(name)
            .and_then(|t| t.into_iter().next().map(|(n, _)| n))
            .unwrap_or_else(|| name.to_string());
        models.entry(name.to_string()).or_insert((root, None));
    }
    let data: Vec<serde_json::Value> = models
        .into_iter()
        .map(|(id, (root, parent))| {
            json!({"id": id, "object": "model", "created": created, "owned_by": "vllm",
                   "root": root, "parent": parent, "permission": []})
        })
        .collect();
    let body = json!({"object": "list", "data": data}).to_string();
    let headers: Vec<HeaderValueOption> = vec![set_header("content-type", "application/json")];
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus { code: 200 }),
                headers: Some(HeaderMutation {
                    set_headers: headers,
                    ..Default::default()
                }),
                body: body.into_bytes(),
                details: "epp_models_union".into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}
