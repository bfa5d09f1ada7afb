//! The problems of a `broker` section, each named by its field path.

use std::time::Duration;

use super::*;

/// The problems of the configured broker's section, and of a key source that
/// its kind does not carry.
pub(super) fn problems(
    kind: Option<BrokerKind<'_>>,
    key: &KeySource,
    check: &mut impl FnMut(bool, &str, &str),
) {
    match kind {
        Some(BrokerKind::RabbitMq(rabbit)) => rabbitmq_problems(rabbit, key, check),
        Some(BrokerKind::Kafka(kafka)) => kafka_problems(kafka, key, check),
        Some(BrokerKind::JetStream(js)) => jetstream_problems(js, key, check),
        Some(BrokerKind::Mqtt(mqtt)) => mqtt_problems(mqtt, key, check),
        Some(BrokerKind::PubSub(pubsub)) => pubsub_problems(pubsub, key, check),
        Some(BrokerKind::ZeroMq(zmq)) => zeromq_problems(zmq, key, check),
        None => {}
    }
    if !matches!(kind, Some(BrokerKind::PubSub(_))) {
        check(
            !matches!(key, KeySource::Attribute { .. }),
            "dedup.key.from",
            "attribute is a Pub/Sub key; other brokers carry headers: use header",
        );
    }
}

/// The problems of a `broker.rabbitmq` section.
fn rabbitmq_problems(
    rabbit: &RabbitMqConfig,
    key: &KeySource,
    check: &mut impl FnMut(bool, &str, &str),
) {
    check(
        !rabbit.queue.is_empty(),
        "broker.rabbitmq.queue",
        "must not be empty",
    );
    check(
        rabbit.prefetch >= 1,
        "broker.rabbitmq.prefetch",
        "must be at least 1",
    );
    amqp_url(rabbit.url.as_deref(), "broker.rabbitmq.url", check);
    no_kafka_key(
        key,
        "RabbitMQ use messageId, header, jsonPointer, bodyHash or cloudEvent",
        check,
    );
}

/// The problems of a `broker.jetstream` section.
fn jetstream_problems(
    js: &JetStreamConfig,
    key: &KeySource,
    check: &mut impl FnMut(bool, &str, &str),
) {
    for (value, field) in [
        (&js.stream, "broker.jetstream.stream"),
        (&js.consumer, "broker.jetstream.consumer"),
        (
            &js.dead_letter_subject,
            "broker.jetstream.deadLetterSubject",
        ),
    ] {
        check(!value.is_empty(), field, "must not be empty");
    }
    check(
        js.max_ack_pending >= 1,
        "broker.jetstream.maxAckPending",
        "must be at least 1",
    );
    check(
        js.ack_wait >= Duration::from_secs(1),
        "broker.jetstream.ackWait",
        "must be at least 1s",
    );
    check(
        js.max_deliver != Some(0),
        "broker.jetstream.maxDeliver",
        "must be at least 1 (leave it unset for no limit)",
    );
    no_kafka_key(
        key,
        "JetStream use messageId (Nats-Msg-Id), header, jsonPointer, bodyHash or cloudEvent",
        check,
    );
    if let Some(url) = &js.url {
        check(
            ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|scheme| url.starts_with(scheme)),
            "broker.jetstream.url",
            "must start with nats:// or tls://",
        );
    }
}

/// The problems of a `broker.pubsub` section.
fn pubsub_problems(
    pubsub: &PubSubConfig,
    key: &KeySource,
    check: &mut impl FnMut(bool, &str, &str),
) {
    check(
        is_project_id(&pubsub.project),
        "broker.pubsub.project",
        "must be a project id: 6 to 30 lowercase letters, digits and '-', starting with a letter",
    );
    check(
        is_pubsub_name(&pubsub.subscription),
        "broker.pubsub.subscription",
        "must be a subscription id (not a path): 3 to 255 letters, digits and '-_.~+%', starting with a letter",
    );
    if let Some(topic) = &pubsub.dead_letter_topic {
        check(
            is_pubsub_name(topic),
            "broker.pubsub.deadLetterTopic",
            "must be a topic id (not a path): 3 to 255 letters, digits and '-_.~+%', starting with a letter",
        );
    }
    check(
        pubsub.max_outstanding_messages >= 1,
        "broker.pubsub.maxOutstandingMessages",
        "must be at least 1",
    );
    check(
        pubsub.max_outstanding_bytes >= 64 * 1024,
        "broker.pubsub.maxOutstandingBytes",
        "must be at least 65536 (64 KiB)",
    );
    check(
        pubsub
            .credentials_file
            .as_deref()
            .is_none_or(|f| f.starts_with('/')),
        "broker.pubsub.credentialsFile",
        "must be an absolute path",
    );
    check(
        !matches!(
            key,
            KeySource::RecordKey | KeySource::Coordinates | KeySource::Header { .. }
        ),
        "dedup.key.from",
        "with Pub/Sub use messageId, attribute, jsonPointer, bodyHash or cloudEvent (Pub/Sub messages carry attributes, not headers)",
    );
}

