//! What the sidecar loads under LoRA placement: its ConfigMap plus the catalogue adapters the EPP placed on its server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::config::{AdapterSpec, LoraConfig, Versions};
use crate::version::served_name;

/// Who unloads the on-demand copies a server's LoRA resolver made for the EPP's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Copies {
    /// No resolver copies (`--lora-cold-adapters registered`): a catalogue adapter under its
    /// plain id is stale and unloaded here.
    #[default]
    None,
    /// The EPP unloads copies under the plain id; they are left alone here.
    Plain,
    /// Copies are served under the current version's name (`--lora-copy-names
    /// versioned`): that name is left alone where it is no home (a copy, or a dropped home
    /// serving on as one), and the EPP unloads it once idle; older versions still go here.
    Versioned,
}

/// The config the reconciler works to: `ensureExist` plus the catalogue adapters in `placed`
/// (served names: [`crate::version`]), each under its versioned name; versions of catalogue
/// adapters neither placed nor draining here, and copies under the plain id, are unloaded.
/// Sources come from this sidecar's own catalogue: the EPP names adapters, it cannot make the
/// sidecar load anything the ConfigMap does not list (a version this ConfigMap does not have
/// yet waits for kubelet to bring it). With `placed` unknown (the EPP not heard from yet)
/// catalogue adapters are left as they are. `leaving`: names dropped from `placed` a grace
/// ago ([`Leaving`]), kept loaded; loaded again too if missing, except with versioned copies
/// (the EPP unloads a dropped home itself then, as a copy, once nothing runs it). `copies`:
/// which names the EPP's on-demand copies use, left alone here ([`Copies`]).
pub fn merge(
    base: &LoraConfig,
    placed: Option<&BTreeSet<String>>,
    leaving: &BTreeSet<String>,
    copies: Copies,
) -> LoraConfig {
    let mut c = base.clone();
    let Some(placed) = placed else {
        return c;
    };
    let mut keep: BTreeSet<String> = placed.union(leaving).cloned().collect();
    let load = |name: &String| {
        placed.contains(name) || (copies != Copies::Versioned && leaving.contains(name))
    };
    for a in &base.on_demand {
        let served = served_name(&a.id, &a.source);
        if load(&served) {
            c.ensure_exist.push(AdapterSpec {
                id: served.clone(),
                ..a.clone()
            });
        }
        match copies {
            Copies::None => c.ensure_not_exist.push(a.clone()),
            Copies::Plain => {}
            Copies::Versioned => {
                keep.insert(served);
            }
        }
    }
    c.versions = Some(Versions {
        ids: base.on_demand.iter().map(|a| a.id.clone()).collect(),
        keep,
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

    /// The names dropped less than `grace` ago (older ones are forgotten).
    pub fn names(&mut self, now: Instant, grace: Duration) -> BTreeSet<String> {
        self.since.retain(|_, at| now.duration_since(*at) < grace);
        self.since.keys().cloned().collect()
    }

    /// The names dropped less than `age` ago, forgetting none.
    pub fn within(&self, now: Instant, age: Duration) -> BTreeSet<String> {
        self.since
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) < age)
            .map(|(n, _)| n.clone())
            .collect()
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
        let c = merge(&base, Some(&placed), &BTreeSet::new(), Copies::None);
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
        let ops = plan(&merge(&base, None, &BTreeSet::new(), Copies::None), &actual);
        assert!(ops.iter().all(|o| o.id() != y && o.id() != x), "{ops:?}");
        // The EPP unloads on-demand copies (plain ids) itself: left alone, versions not.
        let ops = plan(
            &merge(&base, Some(&placed), &BTreeSet::new(), Copies::Plain),
            &actual,
        );
        assert!(ops.iter().all(|o| o.id() != "x"), "{ops:?}");
        assert!(ops.contains(&AdapterOp::Unload { id: y.clone() }));
        assert!(ops.contains(&AdapterOp::Unload { id: "bad".into() }));
        // Versioned copies: the current version where it is no home is a copy the EPP
        // unloads; an older version of it still goes, and so does ensureNotExist.
        let old_y = served_name("y", "/a/y-old");
        actual.adapters.insert(old_y.clone(), "/a/y-old".into());
        let ops = plan(
            &merge(&base, Some(&placed), &BTreeSet::new(), Copies::Versioned),
            &actual,
        );
        assert!(ops.iter().all(|o| o.id() != y && o.id() != "x"), "{ops:?}");
        assert!(ops.contains(&AdapterOp::Unload { id: old_y }));
        assert!(ops.contains(&AdapterOp::Unload { id: "bad".into() }));
        // Placed where a resolver holds its version (loaded from a link to its source): the
        // name is the version, nothing is read again; an unversioned name still reloads.
        actual.adapters.insert(x.clone(), format!("/resolver/{x}"));
        actual
            .adapters
            .insert("pin".into(), "/elsewhere/pin".into());
        let ops = plan(
            &merge(&base, Some(&placed), &BTreeSet::new(), Copies::Versioned),
            &actual,
        );
        assert!(ops.iter().all(|o| o.id() != x), "{ops:?}");
        assert!(ops.contains(&AdapterOp::Load {
            id: "pin".into(),
            source: "/a/pin".into(),
            inplace: true
        }));
        // A home dropped less than a grace ago is loaded again if missing, except with
        // versioned copies: the EPP unloads it as a copy then, and must not race a reload.
        let (none, leaving) = (BTreeSet::new(), set(&[&x]));
        let empty = Actual::default();
        let ops = plan(&merge(&base, Some(&none), &leaving, Copies::Plain), &empty);
        assert!(ops.iter().any(|o| o.id() == x), "{ops:?}");
        let ops = plan(
            &merge(&base, Some(&none), &leaving, Copies::Versioned),
            &empty,
        );
        assert!(ops.iter().all(|o| o.id() != x), "{ops:?}");
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
        let ops = plan(
            &merge(&v2, Some(&both), &BTreeSet::new(), Copies::None),
            &actual,
        );
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
        let ops = plan(
            &merge(&v2, Some(&set(&[&new])), &BTreeSet::new(), Copies::None),
            &actual,
        );
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
        let ops = plan(
            &merge(&never, Some(&both), &BTreeSet::new(), Copies::None),
            &actual,
        );
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
        assert!(
            plan(
                &merge(&v1, Some(&both), &BTreeSet::new(), Copies::None),
                &actual
            )
            .is_empty()
        );
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
        let kept = |l: &mut Leaving, placed: &BTreeSet<String>, now, grace| {
            let mut k = l.names(now, grace);
            k.extend(placed.iter().cloned());
            k
        };
        let grace = Duration::from_secs(3);
        let mut l = Leaving::default();
        let (ab, b) = (set(&["a", "b"]), set(&["b"]));
        l.update(None, &ab, t0);
        assert_eq!(kept(&mut l, &ab, t0, grace), ab);
        l.update(Some(&ab), &b, t0 + Duration::from_secs(1));
        assert_eq!(
            kept(&mut l, &b, t0 + Duration::from_secs(2), grace),
            ab,
            "a lingers"
        );
        // Dropped again later: the grace runs from the first drop.
        l.update(Some(&b), &b, t0 + Duration::from_secs(3));
        assert_eq!(
            kept(&mut l, &b, t0 + Duration::from_secs(4), grace),
            b,
            "a goes"
        );
        // Placed again while leaving: no longer leaving.
        l.update(Some(&b), &set(&[]), t0 + Duration::from_secs(5));
        l.update(Some(&set(&[])), &b, t0 + Duration::from_secs(6));
        assert_eq!(kept(&mut l, &b, t0 + Duration::from_secs(6), grace), b);
        assert_eq!(kept(&mut l, &b, t0 + Duration::from_secs(20), grace), b);
    }
}
