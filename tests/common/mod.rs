//! Shared helpers for integration tests: spawn our binaries on loopback, wait on conditions.
#![allow(dead_code)]

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
        other => panic!("unknown binary {other}"),
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub stderr_log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The process's stderr so far (logs).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
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
    let stderr_log = log_dir.join(format!(
        "{}-{}.log",
        bin_path.file_name().unwrap().to_string_lossy(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut cmd = Command::new(bin_path);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
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
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(a) => a,
        Err(_) => {
            let _ = child.kill();
            panic!(
                "{} did not print {marker:?} within 30 s; stderr:\n{}",
                bin_path.display(),
                std::fs::read_to_string(&stderr_log).unwrap_or_default()
            );
        }
    };
    Proc {
        child,
        addr,
        stderr_log,
    }
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
    let defaults = [
        "--config",
        config.as_str(),
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
        &[],
        "LORA_SIDECAR_LISTENING",
        log_dir,
    )
}

/// The port of an `ip:port` address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}
