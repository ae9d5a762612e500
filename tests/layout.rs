//! The house rules, checked on the sources: imports run one way floor by floor, no two files import each other, files and request-path functions stay short.
//!
//! Floors, from the top: the binaries (`src/bin/`); the wiring of each binary (`epp`, `lora`,
//! `bbr`, `sim`, `bench`); the actors and the request path (`actors`, `extproc`,
//! `flow_control`); what they share (`pool`, `net`, `crds`, `runtime`, `flags`); below them
//! the pure crates. A file may import from its own floor or below, never above, and the
//! actors never import the request path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines of non-test code a source file may have.
const MAX_FILE_LINES: usize = 600;
/// Lines a function on the request path may have.
const MAX_REQUEST_PATH_FN_LINES: usize = 80;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's code without its test module (everything from the first `#[cfg(test)]` line).
fn code(text: &str) -> &str {
    match text.find("\n#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// The module path of a file under src/ (`extproc/mod.rs` -> `extproc`).
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

struct Tree {
    /// Module path -> file (relative to src/).
    modules: BTreeMap<Vec<String>, String>,
}

impl Tree {
    /// The file a path resolves to: its longest prefix that is a module.
    fn resolve(&self, path: &[String]) -> Option<&String> {
        (1..=path.len())
            .rev()
            .find_map(|n| self.modules.get(&path[..n]))
    }
}

/// Identifiers following `prefix::` in the code (`crate::pool::state::Shared` with prefix
/// `crate` gives `pool::state::Shared`).
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    let needle = format!("{prefix}::");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(&needle) {
        let before = rest[..i].chars().last();
        rest = &rest[i + needle.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let segs: Vec<&str> = rest[..end].split("::").filter(|s| !s.is_empty()).collect();
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    out
}

/// The files each file imports (through `crate::`, `super::` and its own submodules).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let rel = |p: &Path| {
        p.strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let tree = Tree {
        modules: files
            .iter()
            .filter(|p| !rel(p).starts_with("bin/"))
            .map(|p| (module_of(&rel(p)), rel(p)))
            .collect(),
    };
    let mut out = BTreeMap::new();
    for f in &files {
        let r = rel(f);
        if r.starts_with("bin/") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let code = code(&text);
        let me = module_of(&r);
        let is_dir_module = r.ends_with("mod.rs") || r == "lib.rs";
        let mut deps = BTreeSet::new();
        let mut add = |path: Vec<String>| {
            if let Some(t) = tree.resolve(&path)
                && *t != r
            {
                deps.insert(t.clone());
            }
        };
        for segs in paths_after(code, "crate") {
            add(segs.iter().map(|s| s.to_string()).collect());
        }
        for segs in paths_after(code, "super") {
            let ups = 1 + segs.iter().take_while(|s| **s == "super").count();
            // `super` of `a/b.rs` and of `a/b/mod.rs` (both module `a::b`) is `a`.
            let base = &me[..];
            if base.len() < ups {
                continue;
            }
            let mut path: Vec<String> = base[..base.len() - ups].to_vec();
            path.extend(segs.iter().skip(ups - 1).map(|s| s.to_string()));
            add(path);
        }
        // `use super::{a, b::C}` lists.
        for (i, _) in code.match_indices("use super::{") {
            let list = &code[i + 12..];
            let list = &list[..list.find('}').unwrap_or(0)];
            for item in list.split(',') {
                let segs: Vec<String> = item
                    .trim()
                    .split("::")
                    .map(|s| s.trim().to_string())
                    .collect();
                let mut path = me[..me.len().saturating_sub(1)].to_vec();
                path.extend(segs);
                add(path);
            }
        }
        // A directory module using its own children (`use state::RequestState;`).
        if is_dir_module {
            for line in code.lines() {
                let Some(rest) = line.trim_start().strip_prefix("use ") else {
                    continue;
                };
                let first = rest.split("::").next().unwrap_or("");
                let mut path = me.clone();
                path.push(first.to_string());
                if tree.modules.contains_key(&path) {
                    add(path);
                }
            }
        }
        out.insert(r, deps);
    }
    out
}

/// The floor of a file (0 = the top).
fn floor(rel: &str) -> usize {
    match rel.split('/').next().unwrap_or("").trim_end_matches(".rs") {
        "bin" => 0,
        "epp" | "lora" | "bbr" | "sim" | "bench" => 1,
        "actors" | "extproc" | "flow_control" => 2,
        _ => 3,
    }
}

#[test]
fn imports_run_one_way_floor_by_floor() {
    let mut wrong = Vec::new();
    for (file, deps) in imports() {
        for d in &deps {
            if floor(d) < floor(&file) {
                wrong.push(format!(
                    "{file} (floor {}) imports {d} (floor {})",
                    floor(&file),
                    floor(d)
                ));
            }
            if file.starts_with("actors/") && (d.starts_with("extproc/") || d == "flow_control.rs")
            {
                wrong.push(format!("{file}: an actor imports the request path ({d})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that climb:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_files_import_each_other() {
    let all = imports();
    let mut mutual = Vec::new();
    for (a, deps) in &all {
        for b in deps {
            if a < b && all.get(b).is_some_and(|d| d.contains(a)) {
                mutual.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        mutual.is_empty(),
        "files importing each other:\n{}",
        mutual.join("\n")
    );
}

#[test]
fn files_stay_short_and_so_do_request_path_functions() {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut long = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(f).unwrap();
        let code = code(&text);
        let n = code.lines().count();
        if n > MAX_FILE_LINES {
            long.push(format!(
                "{rel}: {n} lines of code (at most {MAX_FILE_LINES})"
            ));
        }
        // What runs per request: the ext_proc stream, flow control, the shared pool state and
        // labels (configuration parsing and metric registration run at start or reload).
        let request_path = rel.starts_with("extproc/")
            || rel == "flow_control.rs"
            || rel == "pool/state.rs"
            || rel == "pool/labels.rs";
        if !request_path {
            continue;
        }
        let lines: Vec<&str> = code.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let is_fn = [
                "fn ",
                "pub fn ",
                "async fn ",
                "pub async fn ",
                "pub(crate) fn ",
                "pub(super) fn ",
                "pub(crate) async fn ",
                "pub(super) async fn ",
            ]
            .iter()
            .any(|p| t.starts_with(p));
            if !is_fn {
                continue;
            }
            let indent = line.len() - t.len();
            let close = format!("{}}}", " ".repeat(indent));
            if let Some(end) = lines[i + 1..].iter().position(|l| *l == close)
                && end + 2 > MAX_REQUEST_PATH_FN_LINES
            {
                long.push(format!(
                    "{rel}:{}: {} lines: {}",
                    i + 1,
                    end + 2,
                    t.trim_end_matches('{')
                ));
            }
        }
    }
    assert!(long.is_empty(), "too long:\n{}", long.join("\n"));
}

#[test]
fn the_checker_sees_imports() {
    // The checks above are only as good as the import scan: it finds known edges.
    let all = imports();
    let has = |a: &str, b: &str| all.get(a).is_some_and(|d| d.contains(b));
    assert!(has("extproc/pick.rs", "pool/state.rs"));
    assert!(
        has("extproc/pick.rs", "extproc/mod.rs"),
        "super:: items count"
    );
    assert!(
        has("extproc/mod.rs", "extproc/state.rs"),
        "a directory module's own children count"
    );
    assert!(has("actors/datastore.rs", "pool/state.rs"));
    assert_eq!(floor("epp/mod.rs"), 1);
    assert_eq!(floor("pool/state.rs"), 3);
}
