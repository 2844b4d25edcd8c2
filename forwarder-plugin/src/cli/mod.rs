//! Subcommands of the `forwarder-plugin` binary.

pub mod rules;
pub mod serve;
