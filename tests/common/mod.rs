//! Shared helpers for integration tests: spawn our binaries on loopback, wait on conditions.
#![allow(dead_code)]

pub mod fake_api;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Path of one of this package's binaries (built by cargo for integration tests).
pub fn bin(name: &str) -> PathBuf {
    match name {
        "vllm-sim" => PathBuf::from(env!("CARGO_BIN_EXE_vllm-sim")),
        "lora-sidecar" => PathBuf::from(env!("CARGO_BIN_EXE_lora-sidecar")),
        "epp" => PathBuf::from(env!("CARGO_BIN_EXE_epp")),
        "bbr" => PathBuf::from(env!("CARGO_BIN_EXE_bbr")),
        other => panic!("unknown binary {other}"),
    }
}

/// A child process killed on drop (with its whole process group when `group`).
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub stderr_log: PathBuf,
    pub group: bool,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.group {
            // The group's id is the leader's pid (spawned with process_group(0)).
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The process's stderr so far (logs).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// A `key=value` word of its marker line (`grpc=127.0.0.1:4321 metrics=...`).
    pub fn field(&self, key: &str) -> String {
        self.addr
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.addr))
            .to_string()
    }
}

/// Spawns `bin` with `args`, waits (bounded) for a stdout line starting with `marker` and
/// returns the word after it as the address.
pub fn spawn_with_marker(
    bin_path: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    marker: &str,
    log_dir: &Path,
) -> Proc {
    let mut cmd = Command::new(bin_path);
    cmd.args(args).env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn_cmd_with_marker(cmd, marker, log_dir, false)
}

/// Spawns a prepared command (stdout piped, stderr to a log file), waits (bounded) for a
/// stdout line starting with `marker` and returns the word after it as the address; `group`:
/// the command leads a process group of its own, killed as a whole on drop.
pub fn spawn_cmd_with_marker(mut cmd: Command, marker: &str, log_dir: &Path, group: bool) -> Proc {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let name = Path::new(&program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or(program.clone());
    let stderr_log = log_dir.join(format!(
        "{}-{}.log",
        name,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap());
    if group {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let wanted = marker.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let mut proc = Proc {
        child,
        addr: String::new(),
        stderr_log,
        group,
    };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(a) => proc.addr = a,
        Err(_) => panic!(
            "{program} did not print {marker:?} within 30 s; stderr:\n{}",
            proc.logs()
        ),
    }
    proc
}

/// Starts a vllm-sim on 127.0.0.1 with an ephemeral port and runtime LoRA updating on.
pub fn spawn_sim(extra: &[&str], log_dir: &Path) -> Proc {
    let args = with_defaults(&["--host", "127.0.0.1", "--port", "0"], extra);
    spawn_with_marker(
        &bin("vllm-sim"),
        &args,
        &[("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")],
        "VLLM_SIM_LISTENING",
        log_dir,
    )
}

/// `defaults` (flag/value pairs) overridden by any flag that `extra` also sets, then `extra`.
pub fn with_defaults<'a>(defaults: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    for pair in defaults.chunks(2) {
        if !extra.contains(&pair[0]) {
            out.extend_from_slice(pair);
        }
    }
    out.extend_from_slice(extra);
    out
}

/// Polls `cond` until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP client for tests (rustls provider installed first).
pub fn client() -> reqwest::Client {
    inferlane::runtime::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Writes a loadable fake adapter under `dir/name` and returns its path.
pub fn adapter(dir: &Path, name: &str, rank: u32) -> String {
    let p = dir.join(name);
    inferlane::sim::lora::write_fake_adapter(&p, rank).unwrap();
    p.to_string_lossy().into_owned()
}

/// The value of the first sample of `series` (exact text before the value) on a metrics page.
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A directory laid out the way kubelet mounts a ConfigMap: `configmap.yaml -> ..data/configmap.yaml`,
/// `..data -> ..<timestamp>`, updated by writing a new timestamped directory and renaming a
/// fresh symlink over `..data` (atomic).
pub struct KubeletDir {
    pub root: PathBuf,
    n: u32,
    current: Option<PathBuf>,
}

impl KubeletDir {
    pub fn new(root: &Path) -> Self {
        std::fs::create_dir_all(root).unwrap();
        Self {
            root: root.to_path_buf(),
            n: 0,
            current: None,
        }
    }

    /// The path the sidecar is given.
    pub fn file(&self) -> PathBuf {
        self.root.join("configmap.yaml")
    }

    pub fn write(&mut self, content: &str) {
        self.n += 1;
        let name = format!("..2026_11_22_02_00_{:04}.{}", self.n, std::process::id());
        let dir = self.root.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("configmap.yaml"), content).unwrap();
        let tmp = self.root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
        let link = self.file();
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("..data/configmap.yaml", &link).unwrap();
        }
        if let Some(old) = self.current.replace(dir) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
}

