//! Upstream flag spellings (Go's `-flag`, camelCase and kebab-case, klog/zap logging) mapped onto our clap flags.
//!
//! Upstream's binaries are Go programs: every flag may be written `-flag` or `--flag`, with
//! `=value` or a separate value, and older releases spelled them in camelCase (`-poolName`)
//! where newer ones use kebab-case (`--pool-name`). Manifests written for either must start
//! our binaries unchanged, so argv is rewritten into our spelling before clap sees it. An
//! unknown flag is passed through as `--name`, so clap's error names it.

use std::ffi::OsString;

/// What an upstream flag that we do not spell the same way becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// Our flag of another name (kebab-case, without dashes).
    Rename(&'static str),
    /// klog verbosity (`-v 4`): becomes `--log-filter`.
    Verbosity,
    /// zap's `--zap-encoder json|console`: becomes `--log-format json|text`.
    ZapEncoder,
    /// zap's `--zap-log-level debug|info|error|N`: becomes `--log-filter`.
    ZapLevel,
    /// Accepted and not acted on; `why` says what we do instead (logged at start).
    /// `takes_value`: false for Go bool flags (a value only with `=`).
    Ignored {
        takes_value: bool,
        why: &'static str,
    },
}

/// Flags every binary accepts the upstream way (logging).
pub const LOGGING: &[(&str, Upstream)] = &[
    ("v", Upstream::Verbosity),
    ("zap-encoder", Upstream::ZapEncoder),
    ("zap-log-level", Upstream::ZapLevel),
    // The charts' `--log-level error` (newer releases).
    ("log-level", Upstream::ZapLevel),
    (
        "zap-devel",
        Upstream::Ignored {
            takes_value: false,
            why: "development logging defaults: use --log-format text",
        },
    ),
    (
        "zap-stacktrace-level",
        Upstream::Ignored {
            takes_value: true,
            why: "panics are logged with a backtrace; other records carry none",
        },
    ),
    (
        "zap-time-encoding",
        Upstream::Ignored {
            takes_value: true,
            why: "timestamps are RFC 3339",
        },
    ),
];

/// The result of rewriting argv.
#[derive(Debug, Default, PartialEq)]
pub struct Rewritten {
    pub args: Vec<OsString>,
    /// One line per accepted-but-ignored flag, to log once logging is up.
    pub notes: Vec<String>,
}

/// `poolName` -> `pool-name`, `grpcHealthPort` -> `grpc-health-port`; kebab stays as is.
pub fn kebab(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 && !out.ends_with('-') {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '_' {
            out.push('-');
        } else {
            out.push(c);
        }
    }
    out
}

/// klog verbosity to a filter: 0-3 info, 4 debug, 5+ trace (upstream: 2 default, 3 verbose,
/// 4 debug, 5 trace). Only our own crates go below info, so a dependency's debug output
/// cannot flood the log.
pub fn verbosity_filter(v: &str) -> Result<String, String> {
    let n: i64 = v
        .trim()
        .parse()
        .map_err(|_| format!("-v {v:?}: expected a number (upstream: 2 default, 4 debug)"))?;
    Ok(match n {
        ..=3 => "info".to_string(),
        4 => "info,inferlane=debug,inferlane_epp=debug,inferlane_sidecar=debug".to_string(),
        _ => "info,inferlane=trace,inferlane_epp=trace,inferlane_sidecar=trace".to_string(),
    })
}

fn zap_level_filter(v: &str) -> Result<String, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "debug" => verbosity_filter("4"),
        "info" => Ok("info".into()),
        "warn" | "warning" => Ok("warn".into()),
        "error" | "dpanic" | "panic" | "fatal" => Ok("error".into()),
        // zap also takes an integer: a verbosity level.
        other => verbosity_filter(other).map_err(|_| {
            format!("--zap-log-level {v:?}: use debug, info, warn, error or a verbosity number")
        }),
    }
}

fn zap_encoder(v: &str) -> Result<&'static str, String> {
    match v.trim() {
        "json" => Ok("json"),
        "console" | "text" => Ok("text"),
        other => Err(format!("--zap-encoder {other:?}: use json or console")),
    }
}

