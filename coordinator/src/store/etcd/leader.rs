//! Leadership through etcd: taking the leader key, keeping its lease alive, and asking who leads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};
use tracing::{info, warn};

use super::etcd;
use crate::error::Result;

/// What the current leader wrote in the leader key under `prefix` (its `name`), if one leads.
pub async fn leader_of(endpoints: &[String], prefix: &str) -> Result<Option<String>> {
    let connect =
        ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(2));
    let mut client = Client::connect(endpoints, Some(connect)).await.map_err(etcd)?;
    let key = format!("{}/leader", prefix.trim_end_matches('/'));
    let resp = client.get(key, None).await.map_err(etcd)?;
    Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// Takes the leader key, waiting while another holds it. Returns the key's create revision.
pub(super) async fn campaign(client: &mut Client, key: &str, name: &str, lease: i64) -> Result<i64> {
    let mut logged = false;
    loop {
        let txn = Txn::new().when(vec![Compare::create_revision(key, CompareOp::Equal, 0)]).and_then(vec![TxnOp::put(
            key,
            name,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let resp = client.txn(txn).await.map_err(etcd)?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        if !logged {
            info!(key, "another coordinator leads; waiting for its lease to end");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Renews the lease a few times per TTL until `lost` is set or etcd says it expired.
pub(super) async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: i64,
    lost: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
) {
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
    let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        Err(e) => {
            warn!(error = %e, "cannot renew the etcd lease");
            lost.store(true, Ordering::Relaxed);
            return;
        }
    };
    while !lost.load(Ordering::Relaxed) {
        if paused.load(Ordering::Relaxed) {
            return;
        }
        let renewed = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
            Ok(Ok(_)) => {
                warn!("the etcd lease expired: this coordinator no longer leads");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            // A slow or failed renewal: try again; etcd, not this loop, decides when it expires.
            Ok(Err(e)) => warn!(error = %e, "renewing the etcd lease failed"),
            Err(_) => warn!("renewing the etcd lease timed out"),
        }
        tokio::time::sleep(every).await;
    }
}
