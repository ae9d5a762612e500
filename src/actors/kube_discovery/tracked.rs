//! One watch's last known objects: a relist is buffered and swapped in whole, an error leaves the last state in force; and what of a Pod is kept.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};

/// Last known objects of one watch, with relists swapped in whole.
#[derive(Debug)]
pub(super) struct Tracked<K> {
    /// What is watched, for logs.
    pub(super) what: &'static str,
    pub(super) objects: BTreeMap<String, K>,
    pub(super) relist: Option<BTreeMap<String, K>>,
    /// A whole list has been read at least once (until then an empty set means "unknown").
    pub(super) synced: bool,
    /// This watch's last error was logged (cleared by its next event), so a watch that
    /// keeps failing (RBAC 403, a CRD not installed) logs once, not once per retry.
    pub(super) failing: bool,
}

impl<K: Resource> Tracked<K> {
    pub(super) fn new(what: &'static str) -> Self {
        Self {
            what,
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
            failing: false,
        }
    }

    /// Logs a watch error once until the watch recovers.
    pub(super) fn failed(&mut self, error: &str) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(watch = self.what, error = %error, "Kubernetes watch failing (retrying with backoff); keeping the last known objects. A 403 means the EPP's ClusterRole lacks list/watch on it (deploy/epp/epp.yaml); a 404 that its CRD is not installed");
        }
    }

    /// Applies an event; true when the visible set changed.
    pub(super) fn apply(&mut self, ev: Event<K>) -> bool {
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

/// Keeps of a Pod only what routing reads (name, labels, deletion mark, IP, Ready): a
/// namespace's pods are watched whole, and their specs, annotations and managed fields would
/// otherwise be held for every pod for the life of the EPP.
pub(super) fn trim_pod(pod: &mut Pod) {
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

pub(super) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
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
