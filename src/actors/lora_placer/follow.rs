//! The placer's follower side: a replica that does not decide posts the decider its demand and the sidecars' link reports, and copies its table.

use std::sync::Arc;

use actix::prelude::*;

use super::{LoraPlacer, MAX_TABLE_BYTES};
use crate::lora_fleet::Routed;
use crate::lora_fleet::wire::{DemandCount, DemandPost, Table};
use crate::net::bearer::send_ok;
use crate::net::capped::json_capped;

impl LoraPlacer {
    /// A follower sends the decider its demand, so placement follows every replica's
    /// traffic. Best effort: counts are dropped while the decider is away or the last post
    /// is still on its way.
    pub(super) fn post_demand(
        &mut self,
        placement_url: &str,
        counts: Vec<(String, u64, u64)>,
        ctx: &mut Context<Self>,
    ) {
        if self.posting {
            return;
        }
        let links = crate::lora_fleet::lock_links(&self.shared.fleet.links).take_fresh();
        if counts.is_empty() && links.is_empty() {
            return;
        }
        let Ok(mut url) = reqwest::Url::parse(placement_url) else {
            return;
        };
        url.set_path("/lora/v1/demand");
        url.set_query(None);
        let post = DemandPost {
            counts: counts
                .into_iter()
                .map(|(id, requests, tokens)| DemandCount {
                    id,
                    requests,
                    tokens,
                })
                .collect(),
            links,
        };
        self.posting = true;
        let req = self.client.post(url).json(&post);
        let token = self.opts.token_file.clone();
        let fut = async move { send_ok(req, token).await.map(drop) };
        ctx.spawn(fut.into_actor(self).map(|res, a, _| {
            a.posting = false;
            if let Err(e) = res {
                tracing::debug!(error = %e, "demand not posted to the decider");
            }
        }));
    }

    /// A follower's tick: the decider's table, kept as it was while the decider is away.
    pub(super) fn follow(&mut self, url: String, ctx: &mut Context<Self>) {
        if self.fetching {
            return;
        }
        self.fetching = true;
        let req = self.client.get(&url);
        let token = self.opts.token_file.clone();
        let fut = async move {
            let r = send_ok(req, token)
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            json_capped::<Table>(r, MAX_TABLE_BYTES)
                .await
                .map_err(|e| format!("{url}: {e}"))
        };
        ctx.spawn(fut.into_actor(self).map(|res, a, _| {
            a.fetching = false;
            match res {
                Ok(t) => {
                    // A follower without the catalogue counts what the table places.
                    if a.catalogue.is_none() {
                        a.shared.fleet.count_only_if_changed(t.served.keys());
                    }
                    let routed = Routed::new(t, a.shared.fleet.table.load().as_deref());
                    a.shared.fleet.table.store(Some(Arc::new(routed)));
                }
                Err(e) => tracing::debug!(error = %e, "placement table not fetched; routing keeps the last one"),
            }
        }));
    }
}
