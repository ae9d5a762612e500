//! Runtime LoRA adapter registry with vLLM 0.32's exact answers for load and unload.

use std::path::Path;

use serde::Deserialize;

use super::openai::ApiError;

/// One registered adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub name: String,
    pub path: String,
    pub int_id: u64,
    pub created: u64,
    /// `r` from its adapter_config.json (its disk-load cost grows with it).
    pub rank: Option<u32>,
}

/// Registered adapters in load order (the order `/v1/models` lists them).
#[derive(Debug, Default)]
pub struct LoraRegistry {
    adapters: Vec<Adapter>,
    next_id: u64,
    max_lora_rank: u32,
    /// Answer as vLLM before in-place reloads existed: `load_inplace` is ignored.
    pub ignore_load_inplace: bool,
}

/// `POST /v1/load_lora_adapter` body.
#[derive(Debug, Deserialize)]
pub struct LoadRequest {
    pub lora_name: Option<String>,
    pub lora_path: Option<String>,
    #[serde(default)]
    pub load_inplace: bool,
}

/// `POST /v1/unload_lora_adapter` body.
#[derive(Debug, Deserialize)]
pub struct UnloadRequest {
    pub lora_name: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub lora_int_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    r: Option<u32>,
}

impl LoraRegistry {
    pub fn new(max_lora_rank: u32) -> Self {
        Self {
            adapters: Vec::new(),
            next_id: 1,
            max_lora_rank,
            ignore_load_inplace: false,
        }
    }

    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    pub fn get(&self, name: &str) -> Option<&Adapter> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// Forgets every adapter (a restarted server).
    pub fn clear(&mut self) {
        self.adapters.clear();
    }

    /// Checks an adapter directory the way vLLM's worker does: `adapter_config.json` must exist
    /// (404 otherwise), parse, respect `--max-lora-rank`, and weights must be present (500).
    fn validate(&self, name: &str, path: &str) -> Result<Option<u32>, ApiError> {
        let resolved = resolve_source(path);
        let dir = resolved.as_deref().unwrap_or(Path::new(path));
        let cfg_path = dir.join("adapter_config.json");
        let Ok(text) = std::fs::read_to_string(&cfg_path) else {
            return Err(ApiError::not_found(format!(
                "Loading lora {name} failed: No adapter found for {path}"
            )));
        };
        let worker = |msg: String| {
            ApiError::internal(format!(
                "Call to add_lora method failed: Worker failed with error '{msg}'"
            ))
        };
        let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| {
            worker(format!(
                "Expecting value: {} (invalid adapter_config.json: {e})",
                cfg_path.display()
            ))
        })?;
        if let Some(r) = cfg.r
            && r > self.max_lora_rank
        {
            return Err(worker(format!(
                "LoRA rank {r} is greater than max_lora_rank {}.",
                self.max_lora_rank
            )));
        }
        let has_weights = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .any(|f| dir.join(f).is_file());
        if !has_weights {
            return Err(worker(format!(
                "No adapter weights (adapter_model.safetensors or adapter_model.bin) found in {path}"
            )));
        }
        Ok(cfg.r)
    }

    /// Loads (or, with `load_inplace`, reloads) an adapter. Returns vLLM's plain-text success
    /// body.
    pub fn load(
        &mut self,
        req: LoadRequest,
        base_models: &[String],
        now_unix: u64,
    ) -> Result<String, ApiError> {
        let (Some(name), Some(path)) = (req.lora_name, req.lora_path) else {
            return Err(ApiError::invalid_input(
                "Both 'lora_name' and 'lora_path' must be provided.",
            ));
        };
        if name.is_empty() || path.is_empty() {
            return Err(ApiError::invalid_input(
                "Both 'lora_name' and 'lora_path' must be provided.",
            ));
        }
        if base_models.contains(&name) {
            return Err(ApiError::invalid_input(format!(
                "The lora adapter '{name}' conflicts with the base model name."
            )));
        }
        if let Some(i) = self.adapters.iter().position(|a| a.name == name) {
            if !req.load_inplace || self.ignore_load_inplace {
                return Err(ApiError::invalid_input(format!(
                    "The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
                )));
            }
            let rank = self.validate(&name, &path)?;
            self.adapters[i].path = path;
            self.adapters[i].rank = rank;
            return Ok(format!(
                "Success: LoRA adapter '{name}' added successfully."
            ));
        }
        let rank = self.validate(&name, &path)?;
        let int_id = self.next_id;
        self.next_id += 1;
        self.adapters.push(Adapter {
            name: name.clone(),
            path,
            int_id,
            created: now_unix,
            rank,
        });
        Ok(format!(
            "Success: LoRA adapter '{name}' added successfully."
        ))
    }

    /// Unloads an adapter. Returns vLLM's plain-text success body.
    pub fn unload(&mut self, req: UnloadRequest) -> Result<String, ApiError> {
        let Some(name) = req.lora_name.filter(|n| !n.is_empty()) else {
            return Err(ApiError::invalid_input(
                "'lora_name' needs to be provided to unload a LoRA adapter.",
            ));
        };
        match self.adapters.iter().position(|a| a.name == name) {
            Some(i) => {
                self.adapters.remove(i);
                Ok(format!(
                    "Success: LoRA adapter '{name}' removed successfully."
                ))
            }
            None => Err(ApiError::not_found(format!(
                "The lora adapter '{name}' cannot be found."
            ))),
        }
    }
}

