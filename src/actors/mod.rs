//! The actix I/O shell: one actor per concern, exchanging typed command and fact messages.

pub mod configmap_watcher;
pub mod datastore;
pub mod file_watcher;
pub mod kube_discovery;
pub mod leader;
pub mod lora_placer;
pub mod lora_unloader;
pub mod messages;
pub mod placement;
pub mod placement_follower;
pub mod reconciler;
pub mod resolver_links;
pub mod scraper;
