//! The sidecar's side of LoRA placement: asks the EPP which catalogue adapters its server holds and hands the reconciler its ConfigMap merged with that.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use inferlane_sidecar::LoraConfig;
use inferlane_sidecar::links::VERSION_GRACE;
use inferlane_sidecar::placed::{Copies, Leaving, merge};
use inferlane_sidecar::version::served_name;

use crate::actors::messages::ConfigChanged;
use crate::lora_fleet::wire::ServerSet;
use crate::net::bearer::with_token;
use crate::net::capped::json_capped;

/// Largest set a sidecar reads: its server's homes, a few hundred entries at most.
const MAX_SET_BYTES: usize = 4 << 20;

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
}

impl PlacementFollower {
    pub fn new(
        opts: FollowerOptions,
        client: reqwest::Client,
        reconciler: Recipient<ConfigChanged<LoraConfig>>,
        links: Option<Recipient<ConfigChanged<LoraConfig>>>,
    ) -> Self {
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
        }
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
            let r = with_token(req, opts.token_file.clone())
                .await
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                let code = r.status();
                let text = r.text().await.unwrap_or_default();
                return Err(format!("{code}: {}", text.trim()));
            }
            json_capped::<ServerSet>(r, MAX_SET_BYTES)
                .await
                .map_err(|e| e.to_string())
        };
        ctx.spawn(fut.into_actor(self).map(|res, a, _| {
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
