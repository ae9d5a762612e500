//! Keeps the LoRA resolver folder's links equal to the catalogue: one per adapter's served name, to its source (`--lora-resolver-dir`).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use inferlane_sidecar::links::{
    Existing, LinkOps, REPORT_MARGIN, VERSION_GRACE, ops, reported, wanted,
};
use inferlane_sidecar::placed::Leaving;
use inferlane_sidecar::{LoraConfig, SourcePolicy};

use crate::actors::messages::ConfigChanged;

/// Largest number of entries read from the folder (it holds the catalogue's links and
/// whatever the operator put there; a ConfigMap holds at most a few thousand adapters).
const MAX_ENTRIES: usize = 100_000;

/// How often the folder is synced without a config change: links past their grace go,
/// and a link someone removed comes back.
const RESYNC: Duration = Duration::from_secs(30);

/// What the resolver can load, as the last sync left the folder (`None` before the first):
/// the placement follower reports it to the EPP.
pub type Linked = Arc<arc_swap::ArcSwapOption<BTreeSet<String>>>;

/// Syncs so far in this process (names its temporary links).
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The links actor: syncs the folder on every config the sidecar works to.
pub struct ResolverLinks {
    dir: PathBuf,
    /// `--allowed-source`: what may be linked (the resolver loads whatever a link names).
    policy: SourcePolicy,
    want: Option<BTreeMap<String, PathBuf>>,
    /// Names the catalogue stopped naming, kept [`VERSION_GRACE`] longer.
    leaving: Leaving,
    /// One sync at a time; a config that arrives meanwhile is synced after it.
    running: bool,
    again: bool,
    linked: Linked,
}

impl ResolverLinks {
    pub fn new(dir: PathBuf, policy: SourcePolicy, linked: Linked) -> Self {
        Self {
            dir,
            policy,
            want: None,
            leaving: Leaving::default(),
            running: false,
            again: false,
            linked,
        }
    }

    /// Publishes what the folder now lets the resolver load: after a failed sync, only
    /// names reported before that are still wanted (a new one may not be linked).
    fn publish(&self, want: &BTreeMap<String, PathBuf>, synced: bool) {
        let kept = self
            .leaving
            .within(Instant::now(), VERSION_GRACE.saturating_sub(REPORT_MARGIN));
        let mut names = reported(want, kept);
        if !synced {
            let before = self.linked.load_full().unwrap_or_default();
            names.retain(|n| before.contains(n));
        }
        self.linked.store(Some(Arc::new(names)));
    }

    fn sync(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            self.again = true;
            return;
        }
        let Some(want) = self.want.clone() else {
            return;
        };
        self.running = true;
        self.again = false;
        let keep = self.leaving.names(Instant::now(), VERSION_GRACE);
        let dir = self.dir.clone();
        let span = tracing::info_span!("resolver_links", dir = %dir.display(), links = want.len());
        let applied = want.clone();
        let fut = tokio::task::spawn_blocking(move || apply(&dir, &want, &keep));
        ctx.spawn(
            tracing::Instrument::instrument(fut, span)
                .into_actor(self)
                .map(move |res, a, ctx| {
                    a.running = false;
                    a.publish(&applied, matches!(res, Ok(Ok(_))));
                    match res {
                        Ok(Ok(o)) => {
                            if !o.link.is_empty() || !o.remove.is_empty() {
                                tracing::info!(linked = o.link.len(), removed = o.remove.len(), "resolver folder updated");
                            }
                            for name in &o.blocked {
                                tracing::warn!(name = %name, "resolver folder holds this served name as a file or folder, not our link; left as it is (remove it to let the sidecar link it)");
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "resolver folder not updated; trying again within 30 s")
                        }
                        Err(e) => tracing::warn!(error = %e, "resolver folder sync stopped"),
                    }
                    if a.again {
                        a.sync(ctx);
                    }
                }),
        );
    }
}

