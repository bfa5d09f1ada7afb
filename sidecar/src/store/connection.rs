//! Reaching Redis: one node (the default) or a Redis Cluster.
//!
//! Both are behind one [`Connection`], so the store's scripts and commands
//! are written once. On a Cluster the `redis` crate's cluster client routes
//! each call by its first key's slot, follows `MOVED` and `ASK`, and refreshes
//! its slot map when a node fails and a replica takes over; the store keeps
//! every script call within one hash tag, hence one slot (see [`super::redis`]).
//!
//! Both connect lazily and reconnect by themselves, so a store can be built
//! while Redis is down.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::TlsCertificates;
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use super::StoreError;

/// Where Redis is and how to log in.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    /// `redis://` or `rediss://` URL. For a Cluster, one or more seed nodes
    /// separated by commas (any one answering is enough: the client learns
    /// the others from it).
    pub url: &'a str,
    /// Password, when it is not in the URL.
    pub password: Option<&'a str>,
    /// PEM certificates to verify a `rediss://` server with, instead of the
    /// system's roots (a private CA).
    pub ca: Option<&'a [u8]>,
    /// Whether `url` names Redis Cluster nodes.
    pub cluster: bool,
    /// Connect and response timeout.
    pub timeout: Duration,
}

/// A multiplexed connection to one node or to a Cluster. Cheap to clone:
/// clones share the same connections.
#[derive(Clone)]
pub enum Connection {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Opens a lazy connection to `endpoint`.
    pub fn open(endpoint: &Endpoint<'_>) -> Result<Self, StoreError> {
        let err = |source| StoreError::Redis {
            op: "connect",
            source,
        };
        let seeds: Vec<ConnectionInfo> = if endpoint.cluster {
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

fn with_password(url: &str, password: Option<&str>) -> redis::RedisResult<ConnectionInfo> {
    let mut info = url.into_connection_info()?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    Ok(info)
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(conn) => conn.req_packed_command(cmd),
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
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}
