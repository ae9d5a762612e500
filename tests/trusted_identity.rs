//! Priority and tenant come from an authenticated identity, not from the client's own headers: the shipped Envoy config strips them, Envoy's jwt_authn sets them from a token's claims.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(20);
const SECRET: &[u8] = b"inferlane-test-signing-key-0123456789";
const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// An HS256 JWT over `claims`.
fn jwt(claims: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT","kid":"test"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let sig = ring::hmac::sign(&key, format!("{header}.{body}").as_bytes());
    format!("{header}.{body}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// Envoy's jwt_authn after the strip: a valid token's `tier` claim becomes the objective and
/// its `sub` the tenant; requests without a token pass with neither.
fn identity_filter() -> String {
    let jwks = json!({"keys": [{"kty": "oct", "alg": "HS256", "kid": "test",
                                "k": URL_SAFE_NO_PAD.encode(SECRET)}]})
    .to_string();
    format!(
        r#"          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                tenants:
                  local_jwks:
                    inline_string: '{jwks}'
                  forward: false
                  claim_to_headers:
                  - {{header_name: x-gateway-inference-objective, claim_name: tier}}
                  - {{header_name: x-gateway-inference-fairness-id, claim_name: sub}}
              rules:
              - match: {{prefix: "/"}}
                requires:
                  requires_any:
                    requirements:
                    - provider_name: tenants
                    - allow_missing: {{}}
"#
    )
}

/// Held requests under flow control show who they were taken for in the queue series:
/// a client naming a premium objective and fresh tenant ids in its own headers (both
/// names, upstream's and llm-d's) is held as the default flow at priority 0; a token's
/// claims put the next request in its tenant at premium, and it is dispatched first.
#[tokio::test]
async fn client_headers_cannot_raise_priority_or_pick_a_tenant_a_token_can() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let sim = spawn_sim(
        &[
            "--max-num-seqs",
            "1",
            "--decode-base-ms",
            "20",
            "--time-scale",
            "0.1",
        ],
        dir.path(),
    );
    let pool = dir.path().join("pool.yaml");
    std::fs::write(
        &pool,
        format!(
            "pool: {{name: test-pool}}\nendpoints:\n- address: {}\nmodels:\n- modelName: chat\n  targetModels: [{{name: {BASE}}}]\nobjectives:\n- {{name: premium, priority: 10}}\n",
            sim.addr
        ),
    )
    .unwrap();
    let cfg = "featureGates: [flowControl]\nsaturationDetector: {runningRequestsThreshold: 1}\nflowControl:\n  defaultRequestTTL: 60s\n";
    let epp = spawn_epp(&pool, &["--config-text", cfg], dir.path());
    let filter = identity_filter();
    let envoy = spawn_envoy(
        &EnvoyOptions {
            epp_port: port_of(&epp.grpc),
            full_duplex: false,
            fail_open: false,
            extra_filters: &filter,
        },
        dir.path(),
    )
    .await;
    let url = format!("http://127.0.0.1:{}/v1/completions", envoy.port);
    let metrics = format!("http://{}/metrics", epp.metrics);
    let held = |fairness: &'static str, priority: &'static str| {
        let c = c.clone();
        let metrics = metrics.clone();
        async move {
            let page = try_text(&c, &metrics).await?;
            let series = format!("fairness_id=\"{fairness}\"");
            let prio = format!("priority=\"{priority}\"");
            page.lines()
                .filter(|l| l.starts_with("inference_extension_flow_control_queue_size{"))
                .any(|l| l.contains(&series) && l.contains(&prio) && l.ends_with(" 1"))
                .then_some(())
        }
    };
    // The batch slot busy: everything after it is held.
    let blocker = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            c.post(url)
                .json(&json!({"model": "chat", "prompt": "blocker", "max_tokens": 60}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    wait_for("the blocker running", T, || async {
        (sim_total(&c, &sim).await == 1).then_some(())
    })
    .await;
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |tag: &'static str, headers: Vec<(&'static str, String)>| {
        let (c, url, order) = (c.clone(), url.clone(), order.clone());
        tokio::spawn(async move {
            let mut r = c
                .post(url)
                .json(&json!({"model": "chat", "prompt": tag, "max_tokens": 2}));
            for (k, v) in headers {
                r = r.header(k, v);
            }
            let s = r.send().await.map(|r| r.status().as_u16());
            order.lock().unwrap().push(tag);
            s
        })
    };
    let spoofed = send(
        "spoofed",
        vec![
            ("x-gateway-inference-objective", "premium".into()),
            ("x-gateway-inference-fairness-id", "mint-1".into()),
            ("x-llm-d-inference-objective", "premium".into()),
            ("x-llm-d-inference-fairness-id", "mint-2".into()),
        ],
    );
    wait_for("the spoofed request held as the default flow", T, || {
        held("default-flow", "0")
    })
    .await;
    let token = jwt(json!({"sub": "tenant-a", "tier": "premium"}));
    let signed = send("signed", vec![("authorization", format!("Bearer {token}"))]);
    wait_for("the signed request held as tenant-a at premium", T, || {
        held("tenant-a", "10")
    })
    .await;
    // A forged token is refused by the gateway, never held.
    let forged = format!("{}x", jwt(json!({"sub": "tenant-b", "tier": "premium"})));
    let r = c
        .post(&url)
        .header("authorization", format!("Bearer {forged}"))
        .json(&json!({"model": "chat", "prompt": "forged", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(blocker.await.unwrap().unwrap(), 200);
    assert_eq!(signed.await.unwrap().unwrap(), 200);
    assert_eq!(spoofed.await.unwrap().unwrap(), 200);
    assert_eq!(*order.lock().unwrap(), ["signed", "spoofed"]);
}
