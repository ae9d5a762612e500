//! Pure endpoint-picking domain: metrics parsing, request parsing, model rules, scheduling (no I/O).

pub mod affinity;
pub mod bbr;
pub mod fleet;
pub mod flow;
pub mod lora_cache;
pub mod metrics;
pub mod outlier;
pub mod prefix;
pub mod request;
pub mod rules;
pub mod scheduler;

pub use metrics::{EndpointMetrics, EngineType, MetricsError};
pub use prefix::PrefixIndex;
pub use request::{ApiKind, ParsedRequest, RequestError};
pub use rules::{ModelRules, Resolved, RuleError};
pub use scheduler::{Candidate, ModelPresence, PickError, PickInput, SchedulerConfig, pick};
