//! A Kafka-compatible broker of the test's own, which a test may stop and
//! start again: tansu on a free port, its storage in an S3 bucket served by a
//! moto server of the test's own (also on a free port). tansu's `memory://`
//! storage forgets every topic, record, group and committed offset when it
//! stops, and this build of tansu has no PostgreSQL or SQLite engine, only
//! memory and S3; the S3 store outlives the broker, so a restart keeps them,
//! as a real broker's disk does. The shared broker on 9092 is never touched.
//! Both processes are killed when this is dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idemq_sidecar::secrets::Secrets;

use super::broker::{BrokerUnderTest, DeadLetter, LosesBroker, Message};
use super::kafka::{Kafka, PARTITIONS};

const BUCKET: &str = "tansu";
const INSTALL: &str = "source .ci/services.sh && install_tansu && install_moto";

pub struct OwnTansu {
    pub port: u16,
    s3_port: u16,
    moto: Child,
    tansu: Option<Child>,
    log: tempfile::NamedTempFile,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The tansu binary that `.ci/services.sh` installs into the repository's `.tools/bin`.
fn tansu_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/tansu");
    assert!(
        bin.exists(),
        "{} is missing; install it with: {INSTALL}",
        bin.display()
    );
    bin
}

async fn answers(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

async fn wait_until_answers(what: &str, port: u16) {
    for _ in 0..200 {
        if answers(port).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not answer on 127.0.0.1:{port} within 10 s");
}

impl OwnTansu {
    /// Starts moto (S3), makes the bucket, starts tansu on it.
    pub async fn start() -> Self {
        let s3_port = free_port();
        let moto = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &s3_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start moto_server ({e}); install it with: {INSTALL}"));
        let mut own = Self {
            port: free_port(),
            s3_port,
            moto,
            tansu: None,
            log: tempfile::NamedTempFile::new().expect("log file"),
        };
        wait_until_answers("moto_server", s3_port).await;
        let made = reqwest::Client::new()
            .put(format!("http://127.0.0.1:{s3_port}/{BUCKET}"))
            .send()
            .await
            .expect("create the bucket");
        assert!(made.status().is_success(), "create the bucket: {made:?}");
        own.restart().await;
        own
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL), as a crash or a lost node would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.tansu.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker (stopping it first if it runs) on the same port and
    /// storage; waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let url = format!("tcp://{}", self.bootstrap());
        let log = self.log.reopen().expect("log file");
        let child = Command::new(tansu_bin())
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", &format!("s3://{BUCKET}/")])
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.s3_port))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.tansu = Some(child);
        wait_until_answers("tansu", self.port).await;
    }

    /// What the broker wrote (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for OwnTansu {
    fn drop(&mut self) {
        self.stop();
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

/// A [`Kafka`] topology on a broker of the test's own, which the broker-loss
/// scenario kills and starts again.
pub struct OwnKafka {
    kafka: Kafka,
    tansu: tokio::sync::Mutex<OwnTansu>,
}

impl BrokerUnderTest for OwnKafka {
    const NAME: &'static str = "kafka";

    async fn create(test: &str) -> Self {
        let tansu = OwnTansu::start().await;
        let kafka = Kafka::on(&tansu.bootstrap(), test, PARTITIONS).await;
        Self {
            kafka,
            tansu: tokio::sync::Mutex::new(tansu),
        }
    }

    fn broker_yaml(&self, max_in_flight: u32) -> String {
        self.kafka.broker_yaml(max_in_flight)
    }

    fn dedup_key_yaml(&self) -> String {
        self.kafka.dedup_key_yaml()
    }

    fn secrets(&self) -> Secrets {
        self.kafka.secrets()
    }

    fn env(&self) -> Vec<(String, String)> {
        self.kafka.env()
    }

    async fn publish(&self, messages: Vec<Message>) {
        self.kafka.publish(messages).await
    }

    async fn backlog(&self) -> u64 {
        self.kafka.backlog().await
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        self.kafka.dead_letters().await
    }

    /// The clients go first, then the broker and its storage.
    async fn delete(self) {
        drop(self.kafka);
        drop(self.tansu);
    }
}

/// The broker is killed and started again on the same storage.
impl LosesBroker for OwnKafka {
    const LOSS: &'static str = "the broker killed and started again";
    const AWAY: Duration = Duration::from_secs(8);
    /// The kill is at once. Fewer than for RabbitMQ: when the restarted
    /// broker has forgotten the member, the group reads again from the last
    /// commit before the kill, record by record out of S3 (one object per
    /// record here), which moto serves slowly on a loaded machine.
    const MESSAGES: usize = 1000;

    async fn cut(&self, _consumer: &str) {
        self.tansu.lock().await.stop();
    }

    async fn restore(&self) {
        self.tansu.lock().await.restart().await;
    }
}
