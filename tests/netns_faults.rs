//! Faults loopback cannot show: a model server in its own network namespace behind a veth pair, with packet loss, a partition (every packet dropped: connections hang, nothing refuses) and healing, plus `tc netem` latency where the kernel has it, routed through Envoy and the EPP.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);
const BASE: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A namespace joined to the host by a veth pair (host side `.1`, namespace side `.2`);
/// removed, with its links, when dropped.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Netns {
    fn create() -> Result<Self, String> {
        let id = std::process::id();
        let net = format!("10.213.{}", id % 60 * 4);
        let n = Netns {
            name: format!("il{id}"),
            host_if: format!("ilh{id}"),
            host_ip: format!("{net}.1"),
            ns_ip: format!("{net}.2"),
        };
        let ns_if = format!("iln{id}");
        sh(&["ip", "netns", "add", &n.name])?;
        sh(&[
            "ip", "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        sh(&["ip", "link", "set", &ns_if, "netns", &n.name])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", n.host_ip),
            "dev",
            &n.host_if,
        ])?;
        sh(&["ip", "link", "set", &n.host_if, "up"])?;
        let inside = |a: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &n.name];
            v.extend_from_slice(a);
            sh(&v)
        };
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", n.ns_ip),
            "dev",
            &ns_if,
        ])?;
        inside(&["ip", "link", "set", &ns_if, "up"])?;
        inside(&["ip", "link", "set", "lo", "up"])?;
        Ok(n)
    }

    /// netem `spec` on the host side's egress; `Err` where the kernel has no netem (this
    /// project's CI VMs: iptables stands in for loss and partitions, latency is skipped).
    fn netem(&self, spec: &str) -> Result<(), String> {
        let mut args = vec![
            "tc",
            "qdisc",
            "replace",
            "dev",
            &self.host_if,
            "root",
            "netem",
        ];
        args.extend(spec.split_whitespace());
        sh(&args)
    }

    /// The iptables rule dropping packets to the namespace (all, or each with `probability`).
    fn drop_rule(&self, probability: Option<&str>) -> Vec<String> {
        let mut r: Vec<String> = ["OUTPUT", "-o", &self.host_if].map(String::from).to_vec();
        if let Some(p) = probability {
            r.extend(["-m", "statistic", "--mode", "random", "--probability", p].map(String::from));
        }
        r.extend(["-j", "DROP"].map(String::from));
        r
    }

    /// Drops packets to the namespace (all: a partition), until [`Netns::heal`].
    fn lose(&self, probability: Option<&str>) {
        let rule = self.drop_rule(probability);
        let mut args = vec!["iptables", "-I"];
        args.extend(rule.iter().map(String::as_str));
        sh(&args).unwrap();
    }

    /// Every fault gone.
    fn heal(&self) {
        let _ = sh(&["tc", "qdisc", "del", "dev", &self.host_if, "root"]);
        for p in [None, Some("0.2")] {
            let rule = self.drop_rule(p);
            let mut args = vec!["iptables", "-D"];
            args.extend(rule.iter().map(String::as_str));
            while sh(&args).is_ok() {}
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.heal();
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Completed requests a sim counts (`vllm:request_success_total`, all reasons).
async fn served(c: &reqwest::Client, addr: &str) -> f64 {
    let page = try_text(c, &format!("http://{addr}/metrics"))
        .await
        .unwrap_or_default();
    page.lines()
        .filter(|l| l.starts_with("vllm:request_success_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether the EPP has `addr` in rotation (healthy, not ejected), per /debug/pool.
async fn in_rotation(c: &reqwest::Client, epp: &Epp, addr: &str) -> Option<bool> {
    let page = try_text(c, &format!("http://{}/debug/pool", epp.metrics)).await?;
    let v: serde_json::Value = serde_json::from_str(&page).ok()?;
    let e = v["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == addr)?
        .clone();
    Some(e["healthy"] == true && e["ejected"] == false)
}

/// Latency is ridden out; a partition (every packet lost: connections hang, nothing is
/// refused) takes the server out once its scrapes keep timing out, and every request goes to
/// the other server with no error; healing puts it back. Needs root (network namespaces):
/// skipped, saying so, without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_partition_and_healing_between_the_epp_and_a_server() {
    if euid_is_root().is_none() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let ns = Netns::create().expect("root, but no network namespace: is iproute2 installed?");
    let dir = tempfile::tempdir().unwrap();
    inferlane::runtime::install_crypto_provider();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let sim_bin = bin("vllm-sim").to_string_lossy().into_owned();
    let far = spawn_with_marker(
        std::path::Path::new("ip"),
        &[
            "netns",
            "exec",
            &ns.name,
            &sim_bin,
            "--host",
            &ns.ns_ip,
            "--port",
            "0",
            "--time-scale",
            "0.02",
        ],
        &[],
        "VLLM_SIM_LISTENING",
        dir.path(),
    );
    let near = spawn_sim(&["--time-scale", "0.02"], dir.path());
    assert!(far.addr.starts_with(&ns.ns_ip), "{}", far.addr);
    let pool = dir.path().join("pool.yaml");
    std::fs::write(
        &pool,
        format!(
            "pool: {{name: test-pool}}\nendpoints:\n- address: {}\n- address: {}\nmodels:\n- modelName: chat\n  targetModels: [{{name: {BASE}}}]\n",
            far.addr, near.addr
        ),
    )
    .unwrap();
    let epp = spawn_epp(&pool, &["--scrape-timeout", "300ms"], dir.path());
    let envoy = spawn_envoy_for(&epp, dir.path()).await;
    let url = format!("http://127.0.0.1:{}/v1/completions", envoy.port);
    let burst = |n: usize| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let mut statuses = Vec::new();
            for i in 0..n {
                let r = c
                    .post(&url)
                    .json(&json!({"model": "chat", "prompt": format!("q{i}"), "max_tokens": 1}))
                    .send()
                    .await;
                statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            statuses
        }
    };
    let all_ok = |s: &[u16]| s.iter().all(|s| *s == 200);
    for addr in [&far.addr, &near.addr] {
        wait_for("both servers in rotation", T, || async {
            in_rotation(&c, &epp, addr).await?.then_some(())
        })
        .await;
    }
    let far0 = served(&c, &far.addr).await;
    let s = burst(40).await;
    assert!(all_ok(&s), "{s:?}");
    assert!(
        served(&c, &far.addr).await > far0,
        "the far server takes a share"
    );

    // 100 ms on the far link: slower scrapes and answers, nothing fails, kept.
    match ns.netem("delay 100ms") {
        Ok(()) => {
            let s = burst(20).await;
            assert!(all_ok(&s), "under latency: {s:?}");
            assert_eq!(in_rotation(&c, &epp, &far.addr).await, Some(true));
            ns.heal();
        }
        Err(e) => eprintln!("latency phase skipped (no netem in this kernel): {e}"),
    }

    // 20 % of packets to the far side lost: TCP retransmits, nothing fails.
    ns.lose(Some("0.2"));
    let s = burst(30).await;
    assert!(all_ok(&s), "under 20 % loss: {s:?}");
    ns.heal();

    // A partition: every packet to the far side lost. Its scrapes time out and, with the
    // near server answering, it is taken out; then nothing goes there and nothing fails.
    ns.lose(None);
    wait_for("the partitioned server out of rotation", T, || async {
        (!in_rotation(&c, &epp, &far.addr).await?).then_some(())
    })
    .await;
    let near0 = served(&c, &near.addr).await;
    let s = burst(30).await;
    assert!(all_ok(&s), "during the partition: {s:?}");
    assert_eq!(
        served(&c, &near.addr).await - near0,
        30.0,
        "all on the near server"
    );

    // Healed: back in rotation, and it serves again.
    ns.heal();
    wait_for("the healed server back in rotation", T, || async {
        in_rotation(&c, &epp, &far.addr).await?.then_some(())
    })
    .await;
    let far1 = served(&c, &far.addr).await;
    let s = burst(40).await;
    assert!(all_ok(&s), "after healing: {s:?}");
    assert!(
        served(&c, &far.addr).await > far1,
        "the healed server serves again"
    );
}

/// `Some(())` when running as root (read from /proc: no unsafe `geteuid`).
fn euid_is_root() -> Option<()> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status.lines().find(|l| l.starts_with("Uid:"))?;
    (uid.split_whitespace().nth(2)? == "0").then_some(())
}
