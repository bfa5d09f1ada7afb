//! Servers of a test's or benchmark's own, shared by the sidecar's and the
//! operator's test suites and by the benchmark: each runs on a free port on
//! 127.0.0.1 with a config made for it, and is killed when dropped, so a run
//! never depends on (or disturbs) the shared servers.

pub mod mosquitto;