/// Rewrites argv (first element the program) into our flags: `-flag` and `--flag`, camelCase
/// and kebab-case, `=value` or a separate value, and `table`'s upstream names. `cmd` is our
/// clap command: its long flags are kept, and it tells which take a value.
pub fn rewrite(
    cmd: &clap::Command,
    args: impl IntoIterator<Item = OsString>,
    table: &[(&str, Upstream)],
) -> Result<Rewritten, String> {
    let mut it = args.into_iter();
    let mut out = Rewritten::default();
    if let Some(prog) = it.next() {
        out.args.push(prog);
    }
    let lookup = |name: &str| table.iter().find(|(n, _)| *n == name).map(|(_, u)| *u);
    let ours = |name: &str| {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(name))
            .map(|a| {
                // A flag whose value is optional (our bools) takes the next token only when
                // it is not a flag, which the loop below handles anyway.
                a.get_num_args().is_some_and(|n| n.min_values() > 0)
                    || (a.get_num_args().is_none() && a.get_action().takes_values())
            })
    };
    let mut rest = it.peekable();
    while let Some(arg) = rest.next() {
        let Some(s) = arg.to_str().map(str::to_string) else {
            out.args.push(arg);
            continue;
        };
        if s == "--" {
            out.args.push(arg);
            out.args.extend(rest.by_ref());
            break;
        }
        // Not a flag, `-` alone, or a negative number: a value.
        if !s.starts_with('-') || s == "-" || s[1..].starts_with(|c: char| c.is_ascii_digit()) {
            out.args.push(arg);
            continue;
        }
        let body = s.trim_start_matches('-');
        let (raw_name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        // Our own short flags (clap's -h and -V, and any the command declares) stay as they are.
        if s.len() == 2
            && (raw_name == "h"
                || raw_name == "V"
                || cmd
                    .get_arguments()
                    .any(|a| a.get_short() == raw_name.chars().next()))
        {
            out.args.push(arg);
            continue;
        }
        let name = kebab(raw_name);
        let mut value = |needed: bool| -> Result<Option<String>, String> {
            if inline.is_some() {
                return Ok(inline.clone());
            }
            if !needed {
                return Ok(None);
            }
            match rest.next() {
                Some(v) => v
                    .into_string()
                    .map(Some)
                    .map_err(|_| format!("-{raw_name}: value is not UTF-8")),
                None => Err(format!("-{raw_name} needs a value")),
            }
        };
        if let Some(takes) = ours(&name) {
            // Our flag (possibly spelled camelCase or with one dash). An `=value` stays one
            // token: split, a value that looks like a flag (`--a=--b`) became a flag of its own.
            let flag = format!("--{name}");
            match (&inline, value(takes)?) {
                (Some(_), Some(v)) => out.args.push(format!("{flag}={v}").into()),
                (None, Some(v)) => {
                    out.args.push(flag.into());
                    out.args.push(v.into());
                }
                (_, None) => out.args.push(flag.into()),
            }
            continue;
        }
        match lookup(&name) {
            Some(Upstream::Rename(to)) => {
                let takes = ours(to).unwrap_or(false);
                match (&inline, value(takes)?) {
                    (Some(_), Some(v)) => out.args.push(format!("--{to}={v}").into()),
                    (None, Some(v)) => {
                        out.args.push(format!("--{to}").into());
                        out.args.push(v.into());
                    }
                    (_, None) => out.args.push(format!("--{to}").into()),
                }
            }
            Some(Upstream::Verbosity) => {
                let v = value(true)?.unwrap_or_default();
                out.args.push("--log-filter".into());
                out.args.push(verbosity_filter(&v)?.into());
            }
            Some(Upstream::ZapLevel) => {
                let v = value(true)?.unwrap_or_default();
                out.args.push("--log-filter".into());
                out.args.push(zap_level_filter(&v)?.into());
            }
            Some(Upstream::ZapEncoder) => {
                let v = value(true)?.unwrap_or_default();
                out.args.push("--log-format".into());
                out.args.push(zap_encoder(&v)?.into());
            }
            Some(Upstream::Ignored { takes_value, why }) => {
                let v = value(takes_value)?;
                out.notes.push(match v {
                    Some(v) => format!("-{raw_name}={v} accepted and ignored: {why}"),
                    None => format!("-{raw_name} accepted and ignored: {why}"),
                });
            }
            // Unknown: spelled with two dashes so clap's error names the whole flag.
            None => {
                let flag = format!("--{raw_name}");
                match inline {
                    Some(v) => out.args.push(format!("{flag}={v}").into()),
                    None => out.args.push(flag.into()),
                }
            }
        }
    }
    Ok(out)
}

