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
pub mod net;
pub mod pool;
pub mod runtime;
pub mod sim;
