//! Redis behind Sentinel (`store.redis.sentinel`): the master is found by asking the sentinels
//! (`SENTINEL GET-MASTER-ADDR-BY-NAME`, each in turn until one answers) and checked with `ROLE`
//! before it is used. A connection is dropped after any failed call and the master looked up
//! again on the next one, so that after a failover (the old master gone, or demoted to a replica
//! that answers writes with `READONLY`) the store follows the new master within one call.
//!
//! Every step has the store's timeout. The user, password, database and TLS (`rediss://`) of a
//! sentinel URL are used for the master too (the sentinels themselves are asked without a
//! database).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use super::{client, redact};

fn failed(what: String) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other(what))
}

/// The sentinel at `url` (without a database) and the settings for the master.
fn infos(url: &str) -> redis::RedisResult<(ConnectionInfo, ConnectionInfo)> {
    let info = url.into_connection_info()?;
    let sentinel_settings = info.redis_settings().clone().set_db(0);
    Ok((info.clone().set_redis_settings(sentinel_settings), info))
}

/// The master's address as a sentinel gives it, in `master`'s settings (over TLS if the
/// sentinel is reached over TLS).
fn master_at(master: &ConnectionInfo, addr: (String, u16)) -> ConnectionInfo {
    let (host, port) = addr;
    let addr = match master.addr() {
        ConnectionAddr::TcpTls { insecure, .. } => {
            ConnectionAddr::TcpTls { host, port, insecure: *insecure, tls_params: None }
        }
        _ => ConnectionAddr::Tcp(host, port),
    };
    master.clone().set_addr(addr)
}

fn lookup(name: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("SENTINEL");
    cmd.arg("GET-MASTER-ADDR-BY-NAME").arg(name);
    cmd
}

/// Whether `ROLE` says master.
fn is_master(role: &redis::Value) -> bool {
    match role {
        redis::Value::Array(items) => matches!(
            items.first(),
            Some(redis::Value::BulkString(b)) if b.as_slice() == b"master"
        ),
        _ => false,
    }
}

/// Finds the master `name` through the sentinels `nodes` and connects to it (async).
pub async fn connect(
    nodes: &[String],
    name: &str,
    timeout: Duration,
    ca: Option<&Arc<Vec<u8>>>,
) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut why = Vec::new();
    for url in nodes {
        let attempt = async {
            let (sentinel, master) = infos(url)?;
            let mut s =
                client(sentinel, ca)?.get_multiplexed_async_connection_with_config(&config).await?;
            let addr: Option<(String, u16)> = lookup(name).query_async(&mut s).await?;
            let Some(addr) = addr else {
                return Err(failed(format!("it monitors no master named `{name}`")));
            };
            let mut m = client(master_at(&master, addr.clone()), ca)?
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let role: redis::Value = redis::cmd("ROLE").query_async(&mut m).await?;
            if !is_master(&role) {
                return Err(failed(format!("{}:{} is not a master (yet)", addr.0, addr.1)));
            }
            Ok(m)
        };
        match tokio::time::timeout(timeout.saturating_mul(3), attempt).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => why.push(format!("{}: {e}", redact(url))),
            Err(_) => why.push(format!("{}: no answer within {timeout:?}", redact(url))),
        }
    }
    Err(failed(format!("no sentinel gave the master `{name}`: {}", why.join("; "))))
}

/// [`connect`] with a blocking connection (for the approvals, which run on the blocking pool).
pub fn connect_blocking(
    nodes: &[String],
    name: &str,
    timeout: Duration,
    ca: Option<&Arc<Vec<u8>>>,
) -> redis::RedisResult<redis::Connection> {
    let mut why = Vec::new();
    for url in nodes {
        let attempt = || -> redis::RedisResult<redis::Connection> {
            let (sentinel, master) = infos(url)?;
            let mut s = client(sentinel, ca)?.get_connection_with_timeout(timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            let addr: Option<(String, u16)> = lookup(name).query(&mut s)?;
            let Some(addr) = addr else {
                return Err(failed(format!("it monitors no master named `{name}`")));
            };
            let mut m = client(master_at(&master, addr.clone()), ca)?
                .get_connection_with_timeout(timeout)?;
            m.set_read_timeout(Some(timeout))?;
            m.set_write_timeout(Some(timeout))?;
            let role: redis::Value = redis::cmd("ROLE").query(&mut m)?;
            if !is_master(&role) {
                return Err(failed(format!("{}:{} is not a master (yet)", addr.0, addr.1)));
            }
            Ok(m)
        };
        match attempt() {
            Ok(conn) => return Ok(conn),
            Err(e) => why.push(format!("{}: {e}", redact(url))),
        }
    }
    Err(failed(format!("no sentinel gave the master `{name}`: {}", why.join("; "))))
}

/// The fleet store's connection to the master behind Sentinel: one multiplexed connection,
/// dropped after a failed call (see the module doc).
pub struct SentinelConn {
    nodes: Vec<String>,
    name: String,
    timeout: Duration,
    ca: Option<Arc<Vec<u8>>>,
    /// The connection in use and its number (so that a late failure of an older one does not
    /// drop a newer one).
    current: std::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    made: std::sync::atomic::AtomicU64,
    /// One lookup at a time.
    connecting: tokio::sync::Mutex<()>,
}

impl SentinelConn {
    pub fn new(
        nodes: Vec<String>,
        name: String,
        timeout: Duration,
        ca: Option<Arc<Vec<u8>>>,
    ) -> SentinelConn {
        SentinelConn {
            nodes,
            name,
            timeout,
            ca,
            current: std::sync::Mutex::new(None),
            made: std::sync::atomic::AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The connection to the master (and its number for [`SentinelConn::failed`]), found
    /// through the sentinels when there is none.
    pub async fn get(&self) -> redis::RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let conn = connect(&self.nodes, &self.name, self.timeout, self.ca.as_ref()).await?;
        let n = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((n, conn.clone()));
        Ok((n, conn))
    }

    /// A call on connection `n` failed: the next call looks the master up again.
    pub fn failed(&self, n: u64) {
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.as_ref().is_some_and(|(m, _)| *m == n) {
            *current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_is_reached_with_the_urls_credentials_and_database() {
        let (sentinel, master) = infos("redis://u:pw@10.0.0.5:26379/3").unwrap();
        assert_eq!(sentinel.redis_settings().db(), 0);
        assert_eq!(master.redis_settings().db(), 3);
        let m = master_at(&master, ("10.0.0.9".into(), 6380));
        assert_eq!(m.addr(), &ConnectionAddr::Tcp("10.0.0.9".into(), 6380));
        assert_eq!(m.redis_settings().password(), Some("pw"));
        // A sentinel reached over TLS: the master too.
        let (_, master) = infos("rediss://10.0.0.5:26379").unwrap();
        let m = master_at(&master, ("10.0.0.9".into(), 6380));
        assert!(
            matches!(m.addr(), ConnectionAddr::TcpTls { host, port: 6380, insecure: false, .. } if host == "10.0.0.9"),
            "{:?}",
            m.addr()
        );
    }
}
