//! Which adapter sources the sidecar hands to vLLM: a ConfigMap's `source` becomes vLLM's `lora_path`, and vLLM fetches what it names, so it must not name just anything.

/// Why a source was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("source {given:?} is not allowed ({why}); allow it with --allowed-source")]
pub struct SourceRefused {
    pub given: String,
    pub why: &'static str,
}

/// The sources allowed: by default local absolute paths and Hugging Face hub ids (what the
/// seeds use); with `--allowed-source` entries, only those: a prefix (`/models/`,
/// `s3://adapters/`), or `local` / `hub` for the default kinds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    allow: Vec<String>,
}

impl SourcePolicy {
    pub fn new(allow: Vec<String>) -> Self {
        Self { allow }
    }

    /// Ok when vLLM may be asked to load from `source`.
    pub fn check(&self, source: &str) -> Result<(), SourceRefused> {
        let refuse = |why| {
            Err(SourceRefused {
                given: source.chars().take(256).collect(),
                why,
            })
        };
        if source.chars().any(char::is_control) {
            return refuse("control characters");
        }
        if source.split(['/', '\\']).any(|seg| seg == "..") {
            return refuse("a `..` path segment");
        }
        let (local, hub) = (is_local_path(source), is_hub_id(source));
        if self.allow.is_empty() {
            return match (local, hub) {
                (true, _) | (_, true) => Ok(()),
                _ if source.contains("://") => {
                    refuse("a URL: only local paths and hub ids by default")
                }
                _ => refuse("neither an absolute local path nor a hub id (org/name)"),
            };
        }
        let allowed = self.allow.iter().any(|a| match a.as_str() {
            "local" => local,
            "hub" => hub,
            prefix => source.starts_with(prefix),
        });
        if allowed {
            Ok(())
        } else {
            refuse("not under any --allowed-source")
        }
    }
}

fn is_local_path(s: &str) -> bool {
    s.starts_with('/') && !s.contains("://")
}

/// `org/name` as the hub names repositories: one slash, letters, digits, `-`, `_`, `.`.
fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_and_hub_ids_by_default_nothing_else() {
        let p = SourcePolicy::default();
        for ok in [
            "/adapters/food-review-1",
            "Kawon/llama3.1-food-finetune_v14_r8",
        ] {
            assert_eq!(p.check(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "s3://bucket/adapter",
            "file:///etc/passwd",
            "relative/dir/adapter",
            "/adapters/../../etc",
            "org/name/extra",
            "",
        ] {
            let e = p.check(bad).unwrap_err().to_string();
            assert!(e.contains("--allowed-source"), "{bad}: {e}");
        }
    }

    #[test]
    fn listed_prefixes_replace_the_defaults() {
        let p = SourcePolicy::new(vec!["s3://adapters/".into(), "hub".into()]);
        assert_eq!(p.check("s3://adapters/food"), Ok(()));
        assert_eq!(p.check("Kawon/food"), Ok(()));
        assert!(p.check("/adapters/food").is_err(), "local not listed");
        assert!(p.check("s3://other/food").is_err());
        assert!(p.check("s3://adapters/../other").is_err());
    }
}
