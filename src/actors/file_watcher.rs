//! Watches a config file's directory (kubelet swaps a `..data` symlink) and publishes each valid version once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use notify::{RecursiveMode, Watcher};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::messages::{ConfigChanged, FileEvent};

/// A config file format the watcher can parse and validate.
pub trait WatchedConfig: Send + Sync + Sized + 'static {
    type Error: std::fmt::Display;
    /// Parses and validates the file's text.
    fn parse(text: &str, validate: bool) -> Result<Self, Self::Error>;
    /// One line for the "config applied" log.
    fn summary(&self) -> String;
    /// Things worth a warning in an otherwise valid config.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The watcher's metrics: validity, generation, distinct errors.
#[derive(Debug, Clone, Default)]
pub struct WatchMetrics {
    pub valid: Gauge,
    pub generation: Gauge,
    pub errors: Counter,
}

/// Settings of the watcher.
#[derive(Debug, Clone)]
pub struct WatcherOptions {
    pub path: PathBuf,
    pub validate: bool,
    /// Quiet time after a file event before reading (bursts collapse into one read).
    pub debounce: Duration,
    /// Re-read on this period too, for filesystems whose events get lost.
    pub poll_interval: Duration,
}

/// Owns the `notify` watcher; reads, parses and validates once per change; keeps the last good
/// config in force when the file turns invalid.
pub struct FileWatcher<C: WatchedConfig> {
    opts: WatcherOptions,
    subscriber: Recipient<ConfigChanged<C>>,
    metrics: WatchMetrics,
    watcher: Option<notify::RecommendedWatcher>,
    read_scheduled: bool,
    last_bytes: Option<Vec<u8>>,
    last_error: Option<String>,
    generation: u64,
}

impl<C: WatchedConfig> FileWatcher<C> {
    pub fn new(
        opts: WatcherOptions,
        subscriber: Recipient<ConfigChanged<C>>,
        metrics: WatchMetrics,
    ) -> Self {
        Self {
            opts,
            subscriber,
            metrics,
            watcher: None,
            read_scheduled: false,
            last_bytes: None,
            last_error: None,
            generation: 0,
        }
    }

    fn watch_dir(&self) -> PathBuf {
        self.opts
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// Starts the notify watcher; retried from the poll tick until the directory exists.
    fn ensure_watching(&mut self, ctx: &mut Context<Self>) {
        if self.watcher.is_some() {
            return;
        }
        let addr = ctx.address();
        let dir = self.watch_dir();
        let name = self.opts.path.file_name().map(|n| n.to_os_string());
        let res = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match ev {
            Ok(ev) if is_relevant(&ev, name.as_deref()) => addr.do_send(FileEvent),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "config watch error; the periodic re-read covers it")
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        match res {
            Ok(w) => {
                tracing::info!(dir = %dir.display(), "watching config directory");
                self.watcher = Some(w);
            }
            Err(e) => self.report_error(format!("cannot watch {}: {e}", dir.display())),
        }
    }

    fn report_error(&mut self, error: String) {
        self.metrics.valid.set(0);
        // Logged once per distinct error, not on every re-read.
        if self.last_error.as_deref() != Some(error.as_str()) {
            self.metrics.errors.inc();
            if self.generation > 0 {
                tracing::error!(path = %self.opts.path.display(), %error, generation = self.generation, "config rejected; the last good config stays in force");
            } else {
                tracing::error!(path = %self.opts.path.display(), %error, "config rejected; no valid config yet, nothing will be changed on the server");
            }
            self.last_error = Some(error);
        }
    }

    fn read(&mut self) {
        let _span = tracing::info_span!("config_read", path = %self.opts.path.display()).entered();
        let bytes = match std::fs::read(&self.opts.path) {
            Ok(b) => b,
            Err(e) => {
                self.report_error(format!("cannot read {}: {e}", self.opts.path.display()));
                return;
            }
        };
        if self.last_bytes.as_deref() == Some(bytes.as_slice()) {
            return;
        }
        self.last_bytes = Some(bytes.clone());
        let text = String::from_utf8_lossy(&bytes);
        match C::parse(&text, self.opts.validate) {
            Ok(config) => {
                self.generation += 1;
                self.last_error = None;
                self.metrics.valid.set(1);
                self.metrics.generation.set(self.generation as i64);
                for w in config.warnings() {
                    tracing::warn!(warning = %w, "config accepted with a warning");
                }
                tracing::info!(generation = self.generation, summary = %config.summary(), "config applied");
                self.subscriber.do_send(ConfigChanged {
                    config: Arc::new(config),
                    generation: self.generation,
                });
            }
            Err(e) => self.report_error(e.to_string()),
        }
    }
}

/// Whether a directory event can change the watched file. Reads (our own included: inotify
/// reports every open) and other files in the directory cannot; writes, creates, renames and
/// removals of the file, and kubelet's `..data` / `..<timestamp>` swaps can. An event without
/// paths (a rescan) counts.
fn is_relevant(ev: &notify::Event, name: Option<&std::ffi::OsStr>) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    ev.paths.is_empty()
        || ev.paths.iter().any(|p| match p.file_name() {
            Some(f) => Some(f) == name || f.as_encoded_bytes().starts_with(b".."),
            None => true,
        })
}

