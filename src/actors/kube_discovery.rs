//! Kubernetes discovery: watches the InferencePool, its pods and the models that reference it.
//!
//! Each watch keeps its own last known objects. A relist (`Init` .. `InitDone`, after a restart
//! or a 410 Gone) is buffered and swapped in whole, and a watch error leaves the last state in
//! force, so an API outage never empties the endpoint set.

use std::collections::BTreeMap;

use actix::prelude::*;
use futures::StreamExt;
use inferlane_epp::EngineType;
use inferlane_epp::rules::{
    Criticality, ModelRule, ModelRules, Objective, RewriteRule, TargetModel, UnknownModelPolicy,
};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::datastore::{Datastore, EndpointsDiscovered, RulesChanged};
use crate::crds::{v1, v1alpha2};
use crate::epp::config::EndpointSpec;

/// The pod label naming the engine (vllm, sglang, trt-llm).
pub const ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

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
    /// `inference.networking.k8s.io` (v1) or `inference.networking.x-k8s.io` (v1alpha2).
    pub group: String,
    /// Standalone on Kubernetes: select pods by these labels and ports, no InferencePool.
    pub endpoint_selector: Option<EndpointSelector>,
}

/// Pod labels and ports that make endpoints without an InferencePool.
pub type EndpointSelector = (BTreeMap<String, String>, Vec<i32>);

/// The pool's selector and ports, whatever its API version.
#[derive(Debug, Clone, PartialEq, Default)]
struct PoolView {
    selector: BTreeMap<String, String>,
    ports: Vec<i32>,
}

/// Last known objects of one watch, with relists swapped in whole.
#[derive(Debug)]
struct Tracked<K> {
    objects: BTreeMap<String, K>,
    relist: Option<BTreeMap<String, K>>,
}

impl<K: Resource> Tracked<K> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relist: None,
        }
    }

    /// Applies an event; true when the visible set changed.
    fn apply(&mut self, ev: Event<K>) -> bool {
        match ev {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                if let Some(r) = self.relist.as_mut() {
                    r.insert(o.name_any(), o);
                }
                false
            }
            Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    self.objects = r;
                }
                true
            }
            Event::Apply(o) => {
                self.objects.insert(o.name_any(), o);
                true
            }
            Event::Delete(o) => {
                self.objects.remove(&o.name_any());
                true
            }
        }
    }
}

/// Everything discovery watches, merged into one stream for the actor.
enum KubeEvent {
    PoolV1(Event<v1::InferencePool>),
    PoolV1alpha2(Event<v1alpha2::InferencePool>),
    // Boxed: a Pod is several times larger than the other objects.
    Pod(Box<Event<Pod>>),
    Model(Event<v1alpha2::InferenceModel>),
    Objective(Event<v1alpha2::InferenceObjective>),
    Rewrite(Event<v1alpha2::InferenceModelRewrite>),
    Error(String),
}

impl Message for KubeEvent {
    type Result = ();
}

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
    errors_logged: bool,
}

impl KubeDiscovery {
    pub fn new(client: Client, target: PoolTarget, datastore: Addr<Datastore>) -> Self {
        Self {
            client,
            target,
            datastore,
            pools_v1: Tracked::new(),
            pools_v1alpha2: Tracked::new(),
            pods: Tracked::new(),
            models: Tracked::new(),
            objectives: Tracked::new(),
            rewrites: Tracked::new(),
            last_endpoints: None,
            last_rules: None,
            errors_logged: false,
        }
    }

