//! JetStream bindings against the real NATS on 127.0.0.1:4222 (from
//! `.ci/services.sh`). Each test uses streams with unique names and deletes
//! only those. Refused credentials are tried on a `nats-server` of the
//! test's own that requires a user and password.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use idemq_operator::broker::jetstream::{Auth, Connection, JetStream, Plan};
use idemq_operator::broker::pool::PoolConfig;
use idemq_operator::broker::BindError;

const URL: &str = "nats://127.0.0.1:4222";
const START: &str = "source .ci/services.sh && ensure_nats";

fn unique(base: &str) -> String {
    format!(
        "{base}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn connection(url: &str) -> Connection {
    Connection {
        url: url.to_string(),
        auth: Auth::None,
    }
}

/// A consumer `<stream>-c` of `<stream>.in`, dead letters to
/// `<stream>.dead` in the stream `<stream>-DEAD`.
fn plan(stream: &str) -> Plan {
    Plan {
        stream: stream.to_string(),
        consumer: format!("{stream}-c"),
        filter_subjects: vec![format!("{stream}.in")],
        max_ack_pending: 50,
        ack_wait: Duration::from_secs(20),
        max_deliver: Some(10),
        dead_letter_subject: format!("{stream}.dead"),
        dead_letter_stream: Some(format!("{stream}-DEAD")),
    }
}

/// The test's own client: makes the producers' stream, looks, cleans up.
struct Streams {
    js: jetstream::Context,
    made: Vec<String>,
}

impl Streams {
    async fn new() -> Self {
        let client = async_nats::connect(URL).await.unwrap_or_else(|e| {
            panic!("NATS does not answer on {URL} ({e}); start it with: {START}")
        });
        Self {
            js: jetstream::new(client),
            made: Vec::new(),
        }
    }

    /// The producers' stream `name`, capturing `<name>.in`; removed with
    /// its dead-letter stream by [`Streams::delete`].
    async fn create(&mut self, name: &str) {
        self.js
            .create_stream(stream::Config {
                name: name.to_string(),
                subjects: vec![format!("{name}.in")],
                ..Default::default()
            })
            .await
            .expect("create the stream");
        self.made.push(name.to_string());
    }

    async fn exists(&self, name: &str) -> bool {
        self.js.get_stream(name).await.is_ok()
    }

    async fn consumer(&self, stream: &str, name: &str) -> Option<consumer::Info> {
        let stream = self.js.get_stream(stream).await.ok()?;
        stream.consumer_info(name).await.ok()
    }

    async fn delete(self) {
        for name in &self.made {
            let _ = self.js.delete_stream(name).await;
            let _ = self.js.delete_stream(format!("{name}-DEAD")).await;
        }
    }
}

#[tokio::test]
async fn a_missing_stream_is_stream_not_found_and_nothing_is_created() {
    let streams = Streams::new().await;
    let name = unique("op-js-missing");
    let bound = JetStream::default()
        .bind(&connection(URL), &plan(&name))
        .await;
    let dead = streams.exists(&format!("{name}-DEAD")).await;
    println!("missing stream: {bound:?}");
    assert_eq!(bound, Err(BindError::StreamNotFound(name.clone())));
    assert!(!streams.exists(&name).await, "the stream is not created");
    assert!(!dead, "nor its dead-letter stream");
    streams.delete().await;
}

#[tokio::test]
async fn the_consumer_and_dead_letter_stream_are_created_and_binding_again_changes_nothing() {
    let mut streams = Streams::new().await;
    let name = unique("op-js-bind");
    streams.create(&name).await;
    let binder = JetStream::default();
    let plan = plan(&name);
    let first = binder.bind(&connection(URL), &plan).await;
    let created = streams.consumer(&name, &plan.consumer).await;
    let again = binder.bind(&connection(URL), &plan).await;
    let dead = streams.js.get_stream(format!("{name}-DEAD")).await;
    let dead_subjects = dead.map(|s| s.cached_info().config.subjects.clone());
    println!("{first:?}, then {again:?}: {}", plan.describe());
    assert_eq!(first, Ok(()));
    assert_eq!(again, Ok(()), "the consumer it made matches the spec");
    let created = created.expect("the consumer was created");
    let c = &created.config;
    assert_eq!(c.durable_name.as_deref(), Some(plan.consumer.as_str()));
    assert_eq!(c.deliver_subject, None, "a pull consumer");
    assert_eq!(c.ack_policy, consumer::AckPolicy::Explicit);
    assert_eq!(
        (c.ack_wait, c.max_ack_pending, c.max_deliver),
        (Duration::from_secs(20), 50, 10)
    );
    assert_eq!(c.filter_subject, format!("{name}.in"));
    assert_eq!(
        dead_subjects.ok(),
        Some(vec![format!("{name}.dead")]),
        "the dead-letter stream captures the dead-letter subject"
    );
    streams.delete().await;
}

#[tokio::test]
async fn a_consumer_with_other_settings_is_consumer_mismatch_and_left_as_it_is() {
    let mut streams = Streams::new().await;
    let name = unique("op-js-mismatch");
    streams.create(&name).await;
    let plan = plan(&name);
    let stream = streams.js.get_stream(&name).await.expect("stream");
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(plan.consumer.clone()),
            ack_wait: Duration::from_secs(10),
            max_ack_pending: 50,
            max_deliver: 10,
            filter_subject: format!("{name}.in"),
            ..Default::default()
        })
        .await
        .expect("someone else's consumer");
    let bound = JetStream::default().bind(&connection(URL), &plan).await;
    let after = streams.consumer(&name, &plan.consumer).await;
    println!("{bound:?}");
    let Err(BindError::ConsumerMismatch(message)) = bound else {
        panic!("a mismatch: {bound:?}");
    };
    assert!(
        message.contains("ackWait 10s (the spec: 20s)"),
        "names the setting: {message}"
    );
    assert!(
        !message.contains("maxAckPending"),
        "only what differs: {message}"
    );
    assert_eq!(
        after.map(|c| c.config.ack_wait),
        Some(Duration::from_secs(10)),
        "the consumer is not changed"
    );
    streams.delete().await;
}

