//! Reaching Redis: one node (the default), a primary found through Redis
//! Sentinel, or a Redis Cluster.
//!
//! All are behind one [`Connection`], so the store's scripts and commands
//! are written once. On a Cluster the `redis` crate's cluster client routes
//! each call by its first key's slot, follows `MOVED` and `ASK`, and refreshes
//! its slot map when a node fails and a replica takes over; the store keeps
//! every script call within one hash tag, hence one slot (see [`super::redis`]).
//!
//! Through Sentinel, the connection goes to the primary the Sentinels name;
//! a call that fails as a failover makes calls fail (the node is gone, or it
//! was demoted and answers `READONLY`) drops it, and the next call asks the
//! Sentinels again.
//!
//! All connect lazily and reconnect by themselves, so a store can be built
//! while Redis is down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, TlsCertificates, TlsMode};
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    RedisResult, Value,
};

use super::StoreError;

/// Where Redis is and how to log in.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    /// `redis://` or `rediss://` URL. For a Cluster, one or more seed nodes
    /// separated by commas (any one answering is enough: the client learns
    /// the others from it); with `sentinel`, the Sentinels, likewise.
    pub url: &'a str,
    /// Password, when it is not in the URL.
    pub password: Option<&'a str>,
    /// PEM certificates to verify a `rediss://` server with, instead of the
    /// system's roots (a private CA).
    pub ca: Option<&'a [u8]>,
    /// Whether `url` names Redis Cluster nodes.
    pub cluster: bool,
    /// The name under which the Sentinels that `url` names monitor the
    /// primary.
    pub sentinel: Option<&'a str>,
    /// Connect and response timeout.
    pub timeout: Duration,
}

/// A multiplexed connection to one node or to a Cluster. Cheap to clone:
/// clones share the same connections.
#[derive(Clone)]
pub enum Connection {
    Node(ConnectionManager),
    Sentinel(SentinelPrimary),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Opens a lazy connection to `endpoint`.
    pub fn open(endpoint: &Endpoint<'_>) -> Result<Self, StoreError> {
        let err = |source| StoreError::Redis {
            op: "connect",
            source,
        };
        let seeds: Vec<ConnectionInfo> = if endpoint.cluster || endpoint.sentinel.is_some() {
            endpoint.url.split(',').map(str::trim).collect::<Vec<_>>()
        } else {
            vec![endpoint.url]
        }
        .into_iter()
        .map(|url| with_password(url, endpoint.password))
        .collect::<Result<_, _>>()
        .map_err(err)?;
        if seeds
            .iter()
            .any(|info| matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }))
        {
            // rustls needs one process-wide crypto provider (the binary installs
            // it too); a second install only reports that one is there.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let certs = || TlsCertificates {
            client_tls: None,
            root_cert: endpoint.ca.map(<[u8]>::to_vec),
        };
        if let Some(primary) = endpoint.sentinel {
            return SentinelPrimary::open(endpoint, primary, &seeds).map(Self::Sentinel);
        }
        if endpoint.cluster {
            let mut builder = ClusterClientBuilder::new(seeds);
            if endpoint.ca.is_some() {
                builder = builder.certs(certs());
            }
            let client = builder.build().map_err(err)?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(endpoint.timeout)
                .set_response_timeout(endpoint.timeout);
            Ok(Self::Cluster(
                client.get_pending_async_connection_with_config(config),
            ))
        } else {
            let seed = seeds.into_iter().next().expect("one URL gives one seed");
            let client = match endpoint.ca {
                Some(_) => redis::Client::build_with_tls(seed, certs()),
                None => redis::Client::open(seed),
            }
            .map_err(err)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(endpoint.timeout))
                .set_response_timeout(Some(endpoint.timeout))
                .set_max_delay(Duration::from_secs(2));
            Ok(Self::Node(
                ConnectionManager::new_lazy_with_config(client, config).map_err(err)?,
            ))
        }
    }
}

