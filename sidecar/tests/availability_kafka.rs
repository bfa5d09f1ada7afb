//! The application-availability scenarios (`common/availability.rs`) against
//! a real Kafka-compatible broker on 127.0.0.1:9092 and the real Redis: the
//! same seven as for RabbitMQ, through the Kafka source. Run with
//! `--nocapture` to see each scenario's figures.

mod common;

use common::kafka::Kafka;

availability_tests!(Kafka);
