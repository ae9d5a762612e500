//! The budget's size: `--memory-budget` when given, else a share of the container's memory limit (cgroup v2 `memory.max`, or v1's `memory.limit_in_bytes`), else of the machine's memory.

use std::path::Path;

/// The flag that sets the budget.
pub const MEMORY_BUDGET_FLAG: &str = "--memory-budget";
/// Share of the container's limit the budget takes: the rest is the process's own (runtime,
/// snapshots, metrics, allocator slack), so the budget fills before the kernel's OOM killer.
pub const LIMIT_SHARE: f64 = 0.6;
/// Without a container limit, the share of the machine's memory (a developer's laptop).
pub const MACHINE_SHARE: f64 = 0.25;
/// v1 reports "no limit" as a page-rounded i64::MAX; anything this large is no limit.
const NO_LIMIT_ABOVE: u64 = 1 << 60;

/// A bad `--memory-budget` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{MEMORY_BUDGET_FLAG} {value:?}: {why}; give bytes or a Kubernetes quantity (`512Mi`, `2Gi`) or `auto`"
)]
pub struct BudgetError {
    pub value: String,
    pub why: &'static str,
}

/// Where the budget's size came from (logged at start and shown on /debug/memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetSource {
    Flag,
    Cgroup { limit: u64 },
    Machine { total: u64 },
    Fallback,
}

/// Parses a byte quantity: plain bytes or Kubernetes' suffixes (`Ki`..`Ti`, `k`..`T`).
pub fn parse_quantity(value: &str) -> Result<u64, BudgetError> {
    let v = value.trim();
    let bad = |why| BudgetError {
        value: value.to_string(),
        why,
    };
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad("not a whole number"))?;
    let mult: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(bad("unknown suffix")),
    };
    let bytes = n.checked_mul(mult).ok_or_else(|| bad("too large"))?;
    if bytes < 1 << 20 {
        return Err(bad("below 1Mi, too small to hold one request"));
    }
    Ok(bytes)
}

/// The budget: the flag's value (`auto` or empty derives it), else [`LIMIT_SHARE`] of the
/// cgroup limit found under `cgroup_root`, else [`MACHINE_SHARE`] of `MemTotal`.
pub fn derive_budget(flag: &str, cgroup_root: &Path) -> Result<(u64, BudgetSource), BudgetError> {
    if !flag.is_empty() && flag != "auto" {
        return Ok((parse_quantity(flag)?, BudgetSource::Flag));
    }
    if let Some(limit) = cgroup_limit(cgroup_root) {
        return Ok((
            (limit as f64 * LIMIT_SHARE) as u64,
            BudgetSource::Cgroup { limit },
        ));
    }
    if let Some(total) = mem_total(Path::new("/proc/meminfo")) {
        return Ok((
            (total as f64 * MACHINE_SHARE) as u64,
            BudgetSource::Machine { total },
        ));
    }
    Ok((1 << 30, BudgetSource::Fallback))
}

/// The container's memory limit: v2's `memory.max`, else v1's `memory/memory.limit_in_bytes`.
fn cgroup_limit(root: &Path) -> Option<u64> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let text = read(&root.join("memory.max"))
        .or_else(|| read(&root.join("memory").join("memory.limit_in_bytes")))?;
    let n: u64 = text.trim().parse().ok()?;
    (n > 0 && n < NO_LIMIT_ABOVE).then_some(n)
}

fn mem_total(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_quantity("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_quantity("2Gi").unwrap(), 2 << 30);
        assert_eq!(parse_quantity("3000000").unwrap(), 3_000_000);
        assert_eq!(parse_quantity("1G").unwrap(), 1_000_000_000);
        for bad in ["lots", "10Xi", "-5Mi", "12", "99999999999999999999Ti"] {
            let e = parse_quantity(bad).unwrap_err().to_string();
            assert!(e.contains("--memory-budget") && e.contains("512Mi"), "{e}");
        }
    }

    #[test]
    fn the_budget_comes_from_the_flag_then_the_cgroup_then_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            derive_budget("1Gi", dir.path()).unwrap(),
            (1 << 30, BudgetSource::Flag)
        );
        std::fs::write(dir.path().join("memory.max"), "268435456\n").unwrap();
        let (b, src) = derive_budget("auto", dir.path()).unwrap();
        assert_eq!(src, BudgetSource::Cgroup { limit: 256 << 20 });
        assert_eq!(b, ((256u64 << 20) as f64 * LIMIT_SHARE) as u64);
        // "max" (v2) and v1's huge number are no limit: the machine's memory decides.
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert!(matches!(
            derive_budget("", dir.path()).unwrap().1,
            BudgetSource::Machine { .. }
        ));
        std::fs::remove_file(dir.path().join("memory.max")).unwrap();
        std::fs::create_dir(dir.path().join("memory")).unwrap();
        std::fs::write(
            dir.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert!(matches!(
            derive_budget("", dir.path()).unwrap().1,
            BudgetSource::Machine { .. }
        ));
        std::fs::write(dir.path().join("memory/memory.limit_in_bytes"), "536870912").unwrap();
        assert_eq!(
            derive_budget("auto", dir.path()).unwrap().1,
            BudgetSource::Cgroup { limit: 512 << 20 }
        );
    }
}
