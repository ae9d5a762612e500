//! The sidecar's side of LoRA placement: asks the EPP which catalogue adapters its server holds and hands the reconciler its ConfigMap merged with that.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use inferlane_sidecar::LoraConfig;
use inferlane_sidecar::links::{REPORT_EVERY, REPORT_RETRY, VERSION_GRACE, report_due};
use inferlane_sidecar::placed::{Copies, Leaving, merge};
use inferlane_sidecar::version::served_name;

use crate::actors::messages::ConfigChanged;
use crate::actors::resolver_links::Linked;
use crate::lora_fleet::wire::{LinksReport, MAX_SET_BYTES, ServerSet};
use crate::net::bearer::send_ok;
use crate::net::capped::json_capped;

/// Where and how to ask.
#[derive(Debug, Clone)]
pub struct FollowerOptions {
    /// The EPP's `/lora/v1/placement` URL.
    pub url: String,
    /// This server's id in the EPP's pool (pod name, else `ip:port`).
    pub server: String,
    pub interval: Duration,
    /// A bearer token for an EPP with `--metrics-endpoint-auth` (re-read on every call:
    /// kubelet rotates projected tokens).
    pub token_file: Option<PathBuf>,
    /// How long a name the EPP dropped stays loaded (other replicas' tables lag).
    pub unload_grace: Duration,
}

/// The follower actor: between the config watcher and the reconciler.
pub struct PlacementFollower {
    opts: FollowerOptions,
    client: reqwest::Client,
    reconciler: Recipient<ConfigChanged<LoraConfig>>,
    /// `--lora-resolver-dir`: the links actor, given every ConfigMap as read.
    links: Option<Recipient<ConfigChanged<LoraConfig>>>,
    base: Option<Arc<LoraConfig>>,
    /// The last set the EPP gave (kept while it is away).
    placed: Option<BTreeSet<String>>,
    /// Names dropped from the set, kept a grace longer.
    leaving: Leaving,
    /// Versioned copies: served names the ConfigMap stopped naming (a changed source),
    /// kept loaded where they are for [`VERSION_GRACE`] (the EPP may still ask for a copy
    /// under the old name: it sees a change at another time than this sidecar).
    versions: Leaving,
    /// Which on-demand copies the EPP unloads itself (`ServerSet::resolver`,
    /// `ServerSet::versioned_copies`).
    copies: Copies,
    sent: Option<Arc<LoraConfig>>,
    generation: u64,
    /// Warned once that the EPP wants versioned copies and nothing links them here.
    warned_links: bool,
    asking: bool,
    /// `--lora-resolver-dir`: what the links actor left loadable, reported to the EPP.
    linked: Option<Linked>,
    /// What was last reported, and when.
    reported: Option<(Arc<BTreeSet<String>>, std::time::Instant)>,
    /// No report before then (after a failure, or until the EPP's table can show it).
    report_not_before: Option<std::time::Instant>,
    reporting: bool,
}

impl PlacementFollower {
    pub fn new(
        opts: FollowerOptions,
        client: reqwest::Client,
        reconciler: Recipient<ConfigChanged<LoraConfig>>,
        links: Option<(Recipient<ConfigChanged<LoraConfig>>, Linked)>,
    ) -> Self {
        let (links, linked) = links.unzip();
        Self {
            opts,
            client,
            reconciler,
            links,
            base: None,
            placed: None,
            leaving: Leaving::default(),
            versions: Leaving::default(),
            copies: Copies::None,
            sent: None,
            generation: 0,
            warned_links: false,
            asking: false,
            linked,
            reported: None,
            report_not_before: None,
            reporting: false,
        }
    }

