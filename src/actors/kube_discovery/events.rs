//! The watches discovery keeps, merged into one stream of facts for the actor.

use actix::prelude::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use crate::crds::{v1, v1alpha2};

/// Everything discovery watches, merged into one stream for the actor.
pub(super) enum KubeEvent {
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
pub(super) enum Watch {
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

pub(super) fn watch<K>(
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
