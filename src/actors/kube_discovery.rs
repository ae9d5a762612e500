//! Kubernetes discovery: watches the InferencePool, its pods and the models that reference it.
//!
//! Each watch keeps its own last known objects. A relist (`Init` .. `InitDone`, after a restart
//! or a 410 Gone) is buffered and swapped in whole, and a watch error leaves the last state in
//! force, so an API outage never empties the endpoint set.

use std::collections::BTreeMap;

use actix::prelude::*;
use futures::StreamExt;
use inferlane_epp::EngineType;
use inferlane_epp::RuleError;
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
use crate::pool::config::EndpointSpec;

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

/// The pool's selector and ports, whatever its API version.
#[derive(Debug, Clone, PartialEq, Default)]
struct PoolView {
    selector: BTreeMap<String, String>,
    ports: Vec<i32>,
}

/// Last known objects of one watch, with relists swapped in whole.
#[derive(Debug)]
struct Tracked<K> {
    /// What is watched, for logs.
    what: &'static str,
    objects: BTreeMap<String, K>,
    relist: Option<BTreeMap<String, K>>,
    /// A whole list has been read at least once (until then an empty set means "unknown").
    synced: bool,
    /// This watch's last error was logged (cleared by its next event), so a watch that
    /// keeps failing (RBAC 403, a CRD not installed) logs once, not once per retry.
    failing: bool,
}

impl<K: Resource> Tracked<K> {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
            failing: false,
        }
    }

    /// Logs a watch error once until the watch recovers.
    fn failed(&mut self, error: &str) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(watch = self.what, error = %error, "Kubernetes watch failing (retrying with backoff); keeping the last known objects. A 403 means the EPP's ClusterRole lacks list/watch on it (deploy/epp/epp.yaml); a 404 that its CRD is not installed");
        }
    }

    /// Applies an event; true when the visible set changed.
    fn apply(&mut self, ev: Event<K>) -> bool {
        // The watcher sends `Init` before each relist attempt, failing ones included: only a
        // listed object or the end of a list shows the watch works again.
        if self.failing && !matches!(ev, Event::Init) {
            self.failing = false;
            tracing::info!(watch = self.what, "Kubernetes watch recovered");
        }
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
                self.synced = true;
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
    Error(Watch, String),
}

/// Which watch an error came from.
#[derive(Debug, Clone, Copy)]
enum Watch {
    PoolV1,
    PoolV1alpha2,
    Pods,
    Models,
    Objectives,
    Rewrites,
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

