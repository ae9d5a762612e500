//! `--lora-placement-election`: active-active replicas elect the one that places LoRA adapters on a Lease; the others read its table's URL from that Lease.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::Actor;

use super::EppError;
use super::args::EppArgs;
use crate::actors::leader::{LeaderElector, LeaseOptions};
use crate::pool::state::Shared;

/// The lease annotation carrying the decider's `/lora/v1/placement` URL.
pub const URL_ANNOTATION: &str = "inferlane.dev/lora-placement-url";

/// The service account token a follower sends to a decider that checks tokens.
pub const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Where the other replicas read this one's table: the flag, else the pod's address.
fn advertised(args: &EppArgs, metrics_port: u16) -> Result<String, EppError> {
    if let Some(u) = &args.lora_placement_advertise_url {
        return Ok(u.clone());
    }
    let ip = std::env::var("POD_IP").map_err(|_| {
        EppError::Placement(
            "--lora-placement-election: set POD_IP from the downward API (fieldPath: status.podIP) or give --lora-placement-advertise-url, so the other replicas can read this one's table".into(),
        )
    })?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip
    };
    Ok(format!("http://{host}:{metrics_port}/lora/v1/placement"))
}

/// Campaigns for `<pool>-epp-lora-placement`; publishes whether this replica decides and,
/// when another does, its URL.
pub fn start(
    client: kube::Client,
    args: &EppArgs,
    shared: &Arc<Shared>,
    identity: String,
    metrics_port: u16,
) -> Result<(), EppError> {
    let url = advertised(args, metrics_port)?;
    tracing::info!(%url, "campaigning to decide LoRA placement");
    LeaderElector::new(
        client,
        LeaseOptions {
            namespace: args.pool_namespace.clone(),
            name: format!("{}-epp-lora-placement", args.pool_name),
            identity,
            lease_duration: args.lease_duration,
            renew_every: args.lease_renew_interval,
            annotations: BTreeMap::from([(URL_ANNOTATION.to_string(), url)]),
        },
        shared.fleet.elected.clone(),
    )
    .publish_holder_annotation(URL_ANNOTATION, shared.fleet.decider.clone())
    .start();
    Ok(())
}
