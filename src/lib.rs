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
pub mod lora_fleet;
pub mod memory;
pub mod net;
pub mod pool;
pub mod runtime;
pub mod sim;

/// jemalloc for every binary, with a background thread that returns freed pages to the kernel
/// within about a second (`.cargo/config.toml`): glibc's per-thread arenas kept a burst's peak
/// resident (the EPP stayed at 206 MiB after 8 concurrent 30 MiB bodies had finished), and
/// mimalloc purges only when the thread that freed allocates again, so memory freed by serving
/// threads that went quiet stayed (116 MiB of a 258 MiB peak, 20 s later).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