    /// The group whose object is the pool: `--pool-group`'s, else whichever group holds an
    /// InferencePool of that name (v1 when both do).
    fn pool_group(&self) -> Option<&'static str> {
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
    fn note_pool_group(&mut self) -> bool {
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

    fn publish_endpoints(&mut self) {
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

    fn publish_rules(&mut self, ctx: &mut Context<Self>) {
        let pool = &self.target.name;
        // Oldest first, so the oldest object wins a conflict over a model name (as upstream);
        // a newer duplicate that any namespace user can create never takes a model over.
        let mut objects: Vec<&v1alpha2::InferenceModel> = self
            .models
            .objects
            .values()
            .filter(|m| m.spec.pool_ref.name == *pool)
            .collect();
        objects.sort_by(|a, b| {
            (&a.metadata.creation_timestamp, a.name_any())
                .cmp(&(&b.metadata.creation_timestamp, b.name_any()))
        });
        let mut rejected: Vec<String> = Vec::new();
        // InferenceModel name -> (reason, message) for the Accepted=False condition.
        let mut refused: BTreeMap<String, (&'static str, String)> = BTreeMap::new();
        let mut kept: Vec<&v1alpha2::InferenceModel> = Vec::new();
        let all_names: Vec<String> = objects.iter().map(|m| m.name_any()).collect();
        for m in objects {
            match m.spec.criticality.as_deref() {
                None | Some("Critical" | "Standard" | "Sheddable") => kept.push(m),
                Some(other) => {
                    let msg =
                        format!("criticality {other:?} is not Critical, Standard or Sheddable");
                    rejected.push(format!("InferenceModel {}: {msg}", m.name_any()));
                    refused.insert(m.name_any(), ("Invalid", msg));
                }
            }
        }
        let models: Vec<ModelRule> = kept
            .iter()
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
                    .map(|t| target(&t.name, t.weight))
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
        let rewrite_objects: Vec<&v1alpha2::InferenceModelRewrite> = self
            .rewrites
            .objects
            .values()
            .filter(|r| r.spec.pool_ref.name == *pool)
            .collect();
        let mut rewrite_owner = Vec::new();
        let rewrites: Vec<RewriteRule> = rewrite_objects
            .iter()
            .flat_map(|r| r.spec.rules.iter().map(move |rule| (r.name_any(), rule)))
            .map(|(owner, rule)| {
                rewrite_owner.push(owner);
                RewriteRule {
                    matches: rule.matches.iter().map(|m| m.model.value.clone()).collect(),
                    targets: rule
                        .targets
                        .iter()
                        .map(|t| target(&t.model_rewrite, t.weight))
                        .collect(),
                }
            })
            .collect();
        let n_models = kept.len();
        let unknown = unknown_models_for(self.pool_group().unwrap_or(GROUP_V1));
        let (rules, bad) = ModelRules::lenient(models, objectives, rewrites, unknown);
        for (i, e) in bad {
            rejected.push(if i < n_models {
                let m = kept[i];
                match e {
                    RuleError::Duplicate(name) => {
                        let owner = kept
                            .iter()
                            .find(|o| o.spec.model_name == name)
                            .map(|o| o.name_any())
                            .unwrap_or_default();
                        refused.insert(
                            m.name_any(),
                            (
                                "ModelNameInUse",
                                format!("modelName {name:?} is already claimed by the older InferenceModel {owner:?}"),
                            ),
                        );
                        format!(
                            "InferenceModel {}: modelName {name:?} is already claimed by the older InferenceModel {owner:?}; this one is ignored until that one is deleted",
                            m.name_any()
                        )
                    }
                    e => {
                        refused.insert(m.name_any(), ("Invalid", e.to_string()));
                        format!("InferenceModel {}: {e}", m.name_any())
                    }
                }
            } else {
                format!(
                    "InferenceModelRewrite {}: {e}",
                    rewrite_owner.get(i - n_models).map(String::as_str).unwrap_or("?")
                )
            });
        }
        // Each rejection is logged when it first appears, not on every later event.
        for r in &rejected {
            if !self.last_rejected.contains(r) {
                tracing::error!(reason = %r, "model object ignored; every other rule stays in force");
            }
        }
        self.last_rejected = rejected;
        self.write_model_status(&all_names, refused, ctx);
        if self.last_rules.as_ref() != Some(&rules) {
            tracing::info!(models = rules.model_names().count(), "model rules changed");
            self.datastore.do_send(RulesChanged(rules.clone()));
            self.last_rules = Some(rules);
        }
    }
}

impl KubeDiscovery {
    /// Writes the `Accepted` condition of this pool's InferenceModels whose state changed:
    /// False (reason ModelNameInUse or Invalid) on the ones ignored, True once they are in
    /// force again, so `kubectl get inferencemodel -o yaml` says why one does not route.
    fn write_model_status(
        &mut self,
        names: &[String],
        refused: BTreeMap<String, (&'static str, String)>,
        ctx: &mut Context<Self>,
    ) {
        let mut writes = Vec::new();
        for name in names {
            // What the object carries now (written by us, another replica or an earlier run):
            // (accepted, reason, message).
            let current = self
                .models
                .objects
                .get(name)
                .and_then(|m| m.status.as_ref())
                .and_then(|st| st.conditions.iter().find(|c| c["type"] == "Accepted"))
                .map(|c| {
                    (
                        c["status"] == "True",
                        c["reason"].as_str().unwrap_or("").to_string(),
                        c["message"].as_str().unwrap_or("").to_string(),
                    )
                });
            let want = match refused.get(name) {
                Some((reason, msg)) => (false, reason.to_string(), msg.clone()),
                // Accepted ones are written only to clear an Accepted=False.
                None if current.as_ref().is_some_and(|(ok, _, _)| !ok) => {
                    (true, "Accepted".to_string(), String::new())
                }
                None => continue,
            };
            if current.as_ref() == Some(&want) || self.status_written.get(name) == Some(&want) {
                continue;
            }
            let (ok, reason, message) = &want;
            let patch = serde_json::json!({"status": {"conditions": [{
                "type": "Accepted",
                "status": if *ok { "True" } else { "False" },
                "reason": reason,
                "message": message,
                "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            }]}});
            self.status_written.insert(name.clone(), want);
            writes.push((name.clone(), patch));
        }
        self.status_written.retain(|n, _| names.contains(n));
        if writes.is_empty() {
            return;
        }
        let api: Api<v1alpha2::InferenceModel> =
            Api::namespaced(self.client.clone(), &self.target.namespace);
        let fut = async move {
            let mut errors = Vec::new();
            for (name, patch) in writes {
                let pp = kube::api::PatchParams::default();
                if let Err(e) = api
                    .patch_status(&name, &pp, &kube::api::Patch::Merge(&patch))
                    .await
                {
                    errors.push(format!("{name}: {e}"));
                }
            }
            errors
        };
        ctx.spawn(fut.into_actor(self).map(|errors, act, _| {
            if errors.is_empty() {
                act.status_failing = false;
            } else if !act.status_failing {
                act.status_failing = true;
                tracing::warn!(errors = ?errors, "cannot write InferenceModel status (grant patch on inferencemodels/status); the reason is in this log only");
            }
        }));
    }
}

/// Keeps of a Pod only what routing reads (name, labels, deletion mark, IP, Ready): a
/// namespace's pods are watched whole, and their specs, annotations and managed fields would
/// otherwise be held for every pod for the life of the EPP.
fn trim_pod(pod: &mut Pod) {
    pod.spec = None;
    let m = &mut pod.metadata;
    m.annotations = None;
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
    if let Some(st) = pod.status.as_mut() {
        let ready: Option<Vec<_>> = st.conditions.take().map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|mut c| {
                    c.message = None;
                    c.reason = None;
                    c
                })
                .collect()
        });
        *st = k8s_openapi::api::core::v1::PodStatus {
            pod_ip: st.pod_ip.take(),
            conditions: ready,
            ..Default::default()
        };
    }
}

/// A weighted target from an object (a negative weight, which the CRD refuses, counts as 0).
fn target(name: &str, weight: Option<i32>) -> TargetModel {
    TargetModel {
        name: name.to_string(),
        weight: weight.map(|w| w.max(0) as u32),
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
    which: Watch,
    wrap: fn(Event<K>) -> KubeEvent,
) -> impl futures::Stream<Item = KubeEvent>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, cfg)
        .default_backoff()
        .map(move |r| match r {
            Ok(ev) => wrap(ev),
            Err(e) => KubeEvent::Error(which, e.to_string()),
        })
}

impl KubeDiscovery {
    fn pool_stream(&self, group: &str) -> futures::stream::BoxStream<'static, KubeEvent> {
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
        // No --pool-group: watch the pool's name in every group the API server serves (a
        // cluster with upstream's v1 CRDs installed usually serves both), and look again for
        // a group that is not there yet (CRDs installed after the EPP started).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_pods_keep_what_routing_reads_only() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "labels": {"app": "vllm"}, "deletionTimestamp": "2026-01-01T00:00:00Z",
                         "annotations": {"big": "x".repeat(10_000)},
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"containers": [{"name": "vllm", "image": "vllm", "args": ["--model", "m"]}]},
            "status": {"podIP": "10.0.0.7", "phase": "Running",
                       "containerStatuses": [{"name": "vllm", "ready": true, "restartCount": 0, "image": "i", "imageID": "i"}],
                       "conditions": [{"type": "Ready", "status": "True", "message": "m"},
                                      {"type": "PodScheduled", "status": "True"}]}
        }))
        .unwrap();
        let size = |p: &Pod| serde_json::to_string(p).unwrap().len();
        let before = size(&pod);
        trim_pod(&mut pod);
        assert!(size(&pod) < before / 20, "{} -> {}", before, size(&pod));
        assert!(pod_ready(&pod));
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("vllm"));
        assert!(pod.metadata.deletion_timestamp.is_some());
        assert_eq!(pod.status.unwrap().pod_ip.as_deref(), Some("10.0.0.7"));
    }
}
