//! Watches ConfigMaps through the Kubernetes API (for setups that cannot mount them) and publishes valid configs.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};

use super::file_watcher::{WatchMetrics, WatchedConfig};
use super::messages::ConfigChanged;

/// Which ConfigMaps make the config.
#[derive(Debug, Clone)]
pub enum ConfigMapSource {
    /// One ConfigMap; the config is the text under `key`.
    Named {
        namespace: String,
        name: String,
        key: String,
    },
    /// Every ConfigMap matching a label selector; the config is all of them as a multi-document
    /// YAML stream of ConfigMap objects.
    Labelled { namespace: String, selector: String },
}

impl ConfigMapSource {
    /// Parses `namespace/name` (the lora-sidecar's `--configmap`).
    pub fn named(spec: &str, key: &str) -> Result<Self, String> {
        match spec.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok(Self::Named {
                namespace: ns.into(),
                name: name.into(),
                key: key.into(),
            }),
            _ => Err(format!("{spec:?}: expected namespace/name")),
        }
    }
}

struct CmEvent(Result<Event<ConfigMap>, String>);

impl Message for CmEvent {
    type Result = ();
}

/// The actor: relists swap in whole; a text is parsed once per change; an invalid version keeps
/// the last good config in force.
pub struct ConfigMapWatcher<C: WatchedConfig> {
    client: Client,
    source: ConfigMapSource,
    subscriber: Recipient<ConfigChanged<C>>,
    metrics: WatchMetrics,
    objects: BTreeMap<String, ConfigMap>,
    relist: Option<BTreeMap<String, ConfigMap>>,
    last_text: Option<String>,
    last_error: Option<String>,
    generation: u64,
    /// The watch is failing and that was logged (once, until it recovers).
    watch_failing: bool,
}

impl<C: WatchedConfig> ConfigMapWatcher<C> {
    pub fn new(
        client: Client,
        source: ConfigMapSource,
        subscriber: Recipient<ConfigChanged<C>>,
        metrics: WatchMetrics,
    ) -> Self {
        Self {
            client,
            source,
            subscriber,
            metrics,
            objects: BTreeMap::new(),
            relist: None,
            watch_failing: false,
            last_text: None,
            last_error: None,
            generation: 0,
        }
    }

    fn text(&self) -> Result<String, String> {
        match &self.source {
            ConfigMapSource::Named {
                namespace,
                name,
                key,
            } => {
                let cm = self
                    .objects
                    .get(name)
                    .ok_or_else(|| format!("ConfigMap {namespace}/{name} not found"))?;
                cm.data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .cloned()
                    .ok_or_else(|| format!("ConfigMap {namespace}/{name} has no data key {key:?}"))
            }
            ConfigMapSource::Labelled { .. } => {
                let mut out = String::new();
                for cm in self.objects.values() {
                    let mut cm = cm.clone();
                    // Only what the parser reads: kind, name, labels, data.
                    cm.metadata.managed_fields = None;
                    out.push_str("---\n");
                    out.push_str(&serde_yaml::to_string(&cm).map_err(|e| e.to_string())?);
                }
                Ok(out)
            }
        }
    }

    fn evaluate(&mut self) {
        let res = self.text().and_then(|t| {
            C::parse(&t, true)
                .map(|c| (t, c))
                .map_err(|e| e.to_string())
        });
        match res {
            Ok((text, config)) => {
                if self.last_text.as_deref() == Some(text.as_str()) {
                    return;
                }
                self.last_text = Some(text);
                self.last_error = None;
                self.generation += 1;
                self.metrics.valid.set(1);
                self.metrics.generation.set(self.generation as i64);
                for w in config.warnings() {
                    tracing::warn!(warning = %w, "config accepted with a warning");
                }
                tracing::info!(generation = self.generation, summary = %config.summary(), source = ?self.source, "config applied");
                self.subscriber.do_send(ConfigChanged {
                    config: Arc::new(config),
                    generation: self.generation,
                });
            }
            Err(e) => {
                self.metrics.valid.set(0);
                if self.last_error.as_deref() != Some(e.as_str()) {
                    self.metrics.errors.inc();
                    tracing::error!(error = %e, source = ?self.source, "config rejected; the last good config stays in force");
                    self.last_error = Some(e);
                }
            }
        }
    }
}

impl<C: WatchedConfig> Actor for ConfigMapWatcher<C> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (api, cfg) = match &self.source {
            ConfigMapSource::Named {
                namespace, name, ..
            } => (
                Api::<ConfigMap>::namespaced(self.client.clone(), namespace),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
            ),
            ConfigMapSource::Labelled {
                namespace,
                selector,
            } => (
                Api::<ConfigMap>::namespaced(self.client.clone(), namespace),
                watcher::Config::default().labels(selector),
            ),
        };
        let stream = watcher::watcher(api, cfg)
            .default_backoff()
            .map(|r| CmEvent(r.map_err(|e| e.to_string())));
        ctx.add_stream(stream);
    }
}

impl<C: WatchedConfig> StreamHandler<CmEvent> for ConfigMapWatcher<C> {
    fn handle(&mut self, ev: CmEvent, _ctx: &mut Context<Self>) {
        // `Init` comes before every relist attempt, failing ones too: only data shows recovery.
        if self.watch_failing && matches!(ev.0, Ok(ref e) if !matches!(e, Event::Init)) {
            self.watch_failing = false;
            tracing::info!(source = ?self.source, "ConfigMap watch recovered");
        }
        match ev.0 {
            Ok(Event::Init) => self.relist = Some(BTreeMap::new()),
            Ok(Event::InitApply(cm)) => {
                if let Some(r) = self.relist.as_mut() {
                    r.insert(cm.name_any(), cm);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(r) = self.relist.take() {
                    self.objects = r;
                }
                self.evaluate();
            }
            Ok(Event::Apply(cm)) => {
                self.objects.insert(cm.name_any(), cm);
                self.evaluate();
            }
            Ok(Event::Delete(cm)) => {
                self.objects.remove(&cm.name_any());
                self.evaluate();
            }
            // Retried with backoff; the last good config stays in force meanwhile. Logged once
            // until it recovers: a missing RBAC grant would otherwise log on every retry.
            Err(e) => {
                if !self.watch_failing {
                    self.watch_failing = true;
                    tracing::warn!(error = %e, source = ?self.source, "ConfigMap watch failing (retrying with backoff); the last good config stays in force. A 403 means the ServiceAccount lacks get/list/watch on configmaps");
                } else {
                    tracing::debug!(error = %e, "ConfigMap watch still failing");
                }
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        tracing::error!("ConfigMap watch ended; keeping the last good config");
    }
}
