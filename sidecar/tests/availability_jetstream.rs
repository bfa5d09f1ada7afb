//! The application-availability scenarios (`common/availability.rs`) against
//! NATS JetStream and the real Redis: the same seven as for RabbitMQ, through
//! the JetStream source, on a NATS server of the test's own
//! (`common/nats.rs`: messages larger than the shared server's 1 MiB, keys in
//! a header of their own so that JetStream's publish dedup keeps the copies
//! a scenario publishes back to back). Run with `--nocapture` to see each
//! scenario's figures.

mod common;

use common::jetstream::OwnJetStream;

availability_tests!(OwnJetStream);
