//! The four images (scripts/build-images.sh) start their entrypoints inside the image, answer their probes, and route a request end to end.
//!
//! Needs podman/buildah and the images built; `scripts/test.sh` builds them and sets
//! `INFERLANE_IMAGE_TESTS=1`, which makes a missing image a failure instead of a skip.
//! Containers run with `buildah run --isolation chroot` (crun cannot start containers on
//! these machines) and share the host's network, so the probes reach them on 127.0.0.1.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;

const PREFIX: &str = "ghcr.io/inferlane";
const T: Duration = Duration::from_secs(30);

fn required() -> bool {
    std::env::var("INFERLANE_IMAGE_TESTS").is_ok_and(|v| v == "1")
}

/// The image's name, or `None` (the test is skipped) when images are not built here and the
/// test command did not ask for them.
fn image(name: &str) -> Option<String> {
    let image = format!("{PREFIX}/{name}:latest");
    let exists = Command::new("podman")
        .args(["image", "exists", &image])
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        assert!(
            !required(),
            "{image} is not built: run scripts/build-images.sh --local-bases"
        );
        eprintln!("skipped: {image} not built (scripts/build-images.sh)");
        return None;
    }
    Some(image)
}

fn podman_json(args: &[&str]) -> Value {
    let out = Command::new("podman").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A working container of an image, removed on drop.
struct Container {
    id: String,
}

impl Container {
    fn new(image: &str) -> Container {
        let out = Command::new("buildah")
            .args(["from", "--pull=never", "--quiet", image])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Container {
            id: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }

    /// What a root filesystem path holds, through `buildah mount`.
    fn has(&self, path: &str) -> bool {
        let out = Command::new("buildah")
            .args(["mount", &self.id])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let root = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let there = Path::new(&root)
            .join(path.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok();
        let _ = Command::new("buildah")
            .args(["umount", &self.id])
            .stdout(Stdio::null())
            .status();
        there
    }

    /// Starts the image's entrypoint with `args` (mounting `volumes`, `host:container`), in its
    /// own process group so that all of it is killed with the returned process.
    fn run(
        &self,
        entrypoint: &str,
        args: &[&str],
        volumes: &[String],
        marker: &str,
        dir: &Path,
    ) -> Proc {
        let mut full = vec!["run".to_string(), "--isolation".into(), "chroot".into()];
        for v in volumes {
            full.push("-v".into());
            full.push(format!("{v}:ro"));
        }
        full.push(self.id.clone());
        full.push("--".into());
        full.push(entrypoint.into());
        full.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        spawn_grouped("buildah", &refs, marker, dir)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("buildah")
            .args(["rm", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `spawn_with_marker`, in a new process group killed as a whole when the `Proc` drops:
/// `buildah run` does not take the contained process down with it.
fn spawn_grouped(program: &str, args: &[&str], marker: &str, dir: &Path) -> Proc {
    let mut cmd = Command::new(program);
    cmd.args(args);
    common::spawn_cmd_with_marker(cmd, marker, dir, true)
}

/// Every runtime image: a non-root numeric user, OCI labels, its binary and no shell.
#[test]
fn images_are_non_root_labelled_and_shell_free() {
    let mut sizes = Vec::new();
    for (name, binary) in [
        ("epp", "epp"),
        ("lora-sidecar", "lora-sidecar"),
        ("bbr", "bbr"),
        ("vllm-sim", "vllm-sim"),
    ] {
        let Some(image) = image(name) else { return };
        let v = &podman_json(&["image", "inspect", &image])[0];
        let cfg = &v["Config"];
        assert_eq!(cfg["User"], "65532:65532", "{name}");
        assert_eq!(
            cfg["Entrypoint"],
            json!([format!("/usr/local/bin/{binary}")]),
            "{name}"
        );
        for label in ["source", "revision", "version", "title"] {
            let l = &cfg["Labels"][format!("org.opencontainers.image.{label}")];
            assert!(
                l.as_str().is_some_and(|s| !s.is_empty()),
                "{name}: no {label} label"
            );
        }
        assert_ne!(
            cfg["Labels"]["org.opencontainers.image.revision"], "unknown",
            "{name}"
        );
        let c = Container::new(&image);
        assert!(c.has(&format!("/usr/local/bin/{binary}")), "{name}");
        for shell in ["/bin/sh", "/bin/bash", "/usr/bin/sh", "/bin/dash"] {
            assert!(!c.has(shell), "{name} has {shell}");
        }
        sizes.push(format!(
            "{name} {} MB",
            v["Size"].as_u64().unwrap() / 1_000_000
        ));
    }
    eprintln!("image sizes: {}", sizes.join(", "));
}

/// Each entrypoint starts inside its image and answers its probe: vllm-sim `/health`, the
/// sidecar `/readyz` (having loaded its adapter into the simulator), bbr's gRPC health, the
/// EPP's gRPC health; then a request goes client -> Envoy -> the EPP's ext_proc -> the
/// simulator, all but Envoy from the images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entrypoint_starts_in_its_image_and_answers_its_probe() {
    let (Some(sim_i), Some(side_i), Some(bbr_i), Some(epp_i)) = (
        image("vllm-sim"),
        image("lora-sidecar"),
        image("bbr"),
        image("epp"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = client();

    // vllm-sim, with the adapters its image ships.
    let sim_c = Container::new(&sim_i);
    let sim = sim_c.run(
        "/usr/local/bin/vllm-sim",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--enable-lora",
            "--max-loras",
            "2",
            "--time-scale",
            "0.05",
        ],
        &[],
        "VLLM_SIM_LISTENING",
        d,
    );
    wait_for("vllm-sim /health", T, || async {
        let r = c
            .get(format!("http://{}/health", sim.addr))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let sim_port = port_of(&sim.addr);

    // The sidecar on a mounted ConfigMap naming an adapter from the sim image's /adapters.
    let cfg_dir = d.join("lora");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::write(
        cfg_dir.join("configmap.yaml"),
        format!("vLLMLoRAConfig:\n  host: 127.0.0.1\n  port: {sim_port}\n  name: images\n  ensureExist:\n    models:\n    - id: food-review-1\n      source: /adapters/food-review-1\n"),
    )
    .unwrap();
    let side_c = Container::new(&side_i);
    let side = side_c.run(
        "/usr/local/bin/lora-sidecar",
        &[
            "--config",
            "/config/configmap.yaml",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
        ],
        &[format!("{}:/config", cfg_dir.display())],
        "LORA_SIDECAR_LISTENING",
        d,
    );
    wait_for("lora-sidecar /readyz", T, || async {
        let r = c
            .get(format!("http://{}/readyz", side.addr))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert_eq!(adapter_ids(&c, &sim.addr).await.unwrap(), ["food-review-1"]);

    // bbr on a mounted mapping.
    let bbr_dir = d.join("bbr");
    std::fs::create_dir_all(&bbr_dir).unwrap();
    std::fs::write(
        bbr_dir.join("mapping.yaml"),
        "baseModels:\n- baseModel: meta-llama/Llama-3.1-8B-Instruct\n  adapters: [food-review-1]\n",
    )
    .unwrap();
    let bbr_c = Container::new(&bbr_i);
    let bbr = bbr_c.run(
        "/usr/local/bin/bbr",
        &with_defaults(&LOOPBACK_GRPC, &["--mapping-file", "/config/mapping.yaml"]),
        &[format!("{}:/config", bbr_dir.display())],
        "BBR_LISTENING",
        d,
    );
    let bbr_health = bbr.field("health");
    wait_for("bbr gRPC health", T, || async {
        (grpc_health(&bbr_health, "").await? == ServingStatus::Serving as i32).then_some(())
    })
    .await;

    // The EPP on a mounted pool file naming the simulator.
    let pool_dir = d.join("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    std::fs::write(
        pool_dir.join("pool.yaml"),
        format!(
            "pool: {{name: images}}\nendpoints:\n- address: {}\n",
            sim.addr
        ),
    )
    .unwrap();
    let epp_c = Container::new(&epp_i);
    let epp = epp_c.run(
        "/usr/local/bin/epp",
        &with_defaults(
            &LOOPBACK_GRPC,
            &["--pool-file", "/config/pool.yaml", "--pool-name", "images"],
        ),
        &[format!("{}:/config", pool_dir.display())],
        "EPP_LISTENING",
        d,
    );
    let epp_health = epp.field("health");
    wait_for("EPP gRPC health", T, || async {
        (grpc_health(&epp_health, "inference-extension").await? == ServingStatus::Serving as i32)
            .then_some(())
    })
    .await;

    let envoy = spawn_envoy(
        &EnvoyOptions {
            epp_port: port_of(&epp.field("grpc")),
            full_duplex: false,
            fail_open: false,
            extra_filters: "",
        },
        d,
    )
    .await;
    let url = format!("http://127.0.0.1:{}/v1/completions", envoy.port);
    let (status, body) = wait_for("a completion through the gateway", T, || async {
        let r = c
            .post(&url)
            .json(&json!({"model": "food-review-1", "prompt": "images", "max_tokens": 3}))
            .send()
            .await
            .ok()?;
        let s = r.status().as_u16();
        let v: Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
        (s == 200).then_some((s, v))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["model"], "food-review-1", "{body}");
}