/// Parses the process's argv with upstream spellings accepted: the binaries' `main` calls
/// this instead of `Cli::parse()`. Exits like clap on a bad command line.
pub fn parse<C: clap::Parser>(table: &[(&str, Upstream)]) -> (C, Vec<String>) {
    let cmd = C::command();
    let full: Vec<(&str, Upstream)> = table.iter().chain(LOGGING.iter()).copied().collect();
    match rewrite(&cmd, std::env::args_os(), &full) {
        Ok(r) => (C::parse_from(r.args), r.notes),
        Err(e) => {
            let mut cmd = cmd;
            cmd.error(clap::error::ErrorKind::InvalidValue, e).exit()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser, PartialEq)]
    #[command(args_override_self = true)]
    struct T {
        #[arg(long, default_value = "p")]
        pool_name: String,
        #[arg(long, default_value_t = 1)]
        grpc_port: u16,
        #[arg(long, default_value = "true", value_parser = crate::runtime::parse_bool, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        secure_serving: bool,
        #[arg(long, default_value = "info")]
        log_filter: String,
        #[arg(long, default_value = "text")]
        log_format: String,
        #[arg(long)]
        metrics_port: Option<u16>,
    }

    const TABLE: &[(&str, Upstream)] = &[
        (
            "enable-pprof",
            Upstream::Ignored {
                takes_value: false,
                why: "no pprof",
            },
        ),
        ("metrics-listen-port", Upstream::Rename("metrics-port")),
    ];

    fn parse(args: &[&str]) -> Result<(T, Vec<String>), String> {
        let full: Vec<(&str, Upstream)> = TABLE.iter().chain(LOGGING).copied().collect();
        let r = rewrite(
            &T::command(),
            std::iter::once("t")
                .chain(args.iter().copied())
                .map(OsString::from),
            &full,
        )?;
        T::try_parse_from(r.args)
            .map(|t| (t, r.notes))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn seed_001_epp_args() {
        // deploy args of the seed's EPP Deployment, verbatim.
        let (t, _) = parse(&[
            "-poolName",
            "vllm-llama3-8b-instruct",
            "-v",
            "4",
            "--zap-encoder",
            "json",
            "-grpcPort",
            "9002",
        ])
        .unwrap();
        assert_eq!(t.pool_name, "vllm-llama3-8b-instruct");
        assert_eq!(t.grpc_port, 9002);
        assert_eq!(t.log_format, "json");
        assert!(t.log_filter.contains("inferlane=debug"), "{}", t.log_filter);
    }

    /// `--flag=value` keeps its value even when the value looks like a flag: split in two, a
    /// value `--other` became a second flag and turned it on silently.
    #[test]
    fn an_inline_value_that_looks_like_a_flag_stays_a_value() {
        let e = parse(&["--secure-serving=--enable-pprof"]).unwrap_err();
        assert!(e.contains("--secure-serving"), "{e}");
        let (t, _) = parse(&["-secureServing=false", "--metrics-listen-port=7"]).unwrap();
        assert!(!t.secure_serving);
        assert_eq!(t.metrics_port, Some(7));
    }

    #[test]
    fn every_spelling_of_a_flag() {
        for args in [
            &["-poolName", "x"][..],
            &["--poolName", "x"],
            &["-poolName=x"],
            &["--poolName=x"],
            &["-pool-name", "x"],
            &["--pool-name", "x"],
            &["--pool-name=x"],
            &["-pool-name=x"],
        ] {
            assert_eq!(parse(args).unwrap().0.pool_name, "x", "{args:?}");
        }
    }

    #[test]
    fn go_bools() {
        assert!(!parse(&["-secureServing=false"]).unwrap().0.secure_serving);
        assert!(
            !parse(&["--secure-serving", "false"])
                .unwrap()
                .0
                .secure_serving
        );
        assert!(
            parse(&["-secureServing", "-grpcPort", "3"])
                .unwrap()
                .0
                .secure_serving
        );
        assert_eq!(
            parse(&["-secureServing", "-grpcPort", "3"])
                .unwrap()
                .0
                .grpc_port,
            3
        );
    }

    #[test]
    fn renamed_ignored_and_logging() {
        let (t, notes) = parse(&["-metricsListenPort", "7", "-enablePprof"]).unwrap();
        assert_eq!(t.metrics_port, Some(7));
        assert!(notes.iter().any(|n| n.contains("enablePprof")), "{notes:?}");
        let (t, _) = parse(&["--zap-log-level", "error"]).unwrap();
        assert_eq!(t.log_filter, "error");
        let (t, _) = parse(&["-v=2"]).unwrap();
        assert_eq!(t.log_filter, "info");
        let (t, _) = parse(&["--zap-encoder=console"]).unwrap();
        assert_eq!(t.log_format, "text");
        // The last of repeated settings wins, as with Go's flag package.
        let (t, _) = parse(&["-v", "4", "--log-filter", "warn"]).unwrap();
        assert_eq!(t.log_filter, "warn");
        assert!(parse(&["-v", "loud"]).unwrap_err().contains("-v"));
        assert!(
            parse(&["--zap-encoder", "xml"])
                .unwrap_err()
                .contains("zap-encoder")
        );
    }

    #[test]
    fn unknown_flags_are_named() {
        let e = parse(&["-poolNme", "x"]).unwrap_err();
        assert!(e.contains("--poolNme"), "{e}");
        let e = parse(&["-bogus=1"]).unwrap_err();
        assert!(e.contains("--bogus"), "{e}");
        assert!(parse(&["-grpcPort"]).unwrap_err().contains("needs a value"));
    }

    #[test]
    fn kebab_case() {
        assert_eq!(kebab("grpcHealthPort"), "grpc-health-port");
        assert_eq!(
            kebab("refreshPrometheusMetricsInterval"),
            "refresh-prometheus-metrics-interval"
        );
        assert_eq!(kebab("pool-name"), "pool-name");
        assert_eq!(kebab("v"), "v");
    }
}
