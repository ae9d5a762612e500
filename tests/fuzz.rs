//! Fuzzing by property: mutated corpus inputs (tests/data/fuzz-corpus/) into every parser that reads outside input.
//!
//! cargo-fuzz needs a nightly toolchain these machines do not have, so each parser gets a
//! proptest over mutations of its seed corpus: byte flips, cuts, splices, duplications and
//! large inserted fragments. The parsers must answer Ok or an error without panicking, and
//! what they accept must respect their bounds. `PROPTEST_CASES` sets the budget (CI runs the
//! default below in a few seconds).

use std::path::PathBuf;

use inferlane::pool::config::PoolFile;
use inferlane_epp::request::{self, ApiKind, MAX_MODEL_NAME_BYTES};
use inferlane_epp::{EngineType, metrics};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz-corpus")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no corpus in {}", dir.display());
    seeds
}

/// One edit of an input.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Cut(usize),
    Drop(usize, usize),
    Insert(usize, Vec<u8>),
    /// A slice of the input repeated many times at a point (long strings, deep nesting).
    Repeat(usize, usize, u16),
}

fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..16),
        prop::sample::select(vec![
            &b"\""[..],
            b"\\",
            b"\\u",
            b"\\ud800",
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"\"model\":",
            b"\"priority\":",
            b"NaN",
            b"+Inf",
            b"-1e999",
            b"1e400",
            b"\n",
            b"# TYPE x gauge\n",
            b"{le=\"",
            "中".as_bytes(),
            b"\xff\xfe",
            b"- ",
            b"  ",
            b"&a ",
            b"*a",
            b"!!binary ",
        ])
        .prop_map(|s| s.to_vec()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), 0usize..64).prop_map(|(i, n)| Mutation::Drop(i, n)),
        (any::<usize>(), fragment()).prop_map(|(i, f)| Mutation::Insert(i, f)),
        (any::<usize>(), 1usize..32, 1u16..2000).prop_map(|(i, n, k)| Mutation::Repeat(i, n, k)),
    ]
}

fn apply(mut data: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = data.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if !data.is_empty() {
                    let i = i % data.len();
                    data[i] ^= b;
                }
            }
            Mutation::Cut(i) => data.truncate(i % len),
            Mutation::Drop(i, n) => {
                let i = i % len;
                let end = (i + n).min(data.len());
                if i < end {
                    data.drain(i..end);
                }
            }
            Mutation::Insert(i, f) => {
                let i = (i % len).min(data.len());
                data.splice(i..i, f.iter().copied());
            }
            Mutation::Repeat(i, n, k) => {
                let i = (i % len).min(data.len());
                let end = (i + n).min(data.len());
                let piece = data[i..end].to_vec();
                let rep: Vec<u8> = piece.repeat(usize::from(*k));
                data.splice(end..end, rep);
            }
        }
    }
    data
}

/// Runs `check` on mutated corpus inputs of `kind`.
fn fuzz(kind: &str, cases: u32, check: impl Fn(&[u8])) {
    let seeds = corpus(kind);
    let n = seeds.len();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let mut runner = TestRunner::new(Config {
        cases,
        // Shrunk failures are kept beside the corpus and replayed first on every run.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(Box::leak(
                format!("tests/data/fuzz-corpus/regressions-{kind}.txt").into_boxed_str(),
            )),
        )),
        ..Config::default()
    });
    runner
        .run(
            &(0..n, prop::collection::vec(mutation(), 0..8)),
            |(seed, ms)| {
                let input = apply(seeds[seed].clone(), &ms);
                check(&input);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn request_bodies() {
    fuzz("request", 3000, |input| {
        for api in [
            ApiKind::Completions,
            ApiKind::ChatCompletions,
            ApiKind::Embeddings,
            ApiKind::Other,
        ] {
            let capped = request::parse_body_capped(api, input, 64);
            if let Ok(p) = &capped {
                assert!(!p.model.is_empty() && p.model.len() <= MAX_MODEL_NAME_BYTES);
                assert!(p.prompt.len() <= 64);
                // What routing accepts, it can rewrite, and the result is still a body.
                let out = request::rewrite(input, "target", None).expect("rewrite");
                let again = request::parse_body(api, &out).expect("rewritten body parses");
                assert_eq!(again.model, "target");
                // Writing a priority too: refused only for a body that repeats it.
                match request::rewrite(input, "target", Some(-1)) {
                    Ok(out) => assert_eq!(request::parse_body(api, &out).unwrap().model, "target"),
                    Err(e) => assert!(matches!(e, request::RequestError::RepeatedField(_)), "{e}"),
                }
            }
            // The cap never changes whether a body is accepted.
            assert_eq!(capped.is_ok(), request::parse_body(api, input).is_ok());
        }
    });
}

#[test]
fn metrics_pages() {
    fuzz("metrics", 3000, |input| {
        for engine in [EngineType::Vllm, EngineType::Sglang, EngineType::TrtLlm] {
            if let Ok(m) = metrics::parse_bytes(engine, input) {
                for v in [m.waiting, m.running, m.kv_usage, m.deferred] {
                    assert!(v.is_finite() && v >= 0.0, "{m:?}");
                }
            }
        }
    });
}

#[test]
fn pool_files() {
    fuzz("poolfile", 2000, |input| {
        if let Ok(text) = std::str::from_utf8(input)
            && let Ok(p) = PoolFile::parse(text)
        {
            for e in &p.endpoints {
                assert!(e.address.parse::<std::net::SocketAddr>().is_ok());
            }
        }
    });
}

#[test]
fn lora_configs() {
    fuzz("lora", 2000, |input| {
        if let Ok(text) = std::str::from_utf8(input) {
            for validate in [true, false] {
                if let Ok(c) = inferlane_sidecar::config::parse(text, validate) {
                    // Whatever is accepted names a server to talk to.
                    assert!(!c.base_url().is_empty());
                }
            }
        }
    });
}
