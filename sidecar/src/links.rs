//! The links a sidecar keeps in its server's LoRA resolver folder: each catalogue adapter's served name pointing at its source.
//!
//! vLLM's filesystem resolver loads `<dir>/<model>` for a model it does not know. With
//! `--lora-copy-names versioned` the EPP asks it for `id@tag` (the name a home would load),
//! so the folder must hold that name: the sidecar links it to the catalogue's source, and a
//! changed source is a new name beside the old, never new weights under a name in use.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use crate::version::{id_of, served_name};
use crate::{LoraConfig, SourcePolicy};

/// How long a link, and a copy loaded under it, stay after the catalogue stops naming it
/// (its source changed): the EPP asks for the old name where the new one is not linked
/// yet (by each sidecar's report), and its requests may still be running there.
pub const VERSION_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// An old version's link stops being reported this long before it is removed: the EPP
/// stops asking for it (its table follows reports within a few placement ticks) before
/// the name is gone.
pub const REPORT_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

/// A report is sent again this often (the EPP forgets one after 90 s: a restarted EPP, or
/// a new decider, learns it again).
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// After a failed report, or while the EPP's table does not show the last one yet (a
/// follower forwards it on its next tick), the next try waits this long.
pub const REPORT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// What a name in the folder is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    /// A symbolic link to this target.
    Link(PathBuf),
    /// Anything else (an operator's folder or file): never touched.
    Other,
}

/// Changes that bring the folder to the wanted links.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkOps {
    /// Names to (re)link to a target.
    pub link: Vec<(String, PathBuf)>,
    /// Links to remove: served names no catalogue adapter has any more.
    pub remove: Vec<String>,
    /// Wanted names held by something that is not a link (left as they are).
    pub blocked: Vec<String>,
}

/// Served name -> source for every catalogue (`onDemand`) adapter whose source is an
/// absolute local path without `..` (a hub id or URL has no folder to link; the resolver
/// cannot read it either) that `policy` allows (`--allowed-source`: a link lets the
/// resolver load it as surely as a load call would), and whose served name is one path
/// component.
pub fn wanted(cfg: &LoraConfig, policy: &SourcePolicy) -> BTreeMap<String, PathBuf> {
    cfg.on_demand
        .iter()
        .filter(|a| local(&a.source) && policy.check(&a.source).is_ok())
        .map(|a| (served_name(&a.id, &a.source), PathBuf::from(&a.source)))
        .filter(|(name, _)| one_component(name))
        .collect()
}

/// The operations from `have` (the folder's entries) to `want`. Only links under served
/// names are ever removed, and not those in `keep` (wanted until lately): whatever else the
/// folder holds is the operator's.
pub fn ops(
    want: &BTreeMap<String, PathBuf>,
    have: &BTreeMap<String, Existing>,
    keep: &BTreeSet<String>,
) -> LinkOps {
    let mut out = LinkOps::default();
    for (name, target) in want {
        match have.get(name) {
            Some(Existing::Link(t)) if t == target => {}
            Some(Existing::Other) => out.blocked.push(name.clone()),
            _ => out.link.push((name.clone(), target.clone())),
        }
    }
    for (name, e) in have {
        if matches!(e, Existing::Link(_))
            && id_of(name).is_some()
            && !want.contains_key(name)
            && !keep.contains(name)
        {
            out.remove.push(name.clone());
        }
    }
    out
}

/// The names a sidecar reports its resolver can load: what it links for the catalogue it
/// read (a name the operator's own entry holds too: the resolver loads that), and old
/// versions' links with more than [`REPORT_MARGIN`] of their [`VERSION_GRACE`] left
/// (`kept`).
pub fn reported(want: &BTreeMap<String, PathBuf>, kept: BTreeSet<String>) -> BTreeSet<String> {
    let mut names = kept;
    names.extend(want.keys().cloned());
    names
}

/// Whether to report `now_linked` (`last`: what was reported and when; `table_shows`: the
/// EPP's table has a report from this server; `not_before`: no try until then): the first
/// time, when it changed, every [`REPORT_EVERY`], and while the table lacks it.
pub fn report_due(
    last: Option<(&BTreeSet<String>, std::time::Instant)>,
    now_linked: &BTreeSet<String>,
    table_shows: bool,
    not_before: Option<std::time::Instant>,
    now: std::time::Instant,
) -> bool {
    if not_before.is_some_and(|t| now < t) {
        return false;
    }
    match last {
        None => true,
        Some((names, at)) => {
            names != now_linked || !table_shows || now.saturating_duration_since(at) >= REPORT_EVERY
        }
    }
}