/// A `vLLMLoRAConfig` document.
pub fn lora_config(port: u16, exist: &[(&str, &str)], not_exist: &[(&str, &str)]) -> String {
    let list = |items: &[(&str, &str)]| -> String {
        if items.is_empty() {
            return "    models: []\n".into();
        }
        let mut s = String::from("    models:\n");
        for (id, src) in items {
            s.push_str(&format!("    - id: {id}\n      source: {src}\n"));
        }
        s
    };
    format!(
        "vLLMLoRAConfig:\n  name: test\n  host: 127.0.0.1\n  port: {port}\n  defaultBaseModel: meta-llama/Llama-3.1-8B-Instruct\n  ensureExist:\n{}  ensureNotExist:\n{}",
        list(exist),
        list(not_exist)
    )
}

/// Adapters a server lists: (id, root), in its order.
pub async fn adapters(c: &reqwest::Client, addr: &str) -> Option<Vec<(String, String)>> {
    let v: serde_json::Value = c
        .get(format!("http://{addr}/v1/models"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        v["data"]
            .as_array()?
            .iter()
            .filter(|m| !m["parent"].is_null())
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or_default().to_string(),
                    m["root"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// Adapter ids a server lists, sorted.
pub async fn adapter_ids(c: &reqwest::Client, addr: &str) -> Option<Vec<String>> {
    let mut ids: Vec<String> = adapters(c, addr)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    Some(ids)
}

/// Starts a lora-sidecar on `config` with fast test timings plus `extra` flags.
pub fn spawn_sidecar(config: &Path, extra: &[&str], log_dir: &Path) -> Proc {
    let config = config.to_string_lossy().into_owned();
    let mut args = vec!["--config", config.as_str()];
    args.extend_from_slice(extra);
    spawn_sidecar_with(&args, &[], log_dir)
}

/// Starts a lora-sidecar with fast test timings; `extra` overrides defaults.
pub fn spawn_sidecar_with(extra: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Proc {
    let defaults = [
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--reconcile-trigger",
        "200ms",
        "--health-check-interval",
        "50ms",
        "--health-check-timeout",
        "2s",
        "--debounce",
        "20ms",
        "--config-poll-interval",
        "1s",
        "--retry-initial-backoff",
        "100ms",
        "--retry-max-backoff",
        "2s",
        "--http-timeout",
        "5s",
    ];
    let args = with_defaults(&defaults, extra);
    spawn_with_marker(
        &bin("lora-sidecar"),
        &args,
        env,
        "LORA_SIDECAR_LISTENING",
        log_dir,
    )
}

/// A loopback port free right now (for a process that must be restarted on the same one),
/// below Linux's ephemeral range (32768-60999): a port the kernel hands out for outgoing
/// connections could be taken while the process is down (sidecars keep polling it).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919);
    for _ in 0..200 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base.wrapping_add(n.wrapping_mul(104_729)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The port of an `ip:port` address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// A running EPP and its addresses.
pub struct Epp {
    pub proc: Proc,
    pub grpc: String,
    pub metrics: String,
    pub health: String,
}

/// Starts an EPP in standalone mode on `pool_file` (ephemeral ports on 127.0.0.1).
pub fn spawn_epp(pool_file: &Path, extra: &[&str], log_dir: &Path) -> Epp {
    let pool = pool_file.to_string_lossy().into_owned();
    let args = with_defaults(
        &["--pool-file", pool.as_str(), "--pool-name", "test-pool"],
        extra,
    );
    spawn_epp_with(&args, &[], log_dir)
}

/// Starts an EPP on ephemeral loopback ports with fast scrapes; `extra` overrides defaults.
pub fn spawn_epp_with(extra: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Epp {
    let mut defaults = LOOPBACK_GRPC.to_vec();
    defaults.extend([
        "--refresh-metrics-interval",
        "50ms",
        "--refresh-models-interval",
        "200ms",
    ]);
    let args = with_defaults(&defaults, extra);
    let proc = spawn_with_marker(&bin("epp"), &args, env, "EPP_LISTENING", log_dir);
    let (grpc, metrics, health) = (
        proc.field("grpc"),
        proc.field("metrics"),
        proc.field("health"),
    );
    Epp {
        proc,
        grpc,
        metrics,
        health,
    }
}

/// Loads an adapter on a sim through vLLM's runtime LoRA API.
pub async fn load_adapter(c: &reqwest::Client, sim: &Proc, name: &str, path: &str) {
    let r = c
        .post(format!("http://{}/v1/load_lora_adapter", sim.addr))
        .json(&serde_json::json!({"lora_name": name, "lora_path": path}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The project-local Envoy (installed by scripts/install-envoy.sh).
pub fn envoy_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    assert!(
        p.exists(),
        "Envoy is not installed: run scripts/install-envoy.sh"
    );
    p
}

/// How Envoy talks to the EPP.
pub struct EnvoyOptions<'a> {
    pub epp_port: u16,
    pub full_duplex: bool,
    pub fail_open: bool,
    /// Extra HTTP filters (YAML list items, 10-space indented) put before ext_proc.
    pub extra_filters: &'a str,
}

/// A running Envoy and its listener port.
pub struct Envoy {
    pub proc: Proc,
    pub port: u16,
}

/// Envoy from the shipped template in front of `epp`: BUFFERED, failing closed, no extra
/// filters (the common case).
pub async fn spawn_envoy_for(epp: &Epp, dir: &Path) -> Envoy {
    spawn_envoy(
        &EnvoyOptions {
            epp_port: port_of(&epp.grpc),
            full_duplex: false,
            fail_open: false,
            extra_filters: "",
        },
        dir,
    )
    .await
}

/// Starts Envoy from deploy/envoy/envoy-epp.yaml.tmpl on an ephemeral port.
pub async fn spawn_envoy(o: &EnvoyOptions<'_>, dir: &Path) -> Envoy {
    spawn_envoy_config(&envoy_config(o), dir).await
}

/// deploy/envoy/envoy-epp.yaml.tmpl filled in for `o`, listening on an ephemeral port.
pub fn envoy_config(o: &EnvoyOptions<'_>) -> String {
    let tmpl = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy-epp.yaml.tmpl"),
    )
    .unwrap();
    let mut cfg = tmpl
        .replace("${LISTEN_PORT}", "0")
        .replace("${EPP_PORT}", &o.epp_port.to_string())
        .replace(
            "${BODY_MODE}",
            if o.full_duplex {
                "FULL_DUPLEX_STREAMED"
            } else {
                "BUFFERED"
            },
        )
        .replace(
            "${TRAILER_MODE}",
            if o.full_duplex { "SEND" } else { "SKIP" },
        )
        .replace(
            "${FAILURE_MODE_ALLOW}",
            if o.fail_open { "true" } else { "false" },
        );
    if !o.extra_filters.is_empty() {
        cfg = cfg.replacen(
            "          - name: envoy.filters.http.ext_proc",
            &format!(
                "{}\n          - name: envoy.filters.http.ext_proc",
                o.extra_filters.trim_end()
            ),
            1,
        );
    }
    cfg
}

/// Starts Envoy on a ready config whose listener port is 0; returns once it listens.
pub async fn spawn_envoy_config(cfg: &str, dir: &Path) -> Envoy {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let cfg_path = dir.join(format!("envoy-{n}.yaml"));
    std::fs::write(&cfg_path, cfg).unwrap();
    let admin_path = dir.join(format!("envoy-admin-{n}.txt"));
    let log = dir.join(format!("envoy-{n}.log"));
    let child = Command::new(envoy_bin())
        .args([
            "-c",
            cfg_path.to_str().unwrap(),
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "-l",
            "warning",
            "--admin-address-path",
            admin_path.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn envoy");
    let proc = Proc {
        child,
        addr: String::new(),
        stderr_log: log,
        group: false,
    };
    let c = client();
    let port = wait_for("envoy listener", Duration::from_secs(30), || {
        let c = c.clone();
        let admin_path = admin_path.clone();
        async move {
            let admin = std::fs::read_to_string(&admin_path).ok()?;
            let v: serde_json::Value = c
                .get(format!("http://{}/listeners?format=json", admin.trim()))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64()
        }
    })
    .await;
    // The listener accepts only once Envoy is LIVE (its clusters initialised: the EPP
    // cluster's first health check has passed); until then connections are refused.
    wait_for("envoy ready", Duration::from_secs(30), || {
        let c = c.clone();
        let admin_path = admin_path.clone();
        async move {
            let admin = std::fs::read_to_string(&admin_path).ok()?;
            let r = c
                .get(format!("http://{}/ready", admin.trim()))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
    Envoy {
        proc,
        port: port as u16,
    }
}

/// GETs `url` as text; `None` on any failure (for polls with [`wait_for`]).
pub async fn try_text(c: &reqwest::Client, url: &str) -> Option<String> {
    c.get(url).send().await.ok()?.text().await.ok()
}

/// GET `url` as JSON; `None` on any failure (for `wait_for` polls).
pub async fn try_json(c: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    c.get(url).send().await.ok()?.json().await.ok()
}

/// A sim's `/sim/stats` (the simulator's own counters).
pub async fn sim_stats(c: &reqwest::Client, sim: &Proc) -> serde_json::Value {
    c.get(format!("http://{}/sim/stats", sim.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A sim's request counts by model (from /sim/stats).
pub async fn sim_requests(
    c: &reqwest::Client,
    sim: &Proc,
) -> std::collections::BTreeMap<String, u64> {
    let v = sim_stats(c, sim).await;
    v["requests_by_model"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Total generation requests a sim accepted.
pub async fn sim_total(c: &reqwest::Client, sim: &Proc) -> u64 {
    sim_requests(c, sim).await.values().sum()
}

/// The contents of a file under deploy/.
pub fn deploy_file(rel: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("deploy")
            .join(rel),
    )
    .unwrap()
}

/// Starts bbr on `mapping`; returns it and its gRPC address.
pub fn spawn_bbr(mapping: &Path, log_dir: &Path) -> (Proc, String) {
    let m = mapping.to_string_lossy().into_owned();
    spawn_bbr_with(&["--mapping-file", &m], &[], log_dir)
}

/// Starts bbr on ephemeral loopback ports with `extra` flags; returns it and its gRPC address.
pub fn spawn_bbr_with(extra: &[&str], env: &[(&str, &str)], log_dir: &Path) -> (Proc, String) {
    let defaults = [
        "--bind-address",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--grpc-health-port",
        "0",
        "--metrics-port",
        "0",
    ];
    let args = with_defaults(&defaults, extra);
    let p = spawn_with_marker(&bin("bbr"), &args, env, "BBR_LISTENING", log_dir);
    let grpc = p.field("grpc");
    (p, grpc)
}

/// The gRPC health status `addr` gives `service` (`None` while it does not answer).
pub async fn grpc_health(addr: &str, service: &str) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let r = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

/// Flags putting a gRPC server (EPP, bbr) on ephemeral loopback ports.
pub const LOOPBACK_GRPC: [&str; 8] = [
    "--bind-address",
    "127.0.0.1",
    "--grpc-port",
    "0",
    "--grpc-health-port",
    "0",
    "--metrics-port",
    "0",
];
