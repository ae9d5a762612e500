//! Which InferencePool group holds the pool, watching it there, and the pool's Ready pods as endpoints.

use std::collections::BTreeMap;

use actix::prelude::*;
use futures::StreamExt;
use inferlane_epp::EngineType;
use inferlane_epp::rules::UnknownModelPolicy;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use super::events::{KubeEvent, Watch, watch};
use super::tracked::pod_ready;
use super::{ENGINE_LABEL, KubeDiscovery};
use crate::actors::datastore::EndpointsDiscovered;
use crate::crds::{v1, v1alpha2};
use crate::pool::config::EndpointSpec;

/// The pool's selector and ports, whatever its API version.
#[derive(Debug, Clone, PartialEq, Default)]
struct PoolView {
    selector: BTreeMap<String, String>,
    ports: Vec<i32>,
}

/// The v1 (GA) API group of InferencePool.
pub const GROUP_V1: &str = "inference.networking.k8s.io";
/// The v1alpha2 API group of InferencePool (the seeds').
pub const GROUP_V1ALPHA2: &str = "inference.networking.x-k8s.io";

/// The InferencePool API groups the cluster serves (v1 first); empty while neither is (CRDs
/// not installed yet). Discovery needs no RBAC beyond what every authenticated client has.
pub async fn served_pool_groups(client: &Client) -> Result<Vec<&'static str>, kube::Error> {
    let mut served = Vec::new();
    for (group, version) in [(GROUP_V1, "v1"), (GROUP_V1ALPHA2, "v1alpha2")] {
        match client
            .list_api_group_resources(&format!("{group}/{version}"))
            .await
        {
            Ok(list) if list.resources.iter().any(|r| r.name == "inferencepools") => {
                served.push(group);
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(served)
}

/// What a models request for a name no InferenceModel names gets, by the API generation the
/// pool comes from: v1alpha2 (the InferenceModel era, upstream v0.2-0.5) answered 404; v1
/// pools route it (later upstream), which is what base-model requests without an object need.
pub fn unknown_models_for(group: &str) -> UnknownModelPolicy {
    if group == GROUP_V1ALPHA2 {
        UnknownModelPolicy::Reject
    } else {
        UnknownModelPolicy::Route
    }
}

impl KubeDiscovery {
    /// The group whose object is the pool: `--pool-group`'s, else whichever group holds an
    /// InferencePool of that name (v1 when both do).
    pub(super) fn pool_group(&self) -> Option<&'static str> {
        let v1 = self.pools_v1.objects.contains_key(&self.target.name);
        let v1alpha2 = self.pools_v1alpha2.objects.contains_key(&self.target.name);
        match self.forced_group.as_deref() {
            Some(GROUP_V1ALPHA2) => v1alpha2.then_some(GROUP_V1ALPHA2),
            Some(_) => v1.then_some(GROUP_V1),
            None if v1 => Some(GROUP_V1),
            None if v1alpha2 => Some(GROUP_V1ALPHA2),
            None => None,
        }
    }

    /// Logs which group the pool was found in when that changes; true when it changed.
    pub(super) fn note_pool_group(&mut self) -> bool {
        let Some(group) = self.pool_group() else {
            return false;
        };
        let both = self.forced_group.is_none()
            && self.pools_v1.objects.contains_key(&self.target.name)
            && self.pools_v1alpha2.objects.contains_key(&self.target.name);
        if self.in_use == Some((group, both)) {
            return false;
        }
        let changed = self.in_use.map(|(g, _)| g) != Some(group);
        self.in_use = Some((group, both));
        let version = if group == GROUP_V1 { "v1" } else { "v1alpha2" };
        if both {
            tracing::warn!(group, version, pool = %self.target.name,
                "an InferencePool of this name exists in both inference.networking.k8s.io (v1) and inference.networking.x-k8s.io (v1alpha2); serving the v1 one (delete the other, or set --pool-group)");
        } else if changed {
            tracing::info!(group, version, pool = %self.target.name,
                unknown_models = ?unknown_models_for(group),
                "InferencePool found (set --pool-group to choose the group)");
        }
        changed
    }

    fn pool(&self) -> Option<PoolView> {
        if let Some((selector, ports)) = &self.target.endpoint_selector {
            return Some(PoolView {
                selector: selector.clone(),
                ports: ports.clone(),
            });
        }
        if self.pool_group()? == GROUP_V1ALPHA2 {
            let p = self.pools_v1alpha2.objects.get(&self.target.name)?;
            Some(PoolView {
                selector: p.spec.selector.clone(),
                ports: vec![p.spec.target_port_number],
            })
        } else {
            let p = self.pools_v1.objects.get(&self.target.name)?;
            Some(PoolView {
                selector: p.spec.selector.match_labels.clone(),
                ports: p.spec.target_ports.iter().map(|p| p.number).collect(),
            })
        }
    }

    pub(super) fn publish_endpoints(&mut self) {
        // Until the pool itself is known and the pods listed, publish nothing rather than an
        // empty set (which would also make the EPP ready too early).
        if !self.pods.synced {
            return;
        }
        let Some(pool) = self.pool() else {
            self.warn_pool_missing();
            return;
        };
        let mut out = Vec::new();
        for pod in self.pods.objects.values() {
            let labels = pod.labels();
            if pool.selector.is_empty()
                || !pool.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            {
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() || !pod_ready(pod) {
                continue;
            }
            let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                continue;
            };
            let engine = labels
                .get(ENGINE_LABEL)
                .map(|v| EngineType::from_label(v))
                .unwrap_or_default();
            for port in &pool.ports {
                let address = if ip.contains(':') {
                    format!("[{ip}]:{port}")
                } else {
                    format!("{ip}:{port}")
                };
                // The pod name survives an IP change and reads the same on every replica.
                let name = pod.metadata.name.as_ref().map(|n| format!("{n}:{port}"));
                out.push(EndpointSpec {
                    address,
                    engine,
                    name,
                });
            }
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        if self.last_endpoints.as_ref() != Some(&out) {
            tracing::info!(endpoints = out.len(), pool = %self.target.name, "pool endpoints changed");
            self.datastore.do_send(EndpointsDiscovered(out.clone()));
            self.last_endpoints = Some(out);
        }
    }

    /// Once every watched group has listed and none holds the pool, say so once: otherwise
    /// the EPP stays unready with nothing in its log to say why.
    fn warn_pool_missing(&mut self) {
        if self.missing_warned || self.target.endpoint_selector.is_some() {
            return;
        }
        let listed = |g: &str| {
            if g == GROUP_V1ALPHA2 {
                self.pools_v1alpha2.synced
            } else {
                self.pools_v1.synced
            }
        };
        if self.watching.is_empty() || !self.watching.iter().all(|g| listed(g)) {
            return;
        }
        self.missing_warned = true;
        let groups = match self.forced_group.as_deref() {
            Some(g) => g.to_string(),
            None => format!("{GROUP_V1} or {GROUP_V1ALPHA2}"),
        };
        tracing::warn!(pool = %self.target.name, namespace = %self.target.namespace, %groups,
            "no InferencePool of this name yet; the EPP stays unready until one is created (check --pool-name, --pool-namespace and --pool-group)");
    }

    pub(super) fn pool_stream(
        &self,
        group: &str,
    ) -> futures::stream::BoxStream<'static, KubeEvent> {
        let ns = &self.target.namespace;
        let by_name =
            watcher::Config::default().fields(&format!("metadata.name={}", self.target.name));
        if group == GROUP_V1ALPHA2 {
            watch(
                Api::<v1alpha2::InferencePool>::namespaced(self.client.clone(), ns),
                by_name,
                Watch::PoolV1alpha2,
                KubeEvent::PoolV1alpha2,
            )
            .boxed()
        } else {
            watch(
                Api::<v1::InferencePool>::namespaced(self.client.clone(), ns),
                by_name,
                Watch::PoolV1,
                KubeEvent::PoolV1,
            )
            .boxed()
        }
    }

    /// Watches the pool: in `--pool-group`'s group, else (no flag) in every group the API
    /// server serves (a cluster with upstream's v1 CRDs installed usually serves both),
    /// looking again for a group that is not there yet (CRDs installed after the EPP started).
    pub(super) fn watch_pool(&mut self, ctx: &mut Context<Self>) {
        // Standalone on Kubernetes (--endpoint-selector): no InferencePool to watch.
        if self.target.endpoint_selector.is_some() {
            return;
        }
        if let Some(group) = self.forced_group.clone() {
            self.watching.push(if group == GROUP_V1ALPHA2 {
                GROUP_V1ALPHA2
            } else {
                GROUP_V1
            });
            ctx.add_stream(self.pool_stream(&group));
            return;
        }
        let client = self.client.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let mut wait = std::time::Duration::from_millis(200);
            let mut warned = false;
            let mut watching: Vec<&'static str> = Vec::new();
            while watching.len() < 2 {
                match served_pool_groups(&client).await {
                    Ok(served) if !served.is_empty() => {
                        for g in served {
                            if !watching.contains(&g) {
                                watching.push(g);
                                me.do_send(GroupServed(g));
                            }
                        }
                    }
                    Ok(_) if !warned => {
                        warned = true;
                        tracing::warn!(
                            "the API server serves no InferencePool resource (neither inference.networking.k8s.io/v1 nor inference.networking.x-k8s.io/v1alpha2); install the CRDs (kubectl apply -f deploy/crds/). Retrying"
                        );
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %e, "cannot discover the InferencePool API group; retrying (or set --pool-group)");
                    }
                    _ => {}
                }
                tokio::time::sleep(wait).await;
                let cap = if watching.is_empty() { 10 } else { 60 };
                wait = (wait * 2).min(std::time::Duration::from_secs(cap));
            }
        });
    }
}

/// Fact: the API server serves InferencePools in this group (watch it for the pool).
struct GroupServed(&'static str);

impl Message for GroupServed {
    type Result = ();
}

impl Handler<GroupServed> for KubeDiscovery {
    type Result = ();

    fn handle(&mut self, msg: GroupServed, ctx: &mut Context<Self>) {
        tracing::debug!(
            group = msg.0,
            "the API server serves InferencePools in this group"
        );
        self.watching.push(msg.0);
        ctx.add_stream(self.pool_stream(msg.0));
    }
}