/// A Google Cloud project id.
fn is_project_id(id: &str) -> bool {
    (6..=30).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && !id.ends_with('-')
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A Pub/Sub topic or subscription id.
fn is_pubsub_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.starts_with("goog")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.~+%".contains(c))
}

/// The problems of a `broker.kafka` section.
fn kafka_problems(kafka: &KafkaConfig, key: &KeySource, check: &mut impl FnMut(bool, &str, &str)) {
    check(
        !kafka.topics.is_empty() && kafka.topics.iter().all(|t| is_topic_name(t)),
        "broker.kafka.topics",
        "must name at least one topic, each of letters, digits, '.', '_' and '-' (at most 249)",
    );
    check(
        !kafka.group_id.trim().is_empty(),
        "broker.kafka.groupId",
        "must not be empty",
    );
    check(
        kafka.max_in_flight >= 1,
        "broker.kafka.maxInFlight",
        "must be at least 1",
    );
    check(
        kafka.session_timeout >= Duration::from_secs(1),
        "broker.kafka.sessionTimeout",
        "must be at least 1s",
    );
    check(
        !kafka.commit_interval.is_zero(),
        "broker.kafka.commitInterval",
        "must be greater than zero",
    );
    if let Some(topic) = &kafka.dead_letter_topic {
        topic_name(topic, "broker.kafka.deadLetterTopic", check);
    }
    sasl_mechanism(kafka.security(), "broker.kafka.saslMechanism", check);
    check(
        !matches!(key, KeySource::MessageId),
        "dedup.key.from",
        "Kafka records have no message id: use recordKey, header, jsonPointer, bodyHash, cloudEvent or coordinates",
    );
}

/// The problems of a `broker.mqtt` section.
fn mqtt_problems(mqtt: &MqttConfig, key: &KeySource, check: &mut impl FnMut(bool, &str, &str)) {
    check(
        !mqtt.topics.is_empty()
            && mqtt
                .topics
                .iter()
                .all(|t| !t.is_empty() && !t.starts_with("$share/")),
        "broker.mqtt.topics",
        "must name at least one topic filter, none empty; subscribe shared with sharedGroup, not $share/",
    );
    check(
        !mqtt.dead_letter_topic.is_empty() && !mqtt.dead_letter_topic.contains(['+', '#']),
        "broker.mqtt.deadLetterTopic",
        "must be a topic name, without wildcards",
    );
    if let Some(group) = &mqtt.shared_group {
        check(
            !group.is_empty() && !group.contains(['/', '+', '#']),
            "broker.mqtt.sharedGroup",
            "must not be empty or contain /, + or #",
        );
    }
    if let Some(id) = &mqtt.client_id {
        check(!id.is_empty(), "broker.mqtt.clientId", "must not be empty");
    }
    check(
        mqtt.receive_maximum >= 1,
        "broker.mqtt.receiveMaximum",
        "must be at least 1",
    );
    check(
        mqtt.session_expiry >= Duration::from_secs(1)
            && mqtt.session_expiry.as_secs() < u64::from(u32::MAX),
        "broker.mqtt.sessionExpiry",
        "must be at least 1s and less than 136 years",
    );
    if let Some(url) = &mqtt.url {
        check(
            crate::source::mqtt::Endpoint::parse(url).is_ok(),
            "broker.mqtt.url",
            "must be mqtt://host[:port] or mqtts://host[:port]",
        );
    }
    no_kafka_key(key, "MQTT use messageId (MQTT 5 correlation data), header (an MQTT 5 user property), jsonPointer, bodyHash or cloudEvent", check);
    if mqtt.protocol == MqttProtocol::V311 {
        check(
            !matches!(key, KeySource::MessageId | KeySource::Header { .. }),
            "dedup.key.from",
            "MQTT 3.1.1 messages have no properties: use jsonPointer, bodyHash or cloudEvent (structured)",
        );
    }
}

