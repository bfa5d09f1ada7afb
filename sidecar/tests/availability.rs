//! The application-availability scenarios (`common/availability.rs`) against
//! the real RabbitMQ and Redis: an application starting late, stopped, failing
//! everything or slower than the lease, and large messages, cost no message
//! and no duplicate. Run with `--nocapture` to see each scenario's figures.

mod common;

use common::rabbitmq::RabbitMq;

availability_tests!(RabbitMq);
