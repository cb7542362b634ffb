//! The agents this coordinator knows, in memory: who is connected, what they have, when they were
//! last heard from, and the channel that reaches each one. Heartbeats never touch the store.

use std::collections::BTreeMap;
use tokio::time::Instant;

use gantry_proto::v1;
use tokio::sync::mpsc;

pub struct AgentConn {
    pub inventory: v1::Inventory,
    /// The address the agent connected from: rank 0's node is the job's MASTER_ADDR.
    pub addr: String,
    pub last_seen: Instant,
    /// Present while a session stream is open.
    pub session: Option<Session>,
    pub drained: bool,
}

pub struct Session {
    pub id: u64,
    pub tx: mpsc::Sender<v1::CoordinatorMessage>,
}

#[derive(Default)]
pub struct Fleet {
    pub agents: BTreeMap<String, AgentConn>,
    next_session: u64,
}

impl Fleet {
    pub fn next_session_id(&mut self) -> u64 {
        self.next_session += 1;
        self.next_session
    }

    pub fn sender(&self, name: &str) -> Option<mpsc::Sender<v1::CoordinatorMessage>> {
        self.agents.get(name)?.session.as_ref().map(|s| s.tx.clone())
    }
}