/// The problems of a `broker.zeromq` section.
fn zeromq_problems(zmq: &ZeroMqConfig, key: &KeySource, check: &mut impl FnMut(bool, &str, &str)) {
    check(
        crate::source::zeromq::bind_problem(&zmq.bind).is_none(),
        "broker.zeromq.bind",
        crate::source::zeromq::bind_problem(&zmq.bind).unwrap_or_default(),
    );
    match zmq.pattern {
        ZeroMqPattern::Sub => check(
            !zmq.subscribe.is_empty(),
            "broker.zeromq.subscribe",
            "must name at least one topic prefix (\"\" takes every message)",
        ),
        ZeroMqPattern::Router | ZeroMqPattern::Pull => check(
            zmq.subscribe.is_empty(),
            "broker.zeromq.subscribe",
            "is for pattern sub only",
        ),
    }
    check(
        zmq.max_in_flight >= 1,
        "broker.zeromq.maxInFlight",
        "must be at least 1",
    );
    let dead = &zmq.dead_letter;
    check(
        dead.target().is_some(),
        "broker.zeromq.deadLetter",
        &format!(
            "must {} (a second ZeroMQ endpoint, a RabbitMQ exchange or queue, a Kafka topic)",
            ZeroMqDeadLetter::ONE_TARGET
        ),
    );
    if let Some(endpoint) = &dead.endpoint {
        check(
            endpoint
                .strip_prefix("tcp://")
                .and_then(|rest| rest.rsplit_once(':'))
                .is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                })
                || endpoint
                    .strip_prefix("ipc://")
                    .is_some_and(|path| !path.is_empty()),
            "broker.zeromq.deadLetter.endpoint",
            "must be tcp://host:port or ipc://path",
        );
        check(
            endpoint != &zmq.bind,
            "broker.zeromq.deadLetter.endpoint",
            "must differ from broker.zeromq.bind",
        );
    }
    if let Some(rabbit) = &dead.rabbitmq {
        check(
            rabbit.exchange.is_some() != rabbit.queue.is_some(),
            "broker.zeromq.deadLetter.rabbitmq",
            "must set exactly one of exchange (with routingKey) or queue",
        );
        for (value, field) in [
            (
                &rabbit.exchange,
                "broker.zeromq.deadLetter.rabbitmq.exchange",
            ),
            (&rabbit.queue, "broker.zeromq.deadLetter.rabbitmq.queue"),
        ] {
            if let Some(name) = value {
                check(
                    !name.is_empty() && name.len() <= 255,
                    field,
                    "must be a name of 1 to 255 characters",
                );
            }
        }
        check(
            rabbit.routing_key.is_none() || rabbit.exchange.is_some(),
            "broker.zeromq.deadLetter.rabbitmq.routingKey",
            "goes with exchange (a queue is its own routing key)",
        );
        amqp_url(
            rabbit.url.as_deref(),
            "broker.zeromq.deadLetter.rabbitmq.url",
            check,
        );
    }
    if let Some(kafka) = &dead.kafka {
        topic_name(&kafka.topic, "broker.zeromq.deadLetter.kafka.topic", check);
        sasl_mechanism(
            kafka.security(),
            "broker.zeromq.deadLetter.kafka.saslMechanism",
            check,
        );
    }
    no_kafka_key(key, "ZeroMQ use messageId (the message-id frame), header (the header frame), jsonPointer, bodyHash or cloudEvent", check);
}

/// Kafka's legal topic names.
fn is_topic_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 249
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A broker URL, when set, is an AMQP one.
fn amqp_url(url: Option<&str>, field: &str, check: &mut impl FnMut(bool, &str, &str)) {
    if let Some(url) = url {
        check(
            url.starts_with("amqp://") || url.starts_with("amqps://"),
            field,
            "must start with amqp:// or amqps://",
        );
    }
}

fn topic_name(topic: &str, field: &str, check: &mut impl FnMut(bool, &str, &str)) {
    check(
        is_topic_name(topic),
        field,
        "must be a topic name: letters, digits, '.', '_' and '-' (at most 249)",
    );
}

/// A SASL mechanism is set with a SASL security protocol, and only then.
fn sasl_mechanism(
    security: KafkaSecurity<'_>,
    field: &str,
    check: &mut impl FnMut(bool, &str, &str),
) {
    let sasl = matches!(
        security.security_protocol,
        SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
    );
    check(
        sasl == security.sasl_mechanism.is_some(),
        field,
        "is required with a SASL securityProtocol, and only with one",
    );
}

/// Kafka's own key sources with another broker; `instead` names that broker
/// and its key sources ("RabbitMQ use messageId, …").
fn no_kafka_key(key: &KeySource, instead: &str, check: &mut impl FnMut(bool, &str, &str)) {
    check(
        !matches!(key, KeySource::RecordKey | KeySource::Coordinates),
        "dedup.key.from",
        &format!("recordKey and coordinates are Kafka keys; with {instead}"),
    );
}
