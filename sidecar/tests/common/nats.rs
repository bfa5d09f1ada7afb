//! A NATS server of the test's own: `nats-server` with JetStream on a free
//! port, its store in a temporary directory, and a larger `max_payload`
//! (8 MiB) than the shared server's 1 MiB, so that messages of several MiB
//! can be published. The shared server on 4222 is never touched. The
//! process is killed, and its store removed, when this is dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The largest message the server takes.
pub const MAX_PAYLOAD: usize = 8 * 1024 * 1024;

pub struct OwnNats {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl OwnNats {
    /// Starts the server and waits until it answers.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:{port}\"\nmax_payload: {MAX_PAYLOAD}\njetstream {{\n  store_dir: \"{}\"\n}}\n",
                dir.path().join("store").display()
            ),
        )
        .expect("write the NATS config");
        let log = std::fs::File::create(dir.path().join("nats.log")).expect("log file");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start nats-server ({e}); install it with: source .ci/services.sh && ensure_nats")
            });
        let own = Self { port, child, dir };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return own;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the test's own nats-server did not answer on 127.0.0.1:{port} within 10 s: {}",
            own.log()
        );
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// What the server wrote (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
