//! A Mosquitto of the caller's own. Its config lifts `max_queued_messages`
//! (Mosquitto keeps 1000 QoS 1 messages per session by default and drops the
//! rest, fewer than a backlog under test) and publishes its `$SYS` counts
//! every second, which tell how many messages some session has not
//! acknowledged.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use rumqttc::v5::mqttbytes::v5::Filter;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, Incoming, MqttOptions};

const INSTALL: &str = "source .ci/services.sh && ensure_mosquitto";

/// A Mosquitto process with one listener on 127.0.0.1, killed when dropped.
pub struct OwnMosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl OwnMosquitto {
    /// Starts Mosquitto and waits until it answers. The `extra` config lines
    /// follow the listener's, so they may set its TLS files.
    pub async fn start(extra: &str) -> anyhow::Result<Self> {
        let port = free_port().context("a free port")?;
        let dir = tempfile::tempdir().context("a temp dir")?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nsys_interval 1\n{extra}\n"
            ),
        )
        .context("write mosquitto.conf")?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start mosquitto (install it with: {INSTALL})"))?;
        // Killed on drop, also when it never answers.
        let own = Self {
            port,
            child,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > deadline {
                bail!("mosquitto did not answer on 127.0.0.1:{port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(own)
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// An MQTT 5 client of the caller's own: a clean session unless
    /// `session` is set, then one that outlives the connection by an hour.
    pub fn client(&self, id: &str, session: bool) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, "127.0.0.1", self.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_start(!session)
            .set_max_packet_size(Some(1 << 20));
        if session {
            options.set_session_expiry_interval(Some(3600));
        }
        AsyncClient::new(options, 1000)
    }

    /// Opens the persistent session `id` subscribed to `filter`, and leaves:
    /// MQTT keeps nothing for a subscription that does not exist yet, so a
    /// consumer's session must be there before its backlog is published.
    pub async fn open_session(&self, id: &str, filter: &str) -> anyhow::Result<()> {
        let port = self.port;
        let (client, mut eventloop) = self.client(id, true);
        client
            .subscribe_many([Filter::new(filter, QoS::AtLeastOnce)])
            .await
            .with_context(|| format!("subscribe {id} to {filter}"))?;
        loop {
            let event = eventloop
                .poll()
                .await
                .with_context(|| format!("mosquitto on 127.0.0.1:{port}"))?;
            if let Event::Incoming(Incoming::SubAck(_)) = event {
                break;
            }
        }
        client.disconnect().await.context("disconnect")?;
        while eventloop.poll().await.is_ok() {}
        Ok(())
    }
}

impl Drop for OwnMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
