pub mod access;
pub mod checkpoints;
pub mod datasets;
pub mod endpoints;
pub mod fleet;
pub mod jobs;
pub mod serve_model;
pub mod server;
pub mod sim;
#[cfg(feature = "etcd")]
mod standby;
pub mod top;
pub mod train;
