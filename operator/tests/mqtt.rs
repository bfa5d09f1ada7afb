//! The MQTT connection check against a real Mosquitto of the test's own with
//! a TLS listener, its certificate signed by a CA made for the test: the
//! check passes with the CA from the connection Secret (`caKey`) and fails
//! without it.

use std::time::{Duration, SystemTime};

use idemq_operator::broker::mqtt::{bind, Connection, Plan};
use idemq_operator::broker::BindError;
use idemq_operator::webhook::certs::{self, Material, Wanted};
use idemq_sidecar::config::MqttProtocol;
use idemq_testkit::mosquitto::OwnMosquitto;

/// A Mosquitto whose listener serves `material`'s certificate (the files
/// in `dir`).
async fn tls_broker(material: &Material, dir: &tempfile::TempDir) -> OwnMosquitto {
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, &material.cert).expect("write the certificate");
    std::fs::write(&key, &material.key).expect("write the key");
    OwnMosquitto::start(&format!(
        "certfile {}\nkeyfile {}",
        cert.display(),
        key.display()
    ))
    .await
    .expect("own mosquitto with a TLS listener")
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
    let dir = tempfile::tempdir().expect("tmp dir");
    let broker = tls_broker(&material, &dir).await;
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
