//! Broker clients shared per endpoint and credentials: every binding to the
//! same broker URL goes through one client (for AMQP one connection, a
//! channel per operation), whatever the number of resources.
//!
//! The pool holds at most `max_connections` clients. A client nobody uses is
//! closed after `idle`; when the pool is full, a request for another endpoint
//! closes the least recently used idle client, or waits for one to become
//! idle. A client that is no longer usable (the broker closed the
//! connection) is replaced on its next use. Each broker implements
//! [`Connector`] for its client and keeps one `Pool` of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::BindError;

/// Opens and closes one broker's clients.
#[async_trait::async_trait]
pub trait Connector: Send + Sync + 'static {
    /// What a client connects to, credentials included: a URL, or Kafka's
    /// bootstrap servers with their credentials.
    type Endpoint: ?Sized + Sync;
    type Client: Send + Sync + 'static;
    /// The bytes that tell two endpoints apart (credentials included); the
    /// pool keeps only their digest.
    fn identity(endpoint: &Self::Endpoint) -> Vec<u8>;
    /// Opens a client to `endpoint`.
    async fn connect(&self, endpoint: &Self::Endpoint) -> Result<Self::Client, BindError>;
    /// False once the client cannot be used any more (then it is replaced).
    fn usable(&self, client: &Self::Client) -> bool;
    async fn close(&self, client: &Self::Client);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Clients open at once, over all endpoints.
    pub max_connections: usize,
    /// How long an unused client stays open.
    pub idle: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 8,
            idle: Duration::from_secs(60),
        }
    }
}

/// The pool's key: a digest of the endpoint, so the map holds no credentials.
type Key = [u8; 32];

/// A slot's client, set once connected; the async mutex makes concurrent
/// first users of an endpoint wait for one connect instead of each opening
/// their own.
type Cell<T> = Arc<tokio::sync::Mutex<Option<Arc<T>>>>;

/// The client of a slot nobody uses (so nobody holds its cell).
fn take_client<T>(slot: Slot<T>) -> Option<Arc<T>> {
    slot.client.try_lock().ok().and_then(|mut c| c.take())
}

/// A reserved slot: an existing one, or a new one, locked, with the client
/// evicted to make room for it.
enum Reserved<T> {
    Existing(Cell<T>),
    New(tokio::sync::OwnedMutexGuard<Option<Arc<T>>>, Option<Arc<T>>),
}

struct Slot<T> {
    client: Cell<T>,
    users: usize,
    last_used: Instant,
}

pub struct Pool<C: Connector> {
    connector: C,
    config: PoolConfig,
    slots: Mutex<HashMap<Key, Slot<C::Client>>>,
    /// Clients taken out of their slot and being closed: they still count
    /// against `max_connections` until closed.
    closing: std::sync::atomic::AtomicUsize,
    /// Signalled when a slot becomes idle or goes away.
    freed: Notify,
}

/// A client on loan; dropping it returns the client to the pool.
pub struct Lease<C: Connector> {
    client: Arc<C::Client>,
    _held: Held<C>,
}

impl<C: Connector> std::ops::Deref for Lease<C> {
    type Target = C::Client;
    fn deref(&self) -> &C::Client {
        &self.client
    }
}

/// One use of a slot, counted from before the connect so that a slot being
/// connected is never taken for idle.
struct Held<C: Connector> {
    pool: Arc<Pool<C>>,
    key: Key,
}

impl<C: Connector> Drop for Held<C> {
    fn drop(&mut self) {
        self.pool.release(self.key);
    }
}

impl<C: Connector> Pool<C> {
    pub fn new(connector: C, config: PoolConfig) -> Arc<Self> {
        Arc::new(Self {
            connector,
            config,
            slots: Mutex::new(HashMap::new()),
            closing: std::sync::atomic::AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    pub fn connector(&self) -> &C {
        &self.connector
    }

    /// Clients open or being opened now.
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot<C::Client>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client for `endpoint`, connecting if there is none.
    pub async fn get(self: &Arc<Self>, endpoint: &C::Endpoint) -> Result<Lease<C>, BindError> {
        let key: Key = Sha256::digest(C::identity(endpoint)).into();
        let reserved = self.reserve(key).await;
        let held = Held {
            pool: self.clone(),
            key,
        };
        let mut client = match reserved {
            Reserved::Existing(cell) => cell.lock_owned().await,
            // The new slot comes locked: nobody connects it before the
            // client evicted for it is closed.
            Reserved::New(client, evicted) => {
                if let Some(old) = evicted {
                    self.connector.close(&old).await;
                }
                client
            }
        };
        if let Some(c) = client.as_ref().filter(|c| self.connector.usable(c)) {
            return Ok(Lease {
                client: c.clone(),
                _held: held,
            });
        }
        if let Some(broken) = client.take() {
            self.connector.close(&broken).await;
        }
        let fresh = Arc::new(self.connector.connect(endpoint).await?);
        *client = Some(fresh.clone());
        Ok(Lease {
            client: fresh,
            _held: held,
        })
    }

    /// Counts one more user of `key`'s slot, making room for it if needed.
    async fn reserve(&self, key: Key) -> Reserved<C::Client> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a release in between is not missed.
            freed.as_mut().enable();
            if let Some(reserved) = self.try_reserve(key) {
                return reserved;
            }
            // Full, and every client in use: wait for a release.
            freed.await;
        }
    }

    fn try_reserve(&self, key: Key) -> Option<Reserved<C::Client>> {
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(&key) {
            slot.users += 1;
            return Some(Reserved::Existing(slot.client.clone()));
        }
        let mut evicted = None;
        let closing = self.closing.load(std::sync::atomic::Ordering::SeqCst);
        if slots.len() + closing >= self.config.max_connections.max(1) {
            let idle = slots
                .iter()
                .filter(|(_, s)| s.users == 0)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| *k)?;
            evicted = slots.remove(&idle).and_then(take_client);
        }
        let client = Arc::new(tokio::sync::Mutex::new(None));
        let locked = client
            .clone()
            .try_lock_owned()
            .expect("a new mutex is unlocked");
        slots.insert(
            key,
            Slot {
                client,
                users: 1,
                last_used: Instant::now(),
            },
        );
        Some(Reserved::New(locked, evicted))
    }

