//! Kubernetes discovery: watches the InferencePool, its pods and the models that reference it.
//!
//! Each watch keeps its own last known objects. A relist (`Init` .. `InitDone`, after a restart
//! or a 410 Gone) is buffered and swapped in whole, and a watch error leaves the last state in
//! force, so an API outage never empties the endpoint set. One file per concern: `tracked.rs`
//! (a watch's last known objects), `events.rs` (the watches as one stream), `pool.rs` (which
//! group holds the pool, its endpoints), `rules.rs` (models, objectives and rewrites into
//! rules, and the status written back).

mod events;
mod pool;
mod rules;
mod tracked;

use std::collections::BTreeMap;

use actix::prelude::*;
use futures::StreamExt;
use inferlane_epp::ModelRules;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client};

use crate::actors::datastore::Datastore;
use crate::crds::{v1, v1alpha2};
use crate::pool::config::EndpointSpec;
use events::{KubeEvent, Watch, watch};
use tracked::{Tracked, trim_pod};

/// The pod label naming the engine (vllm, sglang, trt-llm).
pub const ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// The status subresource the EPP writes (why an InferenceModel is ignored); RBAC grants
/// `patch` on it (checked by `tests/manifests.rs`).
pub const STATUS_WRITTEN: (&str, &str) =
    ("inference.networking.x-k8s.io", "inferencemodels/status");

/// Every (API group, resource) discovery lists and watches; the RBAC in `deploy/epp/` must
/// grant `list` and `watch` on each (checked by `tests/manifests.rs`).
pub const WATCHED: &[(&str, &str)] = &[
    ("", "pods"),
    ("inference.networking.k8s.io", "inferencepools"),
    ("inference.networking.x-k8s.io", "inferencepools"),
    ("inference.networking.x-k8s.io", "inferencemodels"),
    ("inference.networking.x-k8s.io", "inferenceobjectives"),
    ("inference.networking.x-k8s.io", "inferencemodelrewrites"),
];

/// Which InferencePool to serve.
#[derive(Debug, Clone)]
pub struct PoolTarget {
    pub namespace: String,
    pub name: String,
    /// `inference.networking.k8s.io` (v1) or `inference.networking.x-k8s.io` (v1alpha2);
    /// `None`: discovered from the groups the API server serves (v1 preferred).
    pub group: Option<String>,
    /// Standalone on Kubernetes: select pods by these labels and ports, no InferencePool.
    pub endpoint_selector: Option<EndpointSelector>,
}

/// Pod labels and ports that make endpoints without an InferencePool.
pub type EndpointSelector = (BTreeMap<String, String>, Vec<i32>);

/// The discovery actor; feeds the datastore.
pub struct KubeDiscovery {
    client: Client,
    target: PoolTarget,
    datastore: Addr<Datastore>,
    pools_v1: Tracked<v1::InferencePool>,
    pools_v1alpha2: Tracked<v1alpha2::InferencePool>,
    pods: Tracked<Pod>,
    models: Tracked<v1alpha2::InferenceModel>,
    objectives: Tracked<v1alpha2::InferenceObjective>,
    rewrites: Tracked<v1alpha2::InferenceModelRewrite>,
    last_endpoints: Option<Vec<EndpointSpec>>,
    last_rules: Option<ModelRules>,
    /// `--pool-group`, when set: only that group is watched.
    forced_group: Option<String>,
    /// The group whose object is the pool now (logged when it changes), and whether both
    /// groups held one then (warned once per change).
    in_use: Option<(&'static str, bool)>,
    /// The pool was missing once every group had listed, and that was logged.
    missing_warned: bool,
    /// The groups whose InferencePools are watched.
    watching: Vec<&'static str>,
    /// Model objects rejected by the last rules build (logged when this set changes).
    last_rejected: Vec<String>,
    /// The Accepted condition this replica last wrote per InferenceModel (with what the
    /// objects carry, writes happen on change only and never loop through our own watch).
    status_written: BTreeMap<String, (bool, String, String)>,
    /// A status write failed and that was logged (RBAC without inferencemodels/status).
    status_failing: bool,
}

impl KubeDiscovery {
    pub fn new(client: Client, target: PoolTarget, datastore: Addr<Datastore>) -> Self {
        Self {
            client,
            datastore,
            pools_v1: Tracked::new("InferencePool (v1)"),
            pools_v1alpha2: Tracked::new("InferencePool (v1alpha2)"),
            pods: Tracked::new("pods"),
            models: Tracked::new("InferenceModels"),
            objectives: Tracked::new("InferenceObjectives"),
            rewrites: Tracked::new("InferenceModelRewrites"),
            last_endpoints: None,
            last_rules: None,
            forced_group: target.group.clone(),
            in_use: None,
            missing_warned: false,
            watching: Vec::new(),
            last_rejected: Vec::new(),
            status_written: BTreeMap::new(),
            status_failing: false,
            target,
        }
    }
}

impl Actor for KubeDiscovery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let ns = &self.target.namespace;
        let streams = vec![
            watch(
                Api::<Pod>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                Watch::Pods,
                |e| KubeEvent::Pod(Box::new(e.modify(trim_pod))),
            )
            .boxed(),
            watch(
                Api::<v1alpha2::InferenceModel>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                Watch::Models,
                KubeEvent::Model,
            )
            .boxed(),
            watch(
                Api::<v1alpha2::InferenceObjective>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                Watch::Objectives,
                KubeEvent::Objective,
            )
            .boxed(),
            watch(
                Api::<v1alpha2::InferenceModelRewrite>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                Watch::Rewrites,
                KubeEvent::Rewrite,
            )
            .boxed(),
        ];
        ctx.add_stream(futures::stream::select_all(streams));
        self.watch_pool(ctx);
    }
}

impl StreamHandler<KubeEvent> for KubeDiscovery {
    fn handle(&mut self, ev: KubeEvent, ctx: &mut Context<Self>) {
        let (endpoints, rules) = match ev {
            KubeEvent::PoolV1(e) => (self.pools_v1.apply(e), false),
            KubeEvent::PoolV1alpha2(e) => (self.pools_v1alpha2.apply(e), false),
            KubeEvent::Pod(e) => (self.pods.apply(*e), false),
            KubeEvent::Model(e) => (false, self.models.apply(e)),
            KubeEvent::Objective(e) => (false, self.objectives.apply(e)),
            KubeEvent::Rewrite(e) => (false, self.rewrites.apply(e)),
            KubeEvent::Error(which, e) => {
                // The watcher retries with backoff; the last known state stays in force.
                match which {
                    Watch::PoolV1alpha2 => self.pools_v1alpha2.failed(&e),
                    Watch::PoolV1 => self.pools_v1.failed(&e),
                    Watch::Pods => self.pods.failed(&e),
                    Watch::Models => self.models.failed(&e),
                    Watch::Objectives => self.objectives.failed(&e),
                    Watch::Rewrites => self.rewrites.failed(&e),
                }
                return;
            }
        };
        // The pool's group decides the unknown-model default, so the rules follow it.
        let rules = rules || (endpoints && self.note_pool_group());
        if endpoints {
            self.publish_endpoints();
        }
        if rules {
            self.publish_rules(ctx);
        }
    }

    /// The watches never end on their own; if one does, keep the actor (and its last state).
    fn finished(&mut self, _ctx: &mut Context<Self>) {
        tracing::error!("a Kubernetes watch stream ended; keeping the last known pool");
    }
}
