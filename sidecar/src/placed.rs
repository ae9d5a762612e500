//! What the sidecar loads under LoRA placement: its ConfigMap plus the catalogue adapters the EPP placed on its server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::config::{AdapterSpec, LoraConfig, Versions};
use crate::version::served_name;

/// The config the reconciler works to: `ensureExist` plus the catalogue adapters in `placed`
/// (served names: [`crate::version`]), each under its versioned name; versions of catalogue
/// adapters neither placed nor draining here, and copies under the plain id, are unloaded.
/// Sources come from this sidecar's own catalogue: the EPP names adapters, it cannot make the
/// sidecar load anything the ConfigMap does not list (a version this ConfigMap does not have
/// yet waits for kubelet to bring it). With `placed` unknown (the EPP not heard from yet)
/// catalogue adapters are left as they are. `copies`: the EPP unloads copies under the
/// plain id itself (a LoRA resolver made them for its requests), so they are left alone.
pub fn merge(base: &LoraConfig, placed: Option<&BTreeSet<String>>, copies: bool) -> LoraConfig {
    let mut c = base.clone();
    let Some(placed) = placed else {
        return c;
    };
    for a in &base.on_demand {
        let served = served_name(&a.id, &a.source);
        if placed.contains(&served) {
            c.ensure_exist.push(AdapterSpec {
                id: served,
                ..a.clone()
            });
        }
        if !copies {
            c.ensure_not_exist.push(a.clone());
        }
    }
    c.versions = Some(Versions {
        ids: base.on_demand.iter().map(|a| a.id.clone()).collect(),
        keep: placed.clone(),
        never: base.ensure_not_exist.iter().map(|a| a.id.clone()).collect(),
    });
    c
}

/// Served names the EPP dropped from this server's set, kept loaded a grace longer: another
/// EPP replica routes by a copy of the table up to a placement tick older, and a request it
/// sends by that copy must find the adapter still there.
#[derive(Debug, Default)]
pub struct Leaving {
    since: BTreeMap<String, Instant>,
}

impl Leaving {
    /// The EPP's set went from `old` to `new` at `now`.
    pub fn update(&mut self, old: Option<&BTreeSet<String>>, new: &BTreeSet<String>, now: Instant) {
        for name in old.into_iter().flatten().filter(|n| !new.contains(*n)) {
            self.since.entry(name.clone()).or_insert(now);
        }
        self.since.retain(|n, _| !new.contains(n));
    }

    /// `placed` and the names dropped less than `grace` ago (older ones are forgotten).
    pub fn kept(
        &mut self,
        placed: &BTreeSet<String>,
        now: Instant,
        grace: Duration,
    ) -> BTreeSet<String> {
        self.since.retain(|_, at| now.duration_since(*at) < grace);
        placed.iter().chain(self.since.keys()).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Actual, AdapterOp, apply, plan};

    const CFG: &str = "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: pin\n      source: /a/pin\n  ensureNotExist:\n    models:\n    - id: bad\n      source: /a/bad\n  onDemand:\n    models:\n    - id: x\n      source: /a/x\n    - id: y\n      source: /a/y\n    - id: bad\n      source: /a/bad\n";

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn placed_adapters_load_others_unload_and_the_epp_cannot_add_any() {
        let base = crate::parse(CFG, true).unwrap();
        let (x, y) = (served_name("x", "/a/x"), served_name("y", "/a/y"));
        let bad = served_name("bad", "/a/bad");
        let placed = set(&[&x, &bad, "/etc/passwd", "bad"]);
        let c = merge(&base, Some(&placed), false);
        let mut actual = Actual::default();
        for (id, src) in [
            (y.as_str(), "/a/y"),
            ("bad", "/a/bad"),
            ("other", "/o"),
            ("x", "/a/x"),
        ] {
            actual.adapters.insert(id.to_string(), src.into());
        }
        let ops = plan(&c, &actual);
        assert!(ops.contains(&AdapterOp::Load {
            id: x.clone(),
            source: "/a/x".into(),
            inplace: false
        }));
        assert!(ops.contains(&AdapterOp::Unload { id: y.clone() }));
        assert!(
            ops.contains(&AdapterOp::Unload { id: "bad".into() }),
            "ensureNotExist wins"
        );
        assert!(
            ops.contains(&AdapterOp::Unload { id: "x".into() }),
            "a copy under the plain id (loaded before versions) goes"
        );
        assert!(
            ops.iter()
                .all(|o| o.id() != "other" && o.id() != "/etc/passwd" && o.id() != bad)
        );
        // Not heard from the EPP: catalogue adapters are left alone.
        let ops = plan(&merge(&base, None, false), &actual);
        assert!(ops.iter().all(|o| o.id() != y && o.id() != x), "{ops:?}");
        // The EPP unloads on-demand copies (plain ids) itself: left alone, versions not.
        let ops = plan(&merge(&base, Some(&placed), true), &actual);
        assert!(ops.iter().all(|o| o.id() != "x"), "{ops:?}");
        assert!(ops.contains(&AdapterOp::Unload { id: y.clone() }));
        assert!(ops.contains(&AdapterOp::Unload { id: "bad".into() }));
    }

