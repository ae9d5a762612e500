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
    let mut args = vec!["--host", "127.0.0.1", "--port", "0"];
    args.extend_from_slice(extra);
    spawn_with_marker(
        &bin("vllm-sim"),
        &args,
        &[("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")],
        "VLLM_SIM_LISTENING",
        log_dir,
    )
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
