//! inferlane: the actor shell and shared runtime behind the lora-sidecar, epp and vllm-sim binaries.

pub mod actors;
pub mod bbr;
pub mod bench;
pub mod crds;
pub mod epp;
pub mod extproc;
pub mod flags;
pub mod flow_control;
pub mod lora;
pub mod memory;
pub mod net;
pub mod pool;
pub mod runtime;
pub mod sim;

/// mimalloc for every binary: it hands freed pages back to the kernel within milliseconds,
/// where glibc's per-thread arenas kept a burst's peak resident (the EPP stayed at 206 MiB
/// after 8 concurrent 30 MiB bodies had finished; docs/benchmarks.md, "Holding at scale").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