/// Where a hub id (`org/name`) is cached, as vLLM finds it offline: the first snapshot of
/// `models--org--name` under `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`
/// that holds an adapter. A local directory is itself; `None` when neither exists.
pub fn resolve_source(source: &str) -> Option<std::path::PathBuf> {
    let p = Path::new(source);
    if p.is_dir() {
        return Some(p.to_path_buf());
    }
    let (org, name) = source.split_once('/')?;
    if org.is_empty() || name.is_empty() || name.contains('/') || source.starts_with('.') {
        return None;
    }
    let cache = std::env::var_os("HF_HUB_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| Path::new(&h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/huggingface/hub"))
        })?;
    let snapshots = cache
        .join(format!("models--{org}--{name}"))
        .join("snapshots");
    let mut dirs: Vec<_> = std::fs::read_dir(snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| d.join("adapter_config.json").is_file())
        .collect();
    dirs.sort();
    dirs.into_iter().next()
}

/// Writes a minimal peft-style adapter directory (config + weights file) that the simulator
/// accepts; used by tests, the demo and benchmarks.
pub fn write_fake_adapter(dir: &Path, rank: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("adapter_config.json"),
        format!(
            "{{\"peft_type\":\"LORA\",\"r\":{rank},\"lora_alpha\":16,\"target_modules\":[\"q_proj\",\"v_proj\"]}}"
        ),
    )?;
    std::fs::write(dir.join("adapter_model.safetensors"), b"\0\0\0\0\0\0\0\0{}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        r: &mut LoraRegistry,
        name: &str,
        path: &str,
        inplace: bool,
    ) -> Result<String, ApiError> {
        r.load(
            LoadRequest {
                lora_name: Some(name.into()),
                lora_path: Some(path.into()),
                load_inplace: inplace,
            },
            &["base".into()],
            0,
        )
    }

    #[test]
    fn vllm_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        write_fake_adapter(&good, 8).unwrap();
        let big = tmp.path().join("big");
        write_fake_adapter(&big, 64).unwrap();
        let good = good.to_str().unwrap();
        let mut r = LoraRegistry::new(16);
        assert_eq!(
            load(&mut r, "a1", good, false).unwrap(),
            "Success: LoRA adapter 'a1' added successfully."
        );
        let e = load(&mut r, "a1", "/elsewhere", false).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.kind, "InvalidUserInput");
        assert!(e.message.contains("has already been loaded"));
        assert!(load(&mut r, "a1", good, true).is_ok());
        let e = load(&mut r, "ghost", "/nope", false).unwrap_err();
        assert_eq!((e.status, e.kind), (404, "NotFoundError"));
        assert_eq!(
            e.message,
            "Loading lora ghost failed: No adapter found for /nope"
        );
        let e = load(&mut r, "big", big.to_str().unwrap(), false).unwrap_err();
        assert_eq!((e.status, e.kind), (500, "InternalServerError"));
        assert!(
            e.message.starts_with(
                "Call to add_lora method failed: Worker failed with error 'LoRA rank 64"
            )
        );
        let e = load(&mut r, "base", good, false).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(
            r.unload(UnloadRequest {
                lora_name: Some("a1".into()),
                lora_int_id: None
            })
            .unwrap(),
            "Success: LoRA adapter 'a1' removed successfully."
        );
        let e = r
            .unload(UnloadRequest {
                lora_name: Some("a1".into()),
                lora_int_id: None,
            })
            .unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (404, "The lora adapter 'a1' cannot be found.")
        );
    }
}