    #[test]
    fn a_new_source_loads_beside_the_old_which_stays_while_draining() {
        let v1 = crate::parse(CFG, true).unwrap();
        let v2 = crate::parse(
            &CFG.replace("/a/x\n    - id: y", "/a/x2\n    - id: y"),
            true,
        )
        .unwrap();
        let (old, new) = (served_name("x", "/a/x"), served_name("x", "/a/x2"));
        let mut actual = Actual::default();
        actual.adapters.insert("pin".into(), "/a/pin".into());
        actual.adapters.insert(old.clone(), "/a/x".into());
        // The EPP places the new version and drains the old one: both stay.
        let both = set(&[&new, &old]);
        let ops = plan(&merge(&v2, Some(&both), false), &actual);
        assert_eq!(
            ops,
            vec![AdapterOp::Load {
                id: new.clone(),
                source: "/a/x2".into(),
                inplace: false
            }]
        );
        let actual = apply(&actual, &ops);
        // The drain ended: the old version unloads; nothing reloads in place.
        let ops = plan(&merge(&v2, Some(&set(&[&new])), false), &actual);
        assert_eq!(ops, vec![AdapterOp::Unload { id: old.clone() }]);
        // Moved to ensureNotExist: every version goes, whatever the EPP still drains.
        let never = crate::parse(
            &CFG.replace(
                "    - id: bad\n      source: /a/bad\n  onDemand",
                "    - id: bad\n      source: /a/bad\n    - id: x\n      source: /a/x2\n  onDemand",
            ),
            true,
        )
        .unwrap();
        let ops = plan(&merge(&never, Some(&both), false), &actual);
        assert_eq!(
            ops,
            vec![
                AdapterOp::Unload { id: new.clone() },
                AdapterOp::Unload { id: old.clone() }
            ]
        );
        // This sidecar's ConfigMap lags the EPP's: it cannot load the new version, keeps
        // the old one the EPP still drains, and loads nothing it was not given a source for.
        let mut actual = Actual::default();
        actual.adapters.insert("pin".into(), "/a/pin".into());
        actual.adapters.insert(old.clone(), "/a/x".into());
        assert!(plan(&merge(&v1, Some(&both), false), &actual).is_empty());
    }
}

#[cfg(test)]
mod leaving_tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_dropped_name_stays_a_grace_longer_unless_placed_again() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let mut l = Leaving::default();
        let (ab, b) = (set(&["a", "b"]), set(&["b"]));
        l.update(None, &ab, t0);
        assert_eq!(l.kept(&ab, t0, grace), ab);
        l.update(Some(&ab), &b, t0 + Duration::from_secs(1));
        assert_eq!(
            l.kept(&b, t0 + Duration::from_secs(2), grace),
            ab,
            "a lingers"
        );
        // Dropped again later: the grace runs from the first drop.
        l.update(Some(&b), &b, t0 + Duration::from_secs(3));
        assert_eq!(l.kept(&b, t0 + Duration::from_secs(4), grace), b, "a goes");
        // Placed again while leaving: no longer leaving.
        l.update(Some(&b), &set(&[]), t0 + Duration::from_secs(5));
        l.update(Some(&set(&[])), &b, t0 + Duration::from_secs(6));
        assert_eq!(l.kept(&b, t0 + Duration::from_secs(6), grace), b);
        assert_eq!(l.kept(&b, t0 + Duration::from_secs(20), grace), b);
    }
}