/// Reads the folder and applies the changes; a link is replaced by a rename, so the
/// resolver never sees the name missing.
fn apply(
    dir: &Path,
    want: &BTreeMap<String, PathBuf>,
    keep: &BTreeSet<String>,
) -> io::Result<LinkOps> {
    let mut have = BTreeMap::new();
    for entry in std::fs::read_dir(dir)?.take(MAX_ENTRIES) {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // An entry gone since the listing (another sidecar sharing the folder) is skipped.
        let e = match entry.file_type() {
            Ok(t) if t.is_symlink() => match std::fs::read_link(entry.path()) {
                Ok(target) => Existing::Link(target),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            },
            Ok(_) => Existing::Other,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        have.insert(name, e);
    }
    let o = ops(want, &have, keep);
    // Unique per process and call: sidecars of several servers may share one folder.
    let pid = std::process::id();
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for (name, target) in &o.link {
        let tmp = dir.join(format!(".{name}.{pid}.{call}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    for name in &o.remove {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(o)
}

impl Actor for ResolverLinks {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(RESYNC, |a, ctx| a.sync(ctx));
    }
}

impl Handler<ConfigChanged<LoraConfig>> for ResolverLinks {
    type Result = ();

    fn handle(&mut self, msg: ConfigChanged<LoraConfig>, ctx: &mut Context<Self>) {
        let want = wanted(&msg.config, &self.policy);
        let names = |w: &BTreeMap<String, PathBuf>| w.keys().cloned().collect::<BTreeSet<_>>();
        let old = self.want.as_ref().map(names);
        self.leaving
            .update(old.as_ref(), &names(&want), Instant::now());
        self.want = Some(want);
        self.sync(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_made_replaced_and_removed_and_other_entries_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("x")).unwrap();
        std::os::unix::fs::symlink("/old", d.join("y@0000abcd")).unwrap();
        std::os::unix::fs::symlink("/gone", d.join("z@0000abcd")).unwrap();
        let want: BTreeMap<String, PathBuf> = [
            ("x".to_string(), PathBuf::from("/a/x")),
            ("y@0000abcd".to_string(), PathBuf::from("/a/y")),
            ("w@0000abcd".to_string(), PathBuf::from("/a/w")),
        ]
        .into_iter()
        .collect();
        let o = apply(d, &want, &BTreeSet::new()).unwrap();
        assert_eq!(o.blocked, vec!["x".to_string()]);
        assert!(d.join("x").is_dir(), "an operator's folder stays");
        assert_eq!(
            std::fs::read_link(d.join("y@0000abcd")).unwrap(),
            Path::new("/a/y")
        );
        assert_eq!(
            std::fs::read_link(d.join("w@0000abcd")).unwrap(),
            Path::new("/a/w")
        );
        assert!(!d.join("z@0000abcd").exists() && d.join("z@0000abcd").symlink_metadata().is_err());
        // Nothing left to do, and no temporary names left behind.
        let again = apply(d, &want, &BTreeSet::new()).unwrap();
        assert!(again.link.is_empty() && again.remove.is_empty());
        let names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn sidecars_sharing_a_folder_do_not_trip_over_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let want: BTreeMap<String, PathBuf> = (0..20)
            .map(|i| (format!("a{i}@0000abcd"), PathBuf::from(format!("/a/{i}"))))
            .collect();
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (d, want) = (dir.path().to_path_buf(), want.clone());
                std::thread::spawn(move || {
                    // Bounded: 25 syncs each, half of them dropping the links again.
                    for i in 0..25 {
                        let w2 = if (i + w) % 2 == 0 {
                            want.clone()
                        } else {
                            BTreeMap::new()
                        };
                        apply(&d, &w2, &BTreeSet::new())?;
                    }
                    io::Result::Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap().unwrap();
        }
        apply(dir.path(), &want, &BTreeSet::new()).unwrap();
        for (name, target) in &want {
            assert_eq!(&std::fs::read_link(dir.path().join(name)).unwrap(), target);
        }
    }
}