fn local(source: &str) -> bool {
    let p = Path::new(source);
    p.is_absolute() && !p.components().any(|c| c == Component::ParentDir)
}

fn one_component(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CFG: &str = "vLLMLoRAConfig:\n  ensureNotExist:\n    models:\n    - id: bad\n      source: /a/bad\n  onDemand:\n    models:\n    - id: x\n      source: /a/x\n    - id: hub\n      source: org/hub-adapter\n    - id: up\n      source: /a/../etc\n    - id: bad\n      source: /a/bad\n    - id: y\n      source: /a/y\n";

    #[test]
    fn catalogue_sources_are_linked_under_served_names_and_only_our_links_go() {
        let cfg = crate::parse(CFG, true).unwrap();
        let want = wanted(&cfg, &SourcePolicy::default());
        let (x, y) = (served_name("x", "/a/x"), served_name("y", "/a/y"));
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            {
                let mut v = vec![&x, &y];
                v.sort();
                v
            },
            "hub ids, `..` paths and ensureNotExist are not linked"
        );
        // Sources --allowed-source refuses are not linked either.
        let only_y = wanted(&cfg, &SourcePolicy::new(vec!["/a/y".into()]));
        assert_eq!(only_y.keys().collect::<Vec<_>>(), vec![&y]);
        let old_x = served_name("x", "/a/x-old");
        let have: BTreeMap<String, Existing> = [
            (x.clone(), Existing::Link("/elsewhere".into())),
            (y.clone(), Existing::Other),
            (old_x.clone(), Existing::Link("/a/x-old".into())),
            ("x".into(), Existing::Link("/a/x".into())),
            ("notes".into(), Existing::Other),
        ]
        .into_iter()
        .collect();
        let o = ops(&want, &have, &BTreeSet::new());
        assert_eq!(o.link, vec![(x.clone(), PathBuf::from("/a/x"))]);
        assert_eq!(o.remove, vec![old_x.clone()], "an old version's link goes");
        // Within its grace it stays.
        let kept = ops(&want, &have, &[old_x].into());
        assert!(kept.remove.is_empty());
        assert_eq!(o.blocked, vec![y.clone()], "an operator's folder stays");
        // Applied, nothing is left to do.
        let done: BTreeMap<String, Existing> = want
            .iter()
            .map(|(n, t)| (n.clone(), Existing::Link(t.clone())))
            .collect();
        assert_eq!(ops(&want, &done, &BTreeSet::new()), LinkOps::default());
    }

    #[test]
    fn reports_go_when_new_changed_due_or_missing_and_never_before_their_time() {
        let t0 = std::time::Instant::now();
        let a: BTreeSet<String> = ["a@1".to_string()].into();
        let b: BTreeSet<String> = ["a@2".to_string()].into();
        assert!(report_due(None, &a, false, None, t0), "first");
        let last = Some((&a, t0));
        assert!(!report_due(last, &a, true, None, t0), "unchanged and shown");
        assert!(report_due(last, &b, true, None, t0), "changed");
        assert!(report_due(last, &a, false, None, t0), "the table lacks it");
        assert!(
            report_due(last, &a, true, None, t0 + REPORT_EVERY),
            "refresh"
        );
        let later = Some(t0 + REPORT_RETRY);
        assert!(
            !report_due(last, &b, true, later, t0),
            "not before the retry"
        );
        assert!(report_due(last, &b, true, later, t0 + REPORT_RETRY));
        // An old version's link is reported while kept, with the wanted names.
        let want: BTreeMap<String, PathBuf> = [("a@2".to_string(), PathBuf::from("/a"))].into();
        let r = reported(&want, ["a@1".to_string()].into());
        assert_eq!(r, ["a@1".to_string(), "a@2".to_string()].into());
    }

    proptest! {
        #[test]
        fn a_link_name_is_one_path_component(id in "[a-z0-9./_-]{1,12}", src in "/[a-z0-9./]{0,20}") {
            let cfg = crate::parse(
                &format!("vLLMLoRAConfig:\n  onDemand:\n    models:\n    - id: {id:?}\n      source: {src:?}\n"),
                false,
            );
            if let Ok(cfg) = cfg {
                for (name, target) in wanted(&cfg, &SourcePolicy::default()) {
                    prop_assert!(one_component(&name), "{name}");
                    prop_assert!(Path::new(&name).components().count() == 1, "{name}");
                    prop_assert!(target.is_absolute());
                    prop_assert!(!target.components().any(|c| c == Component::ParentDir));
                }
            }
        }
    }
}