impl<C: WatchedConfig> Actor for FileWatcher<C> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.ensure_watching(ctx);
        self.read();
        ctx.run_interval(self.opts.poll_interval, |act, ctx| {
            act.ensure_watching(ctx);
            act.read();
        });
    }
}

impl<C: WatchedConfig> Handler<FileEvent> for FileWatcher<C> {
    type Result = ();

    fn handle(&mut self, _: FileEvent, ctx: &mut Context<Self>) {
        if self.read_scheduled {
            return;
        }
        self.read_scheduled = true;
        ctx.run_later(self.opts.debounce, |act, _| {
            act.read_scheduled = false;
            act.read();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    use std::ffi::OsStr;

    fn ev(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_changes_to_the_file_or_kubelet_swaps_are_relevant() {
        let name = Some(OsStr::new("pool.yaml"));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let closed_write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let modify = EventKind::Modify(ModifyKind::Any);
        assert!(!is_relevant(&ev(open, "/cfg/pool.yaml"), name));
        assert!(!is_relevant(&ev(modify, "/cfg/epp.log"), name));
        assert!(is_relevant(&ev(modify, "/cfg/pool.yaml"), name));
        assert!(is_relevant(&ev(closed_write, "/cfg/pool.yaml"), name));
        assert!(is_relevant(
            &ev(EventKind::Create(CreateKind::Any), "/cfg/..data"),
            name
        ));
        assert!(is_relevant(
            &ev(modify, "/cfg/..2026_11_22_08_00_00.1"),
            name
        ));
        assert!(is_relevant(&notify::Event::new(EventKind::Any), name));
    }

    /// With the real backend: reading the file (as the watcher does after every event) and
    /// writing a neighbour produce no relevant event; the first relevant one is the write.
    #[test]
    fn own_reads_do_not_trigger_a_re_read() {
        let dir = std::env::temp_dir().join(format!("fw-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pool.yaml");
        std::fs::write(&file, "a").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            let _ = tx.send(e);
        })
        .unwrap();
        w.watch(&dir, RecursiveMode::NonRecursive).unwrap();
        std::fs::read(&file).unwrap();
        std::fs::write(dir.join("epp.log"), "log line").unwrap();
        std::fs::write(&file, "b").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let first_relevant = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let e = rx
                .recv_timeout(left)
                .expect("an event for the write")
                .unwrap();
            if is_relevant(&e, Some(OsStr::new("pool.yaml"))) {
                break e;
            }
        };
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            !matches!(first_relevant.kind, EventKind::Access(AccessKind::Open(_))),
            "{first_relevant:?}"
        );
        assert_eq!(first_relevant.paths, [file]);
    }
}
