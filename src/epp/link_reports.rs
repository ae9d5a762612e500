//! `POST /lora/v1/links`: a sidecar reports which served names its server's LoRA resolver can load (`--lora-copy-names versioned`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::lora_fleet::links::MAX_LINKED;
use crate::lora_fleet::lock_links;
use crate::lora_fleet::wire::LinksReport;
use crate::pool::state::Shared;

/// Largest report read: a served name per catalogue adapter, and a ConfigMap (names and
/// sources together) holds at most 1 MiB. Each server's last report is kept: this bounds
/// what a sender can make the EPP hold per server.
pub const MAX_LINKS_POST: usize = 1 << 20;

/// The handler's state.
#[derive(Clone)]
pub struct LinksState {
    pub shared: Arc<Shared>,
    /// No `--metrics-endpoint-auth`: a report is taken only from its server's own pod
    /// (the sidecar shares the server's address) or loopback; with auth, a token.
    pub peer_must_match: bool,
}

/// Records the report for its server (one the table names), answering 204.
pub async fn links(
    State(st): State<LinksState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::Json(r): axum::Json<LinksReport>,
) -> Response {
    let table = st.shared.fleet.table.load_full();
    let Some(routed) = table else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no placement yet; report again later\n",
        )
            .into_response();
    };
    let Some((id, part)) = routed.table.part(&r.server) else {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "server {:?} is not in the placement table (give its pod name or ip:port)\n",
                crate::pool::labels::for_log(&r.server)
            ),
        )
            .into_response();
    };
    if !routed.table.versioned_copies {
        return (
            StatusCode::CONFLICT,
            "this EPP asks resolvers for plain ids (--lora-copy-names plain): links are not reported\n",
        )
            .into_response();
    }
    let address = &part.address;
    if st.peer_must_match && !peer.ip().is_loopback() && !same_host(address, &peer) {
        return (
            StatusCode::FORBIDDEN,
            format!("links for {address} are taken from that pod only (its sidecar), or with --metrics-endpoint-auth from any caller with a token\n"),
        )
            .into_response();
    }
    if r.linked.len() > MAX_LINKED {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_LINKED} linked names per report\n"),
        )
            .into_response();
    }
    let linked: BTreeSet<String> = r.linked.into_iter().collect();
    lock_links(&st.shared.fleet.links).record(id, Arc::new(linked), Instant::now());
    StatusCode::NO_CONTENT.into_response()
}

/// Records reports a follower forwarded (those for servers the table names).
pub fn forwarded(shared: &Shared, reports: Vec<LinksReport>) {
    let table = shared.fleet.table.load_full();
    let Some(routed) = table else { return };
    let now = Instant::now();
    let mut links = lock_links(&shared.fleet.links);
    for r in reports.into_iter().filter(|r| r.linked.len() <= MAX_LINKED) {
        if let Some((id, _)) = routed.table.part(&r.server) {
            links.record(id, Arc::new(r.linked.into_iter().collect()), now);
        }
    }
}

fn same_host(address: &str, peer: &SocketAddr) -> bool {
    address
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().to_canonical() == peer.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use tower::ServiceExt;

    use crate::lora_fleet::Routed;
    use crate::lora_fleet::wire::{ServerPart, Table};

    fn shared(versioned: bool) -> Arc<Shared> {
        let shared = Arc::new(Shared::new(Default::default()));
        let mut t = Table {
            resolver: true,
            versioned_copies: versioned,
            ..Table::default()
        };
        let part = ServerPart {
            address: "10.0.0.7:8000".into(),
            ..Default::default()
        };
        t.servers.insert("vllm-0".into(), part);
        shared
            .fleet
            .table
            .store(Some(Arc::new(Routed::new(t, None))));
        shared
    }

    async fn post(shared: &Arc<Shared>, must_match: bool, peer: &str, body: &str) -> StatusCode {
        let app = axum::Router::new()
            .route("/lora/v1/links", axum::routing::post(links))
            .with_state(LinksState {
                shared: shared.clone(),
                peer_must_match: must_match,
            })
            .layer(MockConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        let req = axum::http::Request::post("/lora/v1/links")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        app.oneshot(req).await.unwrap().status()
    }

    /// Reports change where copies are asked for: without auth only the server's own pod
    /// (or loopback) may send its report; a server the table does not name is refused, so
    /// the store is bounded by the pool.
    #[tokio::test]
    async fn a_report_is_taken_from_its_own_pod_for_a_server_in_the_table() {
        let body = r#"{"server":"vllm-0","linked":["a@00000001"]}"#;
        let by_address = r#"{"server":"10.0.0.7:8000","linked":["a@00000001"]}"#;
        let s = shared(true);
        let now = Instant::now();
        assert_eq!(
            post(&s, true, "10.0.0.9:4000", body).await,
            StatusCode::FORBIDDEN
        );
        assert!(lock_links(&s.fleet.links).linked("vllm-0", now).is_none());
        assert_eq!(
            post(&s, true, "10.0.0.7:4000", body).await,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            post(&s, true, "127.0.0.1:4000", by_address).await,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            post(&s, false, "10.0.0.9:4000", body).await,
            StatusCode::NO_CONTENT,
            "auth on"
        );
        let linked = lock_links(&s.fleet.links)
            .linked("vllm-0", Instant::now())
            .cloned();
        assert_eq!(linked, Some(["a@00000001".to_string()].into()));
        let other = r#"{"server":"vllm-9","linked":[]}"#;
        assert_eq!(
            post(&s, false, "10.0.0.9:4000", other).await,
            StatusCode::NOT_FOUND
        );
        assert!(
            post(&s, false, "10.0.0.9:4000", "{")
                .await
                .is_client_error()
        );
        // A follower's forwarded reports: those for servers in the table (an older
        // follower's post has none).
        let s = shared(true);
        let report = |server: &str| LinksReport {
            server: server.into(),
            linked: vec!["b@00000001".into()],
        };
        forwarded(&s, vec![report("10.0.0.7:8000"), report("vllm-9")]);
        {
            let links = lock_links(&s.fleet.links);
            assert!(links.linked("vllm-0", Instant::now()).is_some());
            assert!(links.linked("vllm-9", Instant::now()).is_none());
        }
        let old: crate::lora_fleet::wire::DemandPost =
            serde_json::from_str(r#"{"counts":[]}"#).unwrap();
        assert!(old.links.is_empty());
        // A plain-copies EPP takes none.
        assert_eq!(
            post(&shared(false), false, "10.0.0.7:4000", body).await,
            StatusCode::CONFLICT
        );
        // No table yet.
        let empty = Arc::new(Shared::new(Default::default()));
        assert_eq!(
            post(&empty, false, "10.0.0.7:4000", body).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
