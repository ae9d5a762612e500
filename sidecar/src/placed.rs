//! What the sidecar loads under LoRA placement: its ConfigMap plus the catalogue adapters the EPP placed on its server.

use std::collections::BTreeSet;

use crate::config::LoraConfig;

/// The config the reconciler works to: `ensureExist` plus the catalogue adapters in `placed`,
/// `ensureNotExist` plus the catalogue adapters not in it. Sources come from this sidecar's
/// own catalogue: the EPP names adapters, it cannot make the sidecar load anything the
/// ConfigMap does not list. With `placed` unknown (the EPP not heard from yet) catalogue
/// adapters are left as they are.
pub fn merge(base: &LoraConfig, placed: Option<&BTreeSet<String>>) -> LoraConfig {
    let mut c = base.clone();
    let Some(placed) = placed else {
        return c;
    };
    for a in &base.on_demand {
        if placed.contains(&a.id) {
            c.ensure_exist.push(a.clone());
        } else {
            c.ensure_not_exist.push(a.clone());
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Actual, AdapterOp, plan};

    const CFG: &str = "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: pin\n      source: /a/pin\n  ensureNotExist:\n    models:\n    - id: bad\n      source: /a/bad\n  onDemand:\n    models:\n    - id: x\n      source: /a/x\n    - id: y\n      source: /a/y\n    - id: bad\n      source: /a/bad\n";

    #[test]
    fn placed_adapters_load_others_unload_and_the_epp_cannot_add_any() {
        let base = crate::parse(CFG, true).unwrap();
        let placed: BTreeSet<String> = ["x", "bad", "/etc/passwd"].map(String::from).into();
        let c = merge(&base, Some(&placed));
        let mut actual = Actual::default();
        actual.adapters.insert("y".into(), "/a/y".into());
        actual.adapters.insert("bad".into(), "/a/bad".into());
        actual.adapters.insert("other".into(), "/o".into());
        let ops = plan(&c, &actual);
        assert!(ops.contains(&AdapterOp::Load {
            id: "x".into(),
            source: "/a/x".into(),
            inplace: false
        }));
        assert!(ops.contains(&AdapterOp::Unload { id: "y".into() }));
        assert!(
            ops.contains(&AdapterOp::Unload { id: "bad".into() }),
            "ensureNotExist wins"
        );
        assert!(
            ops.iter()
                .all(|o| o.id() != "other" && o.id() != "/etc/passwd")
        );
        // Not heard from the EPP: catalogue adapters are left alone.
        let ops = plan(&merge(&base, None), &actual);
        assert!(
            ops.iter().all(|o| o.id() != "y" && o.id() != "x"),
            "{ops:?}"
        );
    }
}
