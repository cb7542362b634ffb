pub mod checkpoints;
pub mod fleet;
pub mod jobs;
pub mod server;
pub mod sim;
pub mod top;
pub mod train;
