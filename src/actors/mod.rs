//! The actix I/O shell: one actor per concern, exchanging typed command and fact messages.

pub mod sim_engine;