/// The primary that Sentinels monitor under one name. Cheap to clone: clones
/// share the connection.
#[derive(Clone)]
pub struct SentinelPrimary {
    /// Asked for the primary's address when there is no connection.
    sentinels: Arc<tokio::sync::Mutex<SentinelClient>>,
    /// The connection to the primary, once found; `None` after a call failed
    /// as calls to a lost or demoted primary do.
    current: Arc<Mutex<Option<MultiplexedConnection>>>,
    config: AsyncConnectionConfig,
}

impl SentinelPrimary {
    fn open(
        endpoint: &Endpoint<'_>,
        primary: &str,
        seeds: &[ConnectionInfo],
    ) -> Result<Self, StoreError> {
        let err = |source| StoreError::Redis {
            op: "connect",
            source,
        };
        let addrs = seeds.iter().map(|info| info.addr().clone());
        let mut builder =
            SentinelClientBuilder::new(addrs, primary, SentinelServerType::Master).map_err(err)?;
        // The Sentinels' own password, if any, is in their URLs; the
        // primary's is the store's.
        if let Some(seed) = seeds.first() {
            let settings = seed.redis_settings();
            if let Some(user) = settings.username() {
                builder = builder.set_client_to_sentinel_username(user);
            }
            if let Some(password) = settings.password() {
                builder = builder.set_client_to_sentinel_password(password);
            }
            if matches!(seed.addr(), ConnectionAddr::TcpTls { .. }) {
                // A TLS deployment of Sentinel serves the primary over TLS too.
                builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                builder = builder.set_client_to_sentinel_tls_mode(TlsMode::Secure);
            }
        }
        if let Some(password) = endpoint.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(ca) = endpoint.ca {
            builder = builder.set_client_to_redis_certificates(TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            });
        }
        Ok(Self {
            sentinels: Arc::new(tokio::sync::Mutex::new(builder.build().map_err(err)?)),
            current: Arc::default(),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(endpoint.timeout))
                .set_response_timeout(Some(endpoint.timeout)),
        })
    }

    /// The connection to the primary, asking the Sentinels for it when there
    /// is none. One caller asks; the others wait for its answer.
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.current.lock().expect("not poisoned").clone() {
            return Ok(conn);
        }
        let mut sentinels = self.sentinels.lock().await;
        if let Some(conn) = self.current.lock().expect("not poisoned").clone() {
            return Ok(conn);
        }
        let client = sentinels.async_get_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *self.current.lock().expect("not poisoned") = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the connection after an error that a failover causes, so that
    /// the next call asks the Sentinels where the primary is now.
    fn check<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result {
            if failed_over(e) {
                tracing::warn!(error = %e, "the Redis primary is lost or demoted: asking the Sentinels again");
                *self.current.lock().expect("not poisoned") = None;
            }
        }
        result
    }
}

/// Whether an error is one that calls to a primary that failed over get.
fn failed_over(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.code() == Some("READONLY")
}

fn with_password(url: &str, password: Option<&str>) -> redis::RedisResult<ConnectionInfo> {
    let mut info = url.into_connection_info()?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    Ok(info)
}

impl Connection {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// `WAIT <replicas> <timeout_ms>` on the primary that holds the slot of
    /// `key`: how many replicas acknowledged every write this connection sent
    /// there. Keyless, `WAIT` would go to every primary of a Cluster and
    /// answer the fewest, so a shard without a replica would hold up writes
    /// to the others.
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: i64,
        timeout_ms: u64,
    ) -> RedisResult<i64> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout_ms);
        match self {
            Self::Cluster(conn) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let answer = conn
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                Ok(redis::FromRedisValue::from_redis_value(answer)?)
            }
            _ => cmd.query_async(self).await,
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(conn) => conn.req_packed_command(cmd),
            Self::Sentinel(primary) => Box::pin(async move {
                let mut conn = primary.connection().await?;
                primary.check(conn.req_packed_command(cmd).await)
            }),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(primary) => Box::pin(async move {
                let mut conn = primary.connection().await?;
                primary.check(conn.req_packed_commands(pipeline, offset, count).await)
            }),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(conn) => conn.get_db(),
            Self::Sentinel(_) => 0,
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}