    /// Tells the EPP which served names this server's resolver can load, when due
    /// ([`report_due`]; only while it asks for versioned copies).
    fn report(&mut self, table_shows: bool, ctx: &mut Context<Self>) {
        let Some(now_linked) = self.linked.as_ref().and_then(|l| l.load_full()) else {
            return;
        };
        let now = std::time::Instant::now();
        let last = self.reported.as_ref().map(|(s, at)| (&**s, *at));
        if self.reporting
            || !report_due(last, &now_linked, table_shows, self.report_not_before, now)
        {
            return;
        }
        let Ok(mut url) = reqwest::Url::parse(&self.opts.url) else {
            return;
        };
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().pop().push("links");
        }
        url.set_query(None);
        self.reporting = true;
        let body = LinksReport {
            server: self.opts.server.clone(),
            linked: now_linked.iter().cloned().collect(),
        };
        let req = self
            .client
            .post(url)
            .json(&body)
            .timeout(Duration::from_secs(5));
        let token = self.opts.token_file.clone();
        let fut = async move { send_ok(req, token).await.map(drop) };
        ctx.spawn(fut.into_actor(self).map(move |res, a, _| {
            a.reporting = false;
            match res {
                Ok(()) => {
                    tracing::debug!(names = now_linked.len(), "resolver links reported");
                    a.reported = Some((now_linked, now));
                    a.report_not_before = Some(now + REPORT_RETRY);
                }
                // An EPP without a table yet (just started, or a follower that has not
                // copied one) takes it shortly.
                Err(e) if e.status == Some(503) => {
                    tracing::debug!(error = %e, "resolver links not reported yet");
                    a.report_not_before = Some(now + REPORT_RETRY);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "resolver links not reported; the EPP asks this server for no on-demand copy until it has them (trying again in 30 s)");
                    a.report_not_before = Some(now + REPORT_EVERY);
                }
            }
        }));
    }

    /// Sends the merged config when it differs from the last one sent.
    fn forward(&mut self) {
        let Some(base) = &self.base else { return };
        let now = std::time::Instant::now();
        let mut leaving = self.leaving.names(now, self.opts.unload_grace);
        if self.copies == Copies::Versioned {
            leaving.extend(self.versions.names(now, VERSION_GRACE));
        }
        let merged = Arc::new(merge(base, self.placed.as_ref(), &leaving, self.copies));
        if self.sent.as_deref() == Some(&*merged) {
            return;
        }
        self.generation += 1;
        self.sent = Some(merged.clone());
        self.reconciler.do_send(ConfigChanged {
            config: merged,
            generation: self.generation,
        });
    }

    fn ask(&mut self, ctx: &mut Context<Self>) {
        if self.asking || self.base.as_ref().is_none_or(|b| b.on_demand.is_empty()) {
            return;
        }
        self.asking = true;
        let client = self.client.clone();
        let opts = self.opts.clone();
        let fut = async move {
            let mut url =
                reqwest::Url::parse(&opts.url).map_err(|e| format!("--placement-url: {e}"))?;
            url.query_pairs_mut().append_pair("server", &opts.server);
            let req = client.get(url).timeout(Duration::from_secs(5));
            let r = send_ok(req, opts.token_file.clone()).await?;
            json_capped::<ServerSet>(r, MAX_SET_BYTES)
                .await
                .map_err(|e| e.to_string())
        };
        ctx.spawn(fut.into_actor(self).map(|res, a, ctx| {
            a.asking = false;
            match res {
                Ok(set) => {
                    let ids: BTreeSet<String> = set
                        .adapters
                        .iter()
                        .chain(&set.draining)
                        .map(|p| if p.name.is_empty() { p.id.clone() } else { p.name.clone() })
                        .collect();
                    if a.placed.as_ref() != Some(&ids) {
                        tracing::info!(tick = set.tick, adapters = set.adapters.len(), draining = set.draining.len(), "placement for this server changed");
                    }
                    a.leaving
                        .update(a.placed.as_ref(), &ids, std::time::Instant::now());
                    a.placed = Some(ids);
                    if set.versioned_copies && a.links.is_none() && !a.warned_links {
                        a.warned_links = true;
                        tracing::warn!("the EPP asks this server's LoRA resolver for served names (--lora-copy-names versioned), but this sidecar links none: start it with --lora-resolver-dir (the folder in VLLM_LORA_RESOLVER_CACHE_DIR), or requests for adapters without a home fail here");
                    }
                    a.copies = match (set.resolver, set.versioned_copies) {
                        (false, _) => Copies::None,
                        (true, false) => Copies::Plain,
                        (true, true) => Copies::Versioned,
                    };
                    a.forward();
                    if set.versioned_copies {
                        a.report(set.links_reported, ctx);
                    }
                }
                Err(e) => {
                    tracing::warn!(url = %a.opts.url, server = %a.opts.server, error = %e, "placement not read; keeping the last set");
                    // Names whose grace ran out go even while the EPP is away.
                    a.forward();
                }
            }
        }));
    }
}

impl Actor for PlacementFollower {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.opts.interval, |a, ctx| a.ask(ctx));
    }
}

impl Handler<ConfigChanged<LoraConfig>> for PlacementFollower {
    type Result = ();

    fn handle(&mut self, msg: ConfigChanged<LoraConfig>, ctx: &mut Context<Self>) {
        if let Some(links) = &self.links {
            links.do_send(msg.clone());
        }
        let names = |c: &LoraConfig| -> BTreeSet<String> {
            c.on_demand
                .iter()
                .map(|a| served_name(&a.id, &a.source))
                .collect()
        };
        let old = self.base.as_deref().map(names);
        self.versions
            .update(old.as_ref(), &names(&msg.config), std::time::Instant::now());
        self.base = Some(msg.config);
        self.forward();
        self.ask(ctx);
    }
}
