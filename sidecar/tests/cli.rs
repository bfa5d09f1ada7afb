//! The `idemq-sidecar` binary: config checking and clean shutdown on SIGTERM.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_idemq-sidecar");

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(common::unique("idemq-cli"));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("write config");
    path
}

#[test]
fn check_config_accepts_a_valid_file() {
    let path = write_config("ok.yaml", "consumer: orders\nmode: gate\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

#[test]
fn check_config_warns_about_a_lease_shorter_than_the_delivery_timeout() {
    let path = write_config(
        "short-lease.yaml",
        "consumer: orders\ndedup:\n  lease: 2s\nbroker:\n  rabbitmq:\n    queue: orders\ndelivery:\n  url: http://127.0.0.1:8080/\n  timeout: 10s\n",
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "a warning is not an error: {stdout}");
    assert!(
        stdout.contains("warning: dedup.lease: 2s is shorter than delivery.timeout (10s)")
            && stdout.contains("renews the lease"),
        "{stdout}"
    );
    let fine = write_config(
        "long-lease.yaml",
        "consumer: orders\nbroker:\n  rabbitmq:\n    queue: orders\ndelivery:\n  url: http://127.0.0.1:8080/\n",
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&fine)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("warning"),
        "the defaults warn of nothing: {stdout}"
    );
}

#[test]
fn check_config_exits_64_naming_each_bad_field() {
    let path = write_config(
        "bad.yaml",
        "consumer: orders\nmode: gate\ndedup:\n  maxAttempts: 0\n  lease: 10ms\n",
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("dedup.maxAttempts: must be at least 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("dedup.lease: must be at least 100ms"),
        "{stderr}"
    );
}

#[test]
fn check_config_names_an_unknown_field() {
    let path = write_config("typo.yaml", "consumer: orders\nmode: gate\nretension: 1h\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("retension"));
}

#[test]
fn sigterm_stops_the_sidecar_cleanly() {
    let admin = free_port();
    let gate = free_port();
    let path = write_config(
        "run.yaml",
        &format!(
            "consumer: orders\nmode: gate\nadmin:\n  listen: 127.0.0.1:{admin}\ngate:\n  listen: 127.0.0.1:{gate}\n"
        ),
    );
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the admin listener answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(Instant::now() < deadline, "sidecar did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("wait");
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut logs).ok();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("shutting down"), "{logs}");
}

#[test]
fn missing_redis_url_is_a_config_error() {
    let path = write_config(
        "redis.yaml",
        "consumer: orders\nmode: gate\nstore:\n  kind: redis\n",
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env_remove("IDEMQ_REDIS_URL")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("IDEMQ_REDIS_URL"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sidecar");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/sidecar exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(BIN)
                .arg("check-config")
                .arg(&path)
                .output()
                .expect("run");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "found {checked} example configs");
}
