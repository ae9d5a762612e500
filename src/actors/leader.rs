//! Leader election on a coordination.k8s.io Lease: only the leader reports ready (upstream's HA mode).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::prelude::*;
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
}

/// Holds or waits for the Lease; publishes leadership in `is_leader`.
pub struct LeaderElector {
    api: Api<Lease>,
    opts: LeaseOptions,
    is_leader: Arc<AtomicBool>,
    busy: bool,
    last_error: Option<String>,
}

impl LeaderElector {
    pub fn new(client: Client, opts: LeaseOptions, is_leader: Arc<AtomicBool>) -> Self {
        Self {
            api: Api::namespaced(client, &opts.namespace),
            opts,
            is_leader,
            busy: false,
            last_error: None,
        }
    }
}

/// One round: create, renew, take over an expired lease, or stay a follower. Ok(true) = leader.
async fn round(api: &Api<Lease>, o: &LeaseOptions) -> Result<bool, kube::Error> {
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
                ..Default::default()
            },
            spec: Some(spec(None, 0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let mine = current.holder_identity.as_deref() == Some(o.identity.as_str());
    let expired = match (&current.renew_time, current.lease_duration_seconds) {
        (Some(MicroTime(t)), Some(d)) => {
            now.as_millisecond() - t.as_millisecond() > i64::from(d) * 1000
        }
        _ => true,
    };
    if !mine && !expired {
        return Ok(false);
    }
    let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!mine);
    lease.spec = Some(spec(
        if mine { current.acquire_time } else { None },
        transitions,
    ));
    // The resourceVersion in `lease` makes this a compare-and-swap: a rival's update wins.
    match api.replace(&o.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

impl LeaderElector {
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let api = self.api.clone();
        let o = self.opts.clone();
        ctx.spawn(
            async move { round(&api, &o).await }
                .into_actor(self)
                .map(|res, act, _| {
                    act.busy = false;
                    let leader = match res {
                        Ok(l) => {
                            act.last_error = None;
                            l
                        }
                        Err(e) => {
                            // Cannot renew: step down rather than risk two leaders.
                            let e = e.to_string();
                            if act.last_error.as_deref() != Some(e.as_str()) {
                                tracing::warn!(error = %e, "lease round failed");
                                act.last_error = Some(e);
                            }
                            false
                        }
                    };
                    if act.is_leader.swap(leader, Ordering::SeqCst) != leader {
                        tracing::info!(leader, identity = %act.opts.identity, lease = %act.opts.name, "leadership changed");
                    }
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
