//! The catalogue placement decides about, read from the sidecars' ConfigMap: ids, sources, ranks and the versioned names servers serve them under.

use inferlane_epp::fleet::{Catalogue, DEFAULT_RANK, Entry};
use inferlane_sidecar::LoraConfig;

/// The catalogue id `name` (a served name, or a plain id) is a version of, if any.
pub fn catalogue_id<'a>(cat: &Catalogue, name: &'a str) -> Option<&'a str> {
    let id = if cat.on_demand.contains_key(name) {
        name
    } else {
        inferlane_sidecar::version::id_of(name)?
    };
    cat.on_demand.contains_key(id).then_some(id)
}

/// The catalogue placement decides about, from the sidecars' ConfigMap. `versioned`: each
/// source is served under its own name (off with lazy loading: a LoRA resolver loads the
/// name a request asks for from its folder).
pub fn catalogue(cfg: &LoraConfig, versioned: bool) -> Catalogue {
    Catalogue {
        on_demand: cfg
            .on_demand
            .iter()
            .map(|a| {
                let served = if versioned {
                    inferlane_sidecar::version::served_name(&a.id, &a.source)
                } else {
                    a.id.clone()
                };
                (
                    a.id.clone(),
                    Entry {
                        id: a.id.clone(),
                        source: a.source.clone(),
                        rank: a.rank.unwrap_or(DEFAULT_RANK),
                        served,
                    },
                )
            })
            .collect(),
        pinned: cfg.ensure_exist.iter().map(|a| a.id.clone()).collect(),
        never: cfg.ensure_not_exist.iter().map(|a| a.id.clone()).collect(),
    }
}