#[tokio::test]
async fn an_unreachable_server_is_broker_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let bound = JetStream::default()
        .bind(
            &connection(&format!("nats://127.0.0.1:{port}")),
            &plan("ANY"),
        )
        .await;
    println!("{bound:?}");
    assert!(matches!(bound, Err(BindError::Unreachable(_))), "{bound:?}");
}

/// A `nats-server` of the test's own that takes one user and password.
struct AuthServer {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl AuthServer {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .args(["--user", "billing", "--pass", "right-pa55"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start nats-server ({e}); install it with: {START}"));
        // Killed and reaped on drop, whatever happens next.
        let server = Self {
            port,
            child,
            _dir: dir,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the test's own nats-server did not answer on {port}");
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn refused_credentials_are_authentication_failed_without_the_password() {
    let server = AuthServer::start().await;
    let url = format!("nats://127.0.0.1:{}", server.port);
    let with = |password: &str| Connection {
        url: url.clone(),
        auth: Auth::UserPassword {
            user: "billing".into(),
            password: password.into(),
        },
    };
    let binder = JetStream::default();
    let refused = binder.bind(&with("wrong-pa55"), &plan("ANY")).await;
    let accepted = binder.bind(&with("right-pa55"), &plan("ANY")).await;
    println!("wrong password: {refused:?}; right password: {accepted:?}");
    let Err(BindError::AuthenticationFailed(message)) = refused else {
        panic!("refused credentials: {refused:?}");
    };
    assert!(!message.contains("wrong-pa55"), "{message}");
    assert_eq!(
        accepted,
        Err(BindError::StreamNotFound("ANY".into())),
        "with the right password the binder gets as far as the stream"
    );
}

#[tokio::test]
async fn resources_on_one_server_share_one_client() {
    let mut streams = Streams::new().await;
    let names: Vec<String> = (0..6).map(|i| unique(&format!("op-js-pool{i}"))).collect();
    for name in &names {
        streams.create(name).await;
    }
    let binder = JetStream::new(PoolConfig {
        max_connections: 8,
        idle: Duration::from_secs(60),
    });
    let plans: Vec<Plan> = names.iter().map(|n| plan(n)).collect();
    let conn = connection(URL);
    let bound = futures::future::join_all(plans.iter().map(|p| binder.bind(&conn, p))).await;
    println!(
        "{} binds at once: {} client(s) open",
        bound.len(),
        binder.clients()
    );
    assert!(bound.iter().all(Result::is_ok), "{bound:?}");
    assert_eq!(binder.clients(), 1);
    streams.delete().await;
}
