//! Shared process runtime for every binary: tracing, panic policy, actix System on tokio, signals, supervision.

use std::future::Future;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use thiserror::Error;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Exit code used when a panic (a bug) takes the process down, so the orchestrator restarts it.
pub const EXIT_PANIC: i32 = 70;

/// Errors raised while bringing the runtime up.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("invalid --log-filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("tracing subscriber already installed: {0}")]
    Subscriber(String),
    #[error("could not build the tokio runtime: {0}")]
    Tokio(#[source] std::io::Error),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable single-line records.
    #[default]
    Text,
    /// One JSON object per record (for log pipelines).
    Json,
}

/// Flags every binary shares.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Log format.
    #[arg(long, value_enum, env = "LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax (e.g. `info,inferlane=debug`); `RUST_LOG` wins when set.
    #[arg(long, default_value = "info")]
    pub log_filter: String,
    /// Tokio worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
}

impl Default for RuntimeArgs {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            worker_threads: 0,
        }
    }
}

/// Installs ring as the process-wide rustls provider. reqwest is built without a provider and
/// kube uses ring; with two providers compiled in, rustls panics at runtime, so pick one here.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Installs the tracing subscriber (with `log` records from actix and notify bridged in) and
/// the panic hook.
pub fn init(args: &RuntimeArgs) -> Result<(), RuntimeError> {
    let filter_text = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log_filter.clone());
    let filter = EnvFilter::try_new(&filter_text).map_err(|source| RuntimeError::Filter {
        filter: filter_text.clone(),
        source,
    })?;
    let registry = tracing_subscriber::registry().with(filter);
    let res = match args.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(true)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
    res.map_err(|e| RuntimeError::Subscriber(e.to_string()))?;
    install_crypto_provider();
    install_panic_hook();
    Ok(())
}

/// A panic is a bug: log it loudly with its location, then exit so the orchestrator restarts a
/// clean process instead of limping on with an actor whose state may be half-updated.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "<non-string panic>".into());
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!(
            %location, %thread, panic = %payload,
            "BUG: panic; exiting with code {EXIT_PANIC} so the process is restarted clean\n{backtrace}"
        );
        eprintln!("BUG: panic at {location} on thread {thread}: {payload}");
        std::process::exit(EXIT_PANIC);
    }));
}

/// Runs `main` inside an actix `System` whose arbiter lives on a multi-thread tokio runtime:
/// actors run on the main thread's `LocalSet`, while `tokio::spawn` (tonic, axum, reqwest)
/// uses the worker pool.
pub fn run_system<F, Fut>(args: &RuntimeArgs, name: &'static str, main: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let workers = args.worker_threads;
    let system = actix_rt::System::with_tokio_rt(move || {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.enable_all().thread_name(name);
        if workers > 0 {
            b.worker_threads(workers);
        }
        b.build()
            .map_err(RuntimeError::Tokio)
            .expect("tokio runtime")
    });
    system.block_on(main())
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops us");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Parses `5`, `5s`, `500ms`, `2m` (a bare number is seconds, as upstream's flags).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 5, 5s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}; use ms, s, m or h"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `true`/`false` (and 1/0, yes/no, on/off) for flags written `--flag=false`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(format!("expected true or false, got {other:?}")),
    }
}

/// Restart policy for supervised actors and tasks: exponential backoff between restarts and a
/// budget of restarts per window; when the budget is spent the failure is escalated (the
/// process exits non-zero and Kubernetes restarts it).
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_restarts: u32,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart after this delay.
    RestartAfter(Duration),
    /// The budget is spent: escalate.
    GiveUp,
}

/// Tracks restarts against a [`RestartPolicy`]. Pure: the caller supplies the clock.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    policy: RestartPolicy,
    recent: std::collections::VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            recent: Default::default(),
        }
    }

    /// Records a failure at `now` and decides.
    pub fn on_failure(&mut self, now: Instant) -> RestartDecision {
        while let Some(&t) = self.recent.front() {
            if now.duration_since(t) > self.policy.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() as u32 >= self.policy.max_restarts {
            return RestartDecision::GiveUp;
        }
        let n = self.recent.len() as u32;
        self.recent.push_back(now);
        let factor = 2u32.saturating_pow(n);
        let delay = self
            .policy
            .initial_backoff
            .saturating_mul(factor)
            .min(self.policy.max_backoff);
        RestartDecision::RestartAfter(delay)
    }
}

/// Runs a long-lived async task under `policy`: when it returns an error it is restarted after
/// a backoff; when the budget is spent the error is returned to the caller to escalate.
/// Returning `Ok(())` means the task finished on purpose (shutdown) and is not restarted.
pub async fn supervise<F, Fut, E>(name: &str, policy: RestartPolicy, mut make: F) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut budget = RestartBudget::new(policy);
    loop {
        match make().await {
            Ok(()) => return Ok(()),
            Err(e) => match budget.on_failure(Instant::now()) {
                RestartDecision::RestartAfter(d) => {
                    tracing::warn!(task = name, error = %e, delay_ms = d.as_millis() as u64, "task failed; restarting");
                    tokio::time::sleep(d).await;
                }
                RestartDecision::GiveUp => {
                    tracing::error!(task = name, error = %e, "task failed too often; giving up");
                    return Err(e);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_bools() {
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("x").is_err());
        assert_eq!(parse_bool("False"), Ok(false));
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn budget_backs_off_exponentially_then_gives_up() {
        let policy = RestartPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            max_restarts: 3,
            window: Duration::from_secs(60),
        };
        let mut b = RestartBudget::new(policy);
        let t = Instant::now();
        assert_eq!(
            b.on_failure(t),
            RestartDecision::RestartAfter(Duration::from_millis(100))
        );
        assert_eq!(
            b.on_failure(t),
            RestartDecision::RestartAfter(Duration::from_millis(200))
        );
        assert_eq!(
            b.on_failure(t),
            RestartDecision::RestartAfter(Duration::from_millis(300))
        );
        assert_eq!(b.on_failure(t), RestartDecision::GiveUp);
        // Failures older than the window no longer count.
        let later = t + Duration::from_secs(61);
        assert_eq!(
            b.on_failure(later),
            RestartDecision::RestartAfter(Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn supervise_restarts_until_success() {
        let mut attempts = 0;
        let res: Result<(), String> = supervise("t", RestartPolicy::default(), || {
            attempts += 1;
            let n = attempts;
            async move {
                if n < 3 {
                    Err(format!("fail {n}"))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(res.is_ok());
        assert_eq!(attempts, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn supervise_escalates_when_budget_spent() {
        let policy = RestartPolicy {
            max_restarts: 2,
            ..Default::default()
        };
        let mut attempts = 0;
        let res: Result<(), String> = supervise("t", policy, || {
            attempts += 1;
            async { Err("always".to_string()) }
        })
        .await;
        assert_eq!(res.unwrap_err(), "always");
        assert_eq!(attempts, 3);
    }
}
