//! Leader election on a coordination.k8s.io Lease: only the leader reports ready (upstream's HA mode).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use arc_swap::ArcSwapOption;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Verbs the elector uses on `coordination.k8s.io` leases (RBAC must grant them).
pub const LEASE_VERBS: &[&str] = &["get", "create", "update"];

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// Written on the lease while this replica holds it (what followers need of the
    /// holder, e.g. where to reach it).
    pub annotations: BTreeMap<String, String>,
}

/// Holds or waits for the Lease; publishes leadership in `is_leader`.
///
/// As client-go's leader election: another holder's lease is judged expired by *local*
/// observation (the record has not changed for a lease duration on our clock), never by
/// comparing our clock with its renewTime, so clock skew cannot steal a live lease; every
/// round is bounded in time, and a leader that has not renewed within the renew deadline
/// steps down (even while a call hangs) before a follower may take over.
pub struct LeaderElector {
    api: Api<Lease>,
    opts: LeaseOptions,
    is_leader: Arc<AtomicBool>,
    busy: bool,
    last_error: Option<String>,
    /// The last lease record seen and when (our clock) it was first seen so.
    observed: Option<(Record, Instant)>,
    /// When this replica last renewed (or acquired) the lease.
    renewed_at: Option<Instant>,
    /// Where to publish one annotation of the holder's lease (`None` while we hold it).
    holder_annotation: Option<(String, Arc<ArcSwapOption<String>>)>,
}

/// What identifies one version of the lease holder's record (client-go compares the same).
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    acquire_time: Option<MicroTime>,
    transitions: Option<i32>,
    resource_version: Option<String>,
    annotations: BTreeMap<String, String>,
}

impl LeaderElector {
    pub fn new(client: Client, opts: LeaseOptions, is_leader: Arc<AtomicBool>) -> Self {
        Self {
            api: Api::namespaced(client, &opts.namespace),
            opts,
            is_leader,
            busy: false,
            last_error: None,
            observed: None,
            renewed_at: None,
            holder_annotation: None,
        }
    }

    /// Publishes the holder's annotation `key` into `slot` after every round that read the
    /// lease held by another replica; clears it while this one holds it.
    pub fn publish_holder_annotation(
        mut self,
        key: &str,
        slot: Arc<ArcSwapOption<String>>,
    ) -> Self {
        self.holder_annotation = Some((key.to_string(), slot));
        self
    }

    /// client-go's renew deadline for the default 15 s / 2 s: two thirds of the lease, and
    /// at least two renew intervals.
    fn renew_deadline(&self) -> Duration {
        (self.opts.lease_duration * 2 / 3).max(self.opts.renew_every * 2)
    }

    fn set_leader(&mut self, leader: bool) {
        if self.is_leader.swap(leader, Ordering::SeqCst) != leader {
            tracing::info!(leader, identity = %self.opts.identity, lease = %self.opts.name, "leadership changed");
        }
    }
}

/// A round's outcome.
enum Round {
    /// We hold the lease (created, renewed or taken over).
    Leader,
    /// Someone else holds it; their record as read.
    Follower(Option<Record>),
}

fn record(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity,
        renew_time: spec.renew_time,
        acquire_time: spec.acquire_time,
        transitions: spec.lease_transitions,
        resource_version: lease.metadata.resource_version.clone(),
        annotations: lease.metadata.annotations.clone().unwrap_or_default(),
    }
}

/// One round: create, renew, take over a lease whose record has not changed for a lease
/// duration on our clock (`expired`, decided by the caller's observation), or stay a follower.
async fn round(
    api: &Api<Lease>,
    o: &LeaseOptions,
    observed: Option<(Record, Instant)>,
) -> Result<Round, kube::Error> {
    let now = Timestamp::now();
    let spec = |acquire: Option<MicroTime>, transitions: i32| LeaseSpec {
        holder_identity: Some(o.identity.clone()),
        lease_duration_seconds: Some(o.lease_duration.as_secs().max(1) as i32),
        acquire_time: acquire.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&o.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(o.name.clone()),
                annotations: (!o.annotations.is_empty()).then(|| o.annotations.clone()),
                ..Default::default()
            },
            spec: Some(spec(None, 0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Round::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Follower(None)),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let seen = record(&lease);
    let mine = current.holder_identity.as_deref() == Some(o.identity.as_str());
    let held = current
        .holder_identity
        .as_deref()
        .is_some_and(|h| !h.is_empty());
    // Expired only when we have watched this very record unchanged for a lease duration.
    let expired =
        !held || observed.is_some_and(|(r, since)| r == seen && since.elapsed() > o.lease_duration);
    if !mine && !expired {
        return Ok(Round::Follower(Some(seen)));
    }
    let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!mine);
    lease.spec = Some(spec(
        if mine { current.acquire_time } else { None },
        transitions,
    ));
    if !o.annotations.is_empty() {
        lease
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .extend(o.annotations.clone());
    }
    // The resourceVersion in `lease` makes this a compare-and-swap: a rival's update wins.
    match api.replace(&o.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Round::Leader),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Follower(None)),
        Err(e) => Err(e),
    }
}

impl LeaderElector {
    fn tick(&mut self, ctx: &mut Context<Self>) {
        // A leader that could not renew within the deadline steps down now, even if a call
        // is still hanging: followers may take over once the lease duration has passed.
        if self.is_leader.load(Ordering::SeqCst)
            && self
                .renewed_at
                .is_none_or(|t| t.elapsed() > self.renew_deadline())
        {
            tracing::warn!(deadline = ?self.renew_deadline(), "lease not renewed within the renew deadline; stepping down");
            self.set_leader(false);
        }
        if self.busy {
            return;
        }
        self.busy = true;
        let api = self.api.clone();
        let o = self.opts.clone();
        let observed = self.observed.clone();
        // No call may outlive the renew deadline.
        let limit = self.renew_deadline();
        ctx.spawn(
            async move {
                match tokio::time::timeout(limit, round(&api, &o, observed)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("lease round timed out after {limit:?}")),
                }
            }
            .into_actor(self)
            .map(|res, act, _| {
                act.busy = false;
                let leader = match res {
                    Ok(Round::Leader) => {
                        act.last_error = None;
                        act.renewed_at = Some(Instant::now());
                        act.observed = None;
                        true
                    }
                    Ok(Round::Follower(seen)) => {
                        act.last_error = None;
                        if let (Some((key, slot)), Some(r)) = (&act.holder_annotation, &seen) {
                            slot.store(r.annotations.get(key).cloned().map(Arc::new));
                        }
                        if let Some(seen) = seen
                            && act.observed.as_ref().is_none_or(|(r, _)| *r != seen)
                        {
                            act.observed = Some((seen, Instant::now()));
                        }
                        false
                    }
                    Err(e) => {
                        if act.last_error.as_deref() != Some(e.as_str()) {
                            tracing::warn!(error = %e, "lease round failed");
                            act.last_error = Some(e);
                        }
                        // A leader keeps leading until its renew deadline (checked on
                        // every tick); a follower stays one.
                        act.is_leader.load(Ordering::SeqCst)
                            && act
                                .renewed_at
                                .is_some_and(|t| t.elapsed() <= act.renew_deadline())
                    }
                };
                if leader && let Some((_, slot)) = &act.holder_annotation {
                    slot.store(None);
                }
                act.set_leader(leader);
            }),
        );
    }
}

impl Actor for LeaderElector {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.tick(ctx);
        ctx.run_interval(self.opts.renew_every, |act, ctx| act.tick(ctx));
    }
}
