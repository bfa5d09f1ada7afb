//! The MQTT connection check against a real Mosquitto of the test's own with
//! a TLS listener, its certificate signed by a CA made for the test: the
//! check passes with the CA from the connection Secret (`caKey`) and fails
//! without it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use idemq_operator::broker::mqtt::{bind, Connection, Plan};
use idemq_operator::broker::BindError;
use idemq_operator::webhook::certs::{self, Material, Wanted};
use idemq_sidecar::config::MqttProtocol;

const INSTALL: &str = "source .ci/services.sh && ensure_mosquitto";

/// A Mosquitto with one TLS listener on 127.0.0.1, killed on drop.
struct TlsBroker {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TlsBroker {
    async fn start(material: &Material) -> Self {
        let dir = tempfile::tempdir().expect("tmp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cert = dir.path().join("server.crt");
        let key = dir.path().join("server.key");
        std::fs::write(&cert, &material.cert).expect("write the certificate");
        std::fs::write(&key, &material.key).expect("write the key");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\ncertfile {}\nkeyfile {}\n",
                cert.display(),
                key.display()
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start mosquitto ({e}); install it with: {INSTALL}"));
        let broker = Self {
            port,
            child,
            _dir: dir,
        };
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return broker;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("mosquitto did not answer on 127.0.0.1:{port} within 10 s");
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn plan() -> Plan {
    Plan {
        protocol: MqttProtocol::V5,
        filters: vec!["$share/g/devices/+".into()],
        dead_letter_topic: "devices/dead".into(),
    }
}

#[tokio::test]
async fn the_connect_check_verifies_a_tls_broker_with_the_ca_from_the_secret() {
    let wanted = Wanted {
        names: vec!["127.0.0.1".into()],
        lifetime: Duration::from_secs(3600),
    };
    let material = certs::plan(None, &wanted, SystemTime::now())
        .expect("a CA and a serving certificate")
        .expect("new material");
    let broker = TlsBroker::start(&material).await;
    let connection = |ca_pem: Option<String>| Connection {
        url: format!("mqtts://127.0.0.1:{}", broker.port),
        username: None,
        password: None,
        ca_pem,
    };

    bind(&connection(Some(material.ca.clone())), &plan())
        .await
        .expect("the broker's certificate verifies with the CA");

    // The system's CAs do not know the test's CA: the handshake fails, and
    // the check says the broker cannot be reached.
    let refused = bind(&connection(None), &plan()).await;
    assert!(
        matches!(refused, Err(BindError::Unreachable(_))),
        "without the CA: {refused:?}"
    );
}