    fn pool(&self) -> Option<PoolView> {
        if let Some((selector, ports)) = &self.target.endpoint_selector {
            return Some(PoolView {
                selector: selector.clone(),
                ports: ports.clone(),
            });
        }
        if self.target.group == "inference.networking.x-k8s.io" {
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

    fn publish_endpoints(&mut self) {
        // Until the pool itself is known, publish nothing rather than an empty set.
        let Some(pool) = self.pool() else { return };
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
                out.push(EndpointSpec { address, engine });
            }
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        if self.last_endpoints.as_ref() != Some(&out) {
            tracing::info!(endpoints = out.len(), pool = %self.target.name, "pool endpoints changed");
            self.datastore.do_send(EndpointsDiscovered(out.clone()));
            self.last_endpoints = Some(out);
        }
    }

    fn publish_rules(&mut self) {
        let pool = &self.target.name;
        let models: Vec<ModelRule> = self
            .models
            .objects
            .values()
            .filter(|m| m.spec.pool_ref.name == *pool)
            .map(|m| ModelRule {
                model_name: m.spec.model_name.clone(),
                criticality: m.spec.criticality.as_deref().map(|c| match c {
                    "Critical" => Criticality::Critical,
                    "Sheddable" => Criticality::Sheddable,
                    _ => Criticality::Standard,
                }),
                target_models: m
                    .spec
                    .target_models
                    .iter()
                    .map(|t| TargetModel {
                        name: t.name.clone(),
                        weight: t.weight.map(|w| w.max(0) as u32),
                    })
                    .collect(),
            })
            .collect();
        let objectives: Vec<Objective> = self
            .objectives
            .objects
            .values()
            .filter(|o| o.spec.pool_ref.name == *pool)
            .map(|o| Objective {
                name: o.name_any(),
                priority: o.spec.priority.unwrap_or(0),
            })
            .collect();
        let rewrites: Vec<RewriteRule> = self
            .rewrites
            .objects
            .values()
            .filter(|r| r.spec.pool_ref.name == *pool)
            .flat_map(|r| r.spec.rules.iter())
            .map(|rule| RewriteRule {
                matches: rule.matches.iter().map(|m| m.model.value.clone()).collect(),
                targets: rule
                    .targets
                    .iter()
                    .map(|t| TargetModel {
                        name: t.model_rewrite.clone(),
                        weight: t.weight.map(|w| w.max(0) as u32),
                    })
                    .collect(),
            })
            .collect();
        match ModelRules::new(models, objectives, rewrites, UnknownModelPolicy::Route) {
            Ok(rules) => {
                if self.last_rules.as_ref() != Some(&rules) {
                    tracing::info!(models = rules.model_names().count(), "model rules changed");
                    self.datastore.do_send(RulesChanged(rules.clone()));
                    self.last_rules = Some(rules);
                }
            }
            // A bad object keeps the last good rule set in force.
            Err(e) => {
                tracing::error!(error = %e, "InferenceModels rejected; keeping the last good rules")
            }
        }
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    wrap: fn(Event<K>) -> KubeEvent,
) -> impl futures::Stream<Item = KubeEvent>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, cfg)
        .default_backoff()
        .map(move |r| match r {
            Ok(ev) => wrap(ev),
            Err(e) => KubeEvent::Error(e.to_string()),
        })
}

impl Actor for KubeDiscovery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let ns = &self.target.namespace;
        let by_name =
            watcher::Config::default().fields(&format!("metadata.name={}", self.target.name));
        let pool_stream = if self.target.group == "inference.networking.x-k8s.io" {
            watch(
                Api::<v1alpha2::InferencePool>::namespaced(self.client.clone(), ns),
                by_name,
                KubeEvent::PoolV1alpha2,
            )
            .boxed()
        } else {
            watch(
                Api::<v1::InferencePool>::namespaced(self.client.clone(), ns),
                by_name,
                KubeEvent::PoolV1,
            )
            .boxed()
        };
        let mut streams = vec![
            watch(
                Api::<Pod>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                |e| KubeEvent::Pod(Box::new(e)),
            )
            .boxed(),
            watch(
                Api::<v1alpha2::InferenceModel>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                KubeEvent::Model,
            )
            .boxed(),
            watch(
                Api::<v1alpha2::InferenceObjective>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                KubeEvent::Objective,
            )
            .boxed(),
            watch(
                Api::<v1alpha2::InferenceModelRewrite>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                KubeEvent::Rewrite,
            )
            .boxed(),
        ];
        // Standalone on Kubernetes (--endpoint-selector): no InferencePool to watch.
        if self.target.endpoint_selector.is_none() {
            streams.push(pool_stream);
        }
        ctx.add_stream(futures::stream::select_all(streams));
    }
}

impl StreamHandler<KubeEvent> for KubeDiscovery {
    fn handle(&mut self, ev: KubeEvent, _ctx: &mut Context<Self>) {
        let (endpoints, rules) = match ev {
            KubeEvent::PoolV1(e) => (self.pools_v1.apply(e), false),
            KubeEvent::PoolV1alpha2(e) => (self.pools_v1alpha2.apply(e), false),
            KubeEvent::Pod(e) => (self.pods.apply(*e), false),
            KubeEvent::Model(e) => (false, self.models.apply(e)),
            KubeEvent::Objective(e) => (false, self.objectives.apply(e)),
            KubeEvent::Rewrite(e) => (false, self.rewrites.apply(e)),
            KubeEvent::Error(e) => {
                // The watcher retries with backoff; the last known state stays in force.
                if !self.errors_logged {
                    tracing::warn!(error = %e, "Kubernetes watch failed; keeping the last known pool");
                    self.errors_logged = true;
                }
                return;
            }
        };
        self.errors_logged = false;
        if endpoints {
            self.publish_endpoints();
        }
        if rules {
            self.publish_rules();
        }
    }

    /// The merged watch never ends on its own; if it does, keep the actor (and its last state).
    fn finished(&mut self, _ctx: &mut Context<Self>) {
        tracing::error!("Kubernetes watch stream ended; keeping the last known pool");
    }
}