    fn release(self: &Arc<Self>, key: Key) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&key) else {
            return;
        };
        slot.users = slot.users.saturating_sub(1);
        slot.last_used = Instant::now();
        if slot.users > 0 {
            return;
        }
        // A slot whose connect failed holds nothing worth keeping.
        let empty = slot.client.try_lock().is_ok_and(|c| c.is_none());
        if empty {
            slots.remove(&key);
        }
        drop(slots);
        self.freed.notify_waiters();
        if !empty {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(close_when_idle(Arc::downgrade(self), key, self.config.idle));
            }
        }
    }
}

/// Closes `key`'s client if nobody used it for `idle`.
async fn close_when_idle<C: Connector>(pool: Weak<Pool<C>>, key: Key, idle: Duration) {
    tokio::time::sleep(idle).await;
    let Some(pool) = pool.upgrade() else {
        return;
    };
    let client = {
        let mut slots = pool.lock();
        let expired = slots
            .get(&key)
            .is_some_and(|s| s.users == 0 && s.last_used.elapsed() >= idle);
        if !expired {
            return;
        }
        let client = slots.remove(&key).and_then(take_client);
        if client.is_some() {
            pool.closing
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        client
    };
    if let Some(client) = client {
        pool.connector.close(&client).await;
        pool.closing
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    pool.freed.notify_waiters();
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts clients open at once and the most ever open.
    #[derive(Default)]
    pub struct Counting {
        pub open: AtomicUsize,
        pub max_open: AtomicUsize,
        pub connects: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Connector for Arc<Counting> {
        type Endpoint = str;
        type Client = String;
        fn identity(url: &str) -> Vec<u8> {
            url.as_bytes().to_vec()
        }
        async fn connect(&self, url: &str) -> Result<String, BindError> {
            if url.contains("unreachable") {
                return Err(BindError::Unreachable("refused".into()));
            }
            self.connects.fetch_add(1, Ordering::SeqCst);
            let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_open.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(url.to_string())
        }
        fn usable(&self, _: &String) -> bool {
            true
        }
        async fn close(&self, _: &String) {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn pool(max: usize, idle: Duration) -> (Arc<Pool<Arc<Counting>>>, Arc<Counting>) {
        let counting = Arc::new(Counting::default());
        let pool = Pool::new(
            counting.clone(),
            PoolConfig {
                max_connections: max,
                idle,
            },
        );
        (pool, counting)
    }

    #[tokio::test]
    async fn concurrent_users_of_one_endpoint_share_one_client() {
        let (pool, counting) = pool(4, Duration::from_secs(60));
        let leases = futures::future::join_all((0..50).map(|_| pool.get("amqp://a"))).await;
        assert!(leases.iter().all(Result::is_ok));
        assert_eq!(counting.connects.load(Ordering::SeqCst), 1);
        drop(leases);
        let again = pool.get("amqp://a").await.expect("lease");
        assert_eq!(&*again, "amqp://a");
        assert_eq!(counting.connects.load(Ordering::SeqCst), 1, "reused");
    }

    #[tokio::test]
    async fn more_endpoints_than_connections_wait_and_evict_idle_clients() {
        let (pool, counting) = pool(2, Duration::from_secs(60));
        let uses = (0..40).map(|i| {
            let pool = pool.clone();
            async move {
                let lease = pool.get(&format!("amqp://host-{}", i % 7)).await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(lease);
                Ok::<_, BindError>(())
            }
        });
        let done = futures::future::join_all(uses).await;
        assert!(done.iter().all(Result::is_ok));
        assert_eq!(counting.max_open.load(Ordering::SeqCst), 2);
        assert!(pool.open() <= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_client_is_closed() {
        let (pool, counting) = pool(2, Duration::from_secs(60));
        drop(pool.get("amqp://a").await.expect("lease"));
        assert_eq!(counting.open.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(counting.open.load(Ordering::SeqCst), 0);
        assert_eq!(pool.open(), 0);
    }

    #[tokio::test]
    async fn a_failed_connect_frees_its_slot() {
        let (pool, _) = pool(1, Duration::from_secs(60));
        assert!(pool.get("amqp://unreachable").await.is_err());
        assert_eq!(pool.open(), 0);
        pool.get("amqp://b")
            .await
            .expect("room for another endpoint");
    }
}
