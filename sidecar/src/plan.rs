//! Desired-vs-actual planning: which adapters to load, reload in place, or unload.

use std::collections::BTreeMap;

use crate::config::LoraConfig;

/// Adapters the server reports (`/v1/models` entries with a `parent`): id -> `root` (the path
/// it was loaded from), in the server's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    pub adapters: BTreeMap<String, String>,
    /// Base model entries (`parent: null`): ids and roots.
    pub base_models: Vec<String>,
}

/// One change to make on the server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum AdapterOp {
    /// Load `id` from `source`; `inplace` replaces the weights of an already loaded adapter
    /// whose source changed (a new version).
    Load {
        id: String,
        source: String,
        inplace: bool,
    },
    /// Unload `id`.
    Unload { id: String },
}

impl AdapterOp {
    /// The adapter this op is about.
    pub fn id(&self) -> &str {
        match self {
            AdapterOp::Load { id, .. } | AdapterOp::Unload { id } => id,
        }
    }
}

/// `a.id` is the served name [`crate::version::served_name`] gives `a.source`.
fn names_its_source(a: &crate::AdapterSpec) -> bool {
    crate::version::id_of(&a.id)
        .is_some_and(|id| crate::version::served_name(id, &a.source) == a.id)
}

/// The ops that bring `actual` to what `config` asks for. Adapters in neither list are never
/// touched. Loads come before unloads so a rename keeps serving throughout.
pub fn plan(config: &LoraConfig, actual: &Actual) -> Vec<AdapterOp> {
    let mut ops = Vec::new();
    for a in &config.ensure_exist {
        match actual.adapters.get(&a.id) {
            None => ops.push(AdapterOp::Load {
                id: a.id.clone(),
                source: a.source.clone(),
                inplace: false,
            }),
            // A versioned name is its source's (the tag is the source's hash): loaded from
            // another path (a LoRA resolver's link to it) it is the same version.
            Some(root) if *root != a.source && !names_its_source(a) => ops.push(AdapterOp::Load {
                id: a.id.clone(),
                source: a.source.clone(),
                inplace: true,
            }),
            Some(_) => {}
        }
    }
    for a in &config.ensure_not_exist {
        if actual.adapters.contains_key(&a.id) {
            ops.push(AdapterOp::Unload { id: a.id.clone() });
        }
    }
    if let Some(v) = &config.versions {
        let wanted = config.desired();
        for name in actual.adapters.keys() {
            // Every version of an `ensureNotExist` id goes; a catalogue adapter's versions
            // go unless placed or draining here.
            let id = crate::version::id_of(name);
            let stale = id.is_some_and(|id| v.never.contains(id))
                || (id.is_some_and(|id| v.ids.contains(id))
                    && !v.keep.contains(name)
                    && !wanted.contains_key(name.as_str()));
            if stale && !ops.iter().any(|o| o.id() == name) {
                ops.push(AdapterOp::Unload { id: name.clone() });
            }
        }
    }
    ops
}

/// Applies `ops` to `actual` as a server that accepts them would (for tests and dry runs).
pub fn apply(actual: &Actual, ops: &[AdapterOp]) -> Actual {
    let mut out = actual.clone();
    for op in ops {
        match op {
            AdapterOp::Load { id, source, .. } => {
                out.adapters.insert(id.clone(), source.clone());
            }
            AdapterOp::Unload { id } => {
                out.adapters.remove(id);
            }
        }
    }
    out
}

/// Whether `actual` satisfies `config`: every `ensureExist` adapter present with its source,
/// no `ensureNotExist` adapter present.
pub fn satisfied(config: &LoraConfig, actual: &Actual) -> bool {
    plan(config, actual).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdapterSpec;
    use proptest::prelude::*;

    fn spec(id: &str, source: &str) -> AdapterSpec {
        AdapterSpec {
            id: id.into(),
            source: source.into(),
            base_model: None,
            rank: None,
        }
    }

    fn config(exist: Vec<AdapterSpec>, not_exist: Vec<AdapterSpec>) -> LoraConfig {
        LoraConfig {
            on_demand: Vec::new(),
            name: None,
            host: "localhost".into(),
            port: 8000,
            default_base_model: None,
            ensure_exist: exist,
            ensure_not_exist: not_exist,
            conflicts: vec![],
            versions: None,
        }
    }

    #[test]
    fn loads_missing_reloads_changed_unloads_unwanted_leaves_others() {
        let c = config(
            vec![spec("a", "/a"), spec("b", "/b2")],
            vec![spec("old", "/old")],
        );
        let actual = Actual {
            adapters: [("b", "/b1"), ("old", "/old"), ("foreign", "/f")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            base_models: vec![],
        };
        let ops = plan(&c, &actual);
        assert_eq!(
            ops,
            vec![
                AdapterOp::Load {
                    id: "a".into(),
                    source: "/a".into(),
                    inplace: false
                },
                AdapterOp::Load {
                    id: "b".into(),
                    source: "/b2".into(),
                    inplace: true
                },
                AdapterOp::Unload { id: "old".into() },
            ]
        );
        let after = apply(&actual, &ops);
        assert!(satisfied(&c, &after));
        assert_eq!(
            after.adapters.get("foreign").map(String::as_str),
            Some("/f")
        );
    }

    fn ids() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c", "d", "e", "f"]).prop_map(str::to_string)
    }
    fn sources() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["/s1", "/s2"]).prop_map(str::to_string)
    }

    proptest! {
        #[test]
        fn plan_reaches_desired_and_is_idempotent(
            exist in prop::collection::btree_map(ids(), sources(), 0..5),
            not_exist in prop::collection::btree_set(ids(), 0..5),
            actual in prop::collection::btree_map(ids(), sources(), 0..6),
        ) {
            let exist: Vec<AdapterSpec> = exist.iter().filter(|(id, _)| !not_exist.contains(*id)).map(|(i, s)| spec(i, s)).collect();
            let not_exist: Vec<AdapterSpec> = not_exist.iter().map(|i| spec(i, "/x")).collect();
            let c = config(exist.clone(), not_exist.clone());
            let actual = Actual { adapters: actual, base_models: vec![] };
            let ops = plan(&c, &actual);
            let after = apply(&actual, &ops);
            // Desired state reached.
            for a in &exist {
                prop_assert_eq!(after.adapters.get(&a.id), Some(&a.source));
            }
            for a in &not_exist {
                prop_assert!(!after.adapters.contains_key(&a.id));
            }
            // Unmanaged adapters untouched.
            for (id, src) in &actual.adapters {
                let managed = exist.iter().chain(not_exist.iter()).any(|a| &a.id == id);
                if !managed {
                    prop_assert_eq!(after.adapters.get(id), Some(src));
                }
            }
            // A satisfied server needs nothing.
            prop_assert!(plan(&c, &after).is_empty());
            // Each adapter appears in at most one op.
            let mut seen = std::collections::BTreeSet::new();
            for op in &ops {
                prop_assert!(seen.insert(op.id().to_string()));
            }
        }
    }
}
