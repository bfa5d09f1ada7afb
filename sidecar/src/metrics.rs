//! Every metric the sidecar exposes, registered in one place.
//!
//! Labels are bounded sets of words (outcomes, operations, reasons), never keys
//! or names, so the series count stays fixed however many messages flow. One
//! sidecar serves one consumer, so the consumer is not a label: Prometheus's
//! pod labels already say which one it is. Each metric is listed in README's
//! metrics reference.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::source::DeadLetterReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    pub op: &'static str,
    pub kind: &'static str,
}

/// A Kafka partition: bounded by the configured topics and their partitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The bounded label values known in advance. Their series start at 0, so
/// that `increase()` and `rate()` see the first event (a series that appears
/// at 1 hides it from an alert) and dashboards show them before anything happened.
const MESSAGE_OUTCOMES: &[&str] = &[
    "delivered",
    "duplicate",
    "in_flight_requeued",
    "dead_lettered",
    "retried",
    "passed_through",
];
const CLAIM_OUTCOMES: &[&str] = &["acquired", "completed", "in_flight", "conflict"];
const STORE_OPS: &[&str] = &["claim", "complete", "release", "renew", "ping"];
const STORE_ERROR_KINDS: &[&str] = &["timeout", "error", "unreplicated"];
const RENEWAL_OUTCOMES: &[&str] = &["renewed", "lost", "error"];
const EXTENSION_OUTCOMES: &[&str] = &["extended", "failed"];
const ACK_FAILURES: &[&str] = &["expired", "failed"];

fn latency_histogram() -> Histogram {
    // 100µs .. ~13s: loopback store calls sit at the low end, slow apps at the top.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The sidecar's metrics. Cheap to share behind an `Arc`; every field is
/// internally synchronised.
pub struct Metrics {
    registry: Registry,
    /// Claims by outcome: acquired, completed, in_flight, conflict.
    pub claims: Family<OutcomeLabel, Counter>,
    /// Store call latency by operation: claim, complete, release, ping.
    pub store_duration: Family<OpLabel, Histogram>,
    /// Failed store calls by operation and kind: timeout, error.
    pub store_errors: Family<StoreErrorLabels, Counter>,
    /// 1 while the store answers.
    pub store_connected: Gauge,
    /// 1 while the broker connection is up.
    pub broker_connected: Gauge,
    /// Messages by outcome: delivered, duplicate, in_flight_requeued,
    /// dead_lettered, retried, passed_through.
    pub messages: Family<OutcomeLabel, Counter>,
    /// Dead letters by reason: missing_key, poison, max_attempts, conflict.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Messages taken from the broker and not yet settled.
    pub in_flight: Gauge,
    /// From the broker handing a message over to its settlement.
    pub end_to_end_duration: Histogram,
    /// The application's answer time.
    pub app_duration: Histogram,
    /// Messages delivered unchecked because the store was unavailable and the
    /// policy is passThrough. Alert on any increase.
    pub passthrough: Counter,
    /// Lease renewals of deliveries in flight by outcome: renewed, lost (the
    /// token no longer held the key), error (the store did not answer).
    pub lease_renewals: Family<OutcomeLabel, Counter>,
    /// 1 while the application takes messages (ready, circuit closed or
    /// half-open), 0 while the sidecar waits for it.
    pub app_available: Gauge,
    /// Bytes of message bodies taken from the broker and not yet settled.
    pub in_flight_bytes: Gauge,
    /// Times the key store was found to have lost the state this process
    /// had seen in it (its epoch marker changed). Alert on any increase.
    pub store_resets: Counter,
    /// Completions of processed (and acked) messages that the store refused
    /// and that are written again until it takes them; no claim is made
    /// meanwhile.
    pub completions_unrecorded: Gauge,
    /// Kafka: records of each assigned partition past the committed offset.
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    /// Kafka: partitions assigned to this member now.
    pub assigned_partitions: Gauge,
    /// Kafka: partitions revoked from this member (rebalances, shutdown).
    pub revoked_partitions: Counter,
    /// Pub/Sub: ack deadlines extended (modifyAckDeadline) for messages held,
    /// by outcome: extended, failed.
    pub broker_lease_extensions: Family<OutcomeLabel, Counter>,
    /// Pub/Sub: acknowledgements that failed, by outcome: expired (the ack id
    /// was no longer valid: the message comes again and is acked as a
    /// duplicate), failed (no answer after the client's retries).
    pub broker_ack_failures: Family<OutcomeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A message from its receipt to its settlement: counted in `in_flight`
/// while it lives; its time is observed in `end_to_end_duration` when it is
/// dropped.
pub struct InFlight {
    metrics: Arc<Metrics>,
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics
            .end_to_end_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a received message in flight until the returned guard drops.
    pub fn received(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight {
            metrics: self.clone(),
            started: Instant::now(),
        }
    }
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("idemq");
        let metrics = Self {
            claims: Family::default(),
            store_duration: Family::new_with_constructor(latency_histogram),
            store_errors: Family::default(),
            store_connected: Gauge::default(),
            broker_connected: Gauge::default(),
            messages: Family::default(),
            dead_letters: Family::default(),
            in_flight: Gauge::default(),
            end_to_end_duration: latency_histogram(),
            app_duration: latency_histogram(),
            passthrough: Counter::default(),
            lease_renewals: Family::default(),
            app_available: Gauge::default(),
            in_flight_bytes: Gauge::default(),
            store_resets: Counter::default(),
            completions_unrecorded: Gauge::default(),
            consumer_lag: Family::default(),
            assigned_partitions: Gauge::default(),
            revoked_partitions: Counter::default(),
            broker_lease_extensions: Family::default(),
            broker_ack_failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register("claims", "Claims by outcome", metrics.claims.clone());
        registry.register(
            "store_request_duration_seconds",
            "Key store call latency by operation",
            metrics.store_duration.clone(),
        );
        registry.register(
            "store_errors",
            "Failed key store calls by operation and kind",
            metrics.store_errors.clone(),
        );
        registry.register(
            "store_connected",
            "1 while the key store answers",
            metrics.store_connected.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while the broker connection is up",
            metrics.broker_connected.clone(),
        );
        registry.register("messages", "Messages by outcome", metrics.messages.clone());
        registry.register(
            "dead_letters",
            "Dead-lettered messages by reason",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "in_flight",
            "Messages taken from the broker and not yet settled",
            metrics.in_flight.clone(),
        );
        registry.register(
            "end_to_end_duration_seconds",
            "Time from receiving a message to settling it",
            metrics.end_to_end_duration.clone(),
        );
        registry.register(
            "app_request_duration_seconds",
            "Time the application took to answer a delivery",
            metrics.app_duration.clone(),
        );
        registry.register(
            "store_unavailable_passthrough",
            "Messages delivered without deduplication because the store was unavailable",
            metrics.passthrough.clone(),
        );
        registry.register(
            "lease_renewals",
            "Lease renewals of deliveries in flight by outcome",
            metrics.lease_renewals.clone(),
        );
        registry.register(
            "app_available",
            "1 while the application takes messages, 0 while the sidecar waits for it",
            metrics.app_available.clone(),
        );
        registry.register(
            "in_flight_bytes",
            "Bytes of message bodies taken from the broker and not yet settled",
            metrics.in_flight_bytes.clone(),
        );
        registry.register(
            "store_resets",
            "Times the key store lost the completed keys this process had seen in it",
            metrics.store_resets.clone(),
        );
        registry.register(
            "completions_unrecorded",
            "Completions the key store refused, written again until it takes them; claims wait meanwhile",
            metrics.completions_unrecorded.clone(),
        );
        registry.register(
            "consumer_lag",
            "Kafka records past the committed offset, per assigned partition",
            metrics.consumer_lag.clone(),
        );
        registry.register(
            "assigned_partitions",
            "Kafka partitions assigned to this member",
            metrics.assigned_partitions.clone(),
        );
        registry.register(
            "revoked_partitions",
            "Kafka partitions revoked from this member",
            metrics.revoked_partitions.clone(),
        );
        registry.register(
            "broker_lease_extensions",
            "Pub/Sub ack deadlines extended for messages held, by outcome",
            metrics.broker_lease_extensions.clone(),
        );
        registry.register(
            "broker_ack_failures",
            "Pub/Sub acknowledgements that failed, by outcome",
            metrics.broker_ack_failures.clone(),
        );
        for &outcome in EXTENSION_OUTCOMES {
            let _ = metrics
                .broker_lease_extensions
                .get_or_create(&OutcomeLabel { outcome });
        }
        for &outcome in ACK_FAILURES {
            let _ = metrics
                .broker_ack_failures
                .get_or_create(&OutcomeLabel { outcome });
        }
        for &outcome in MESSAGE_OUTCOMES {
            let _ = metrics.messages.get_or_create(&OutcomeLabel { outcome });
        }
        for &outcome in CLAIM_OUTCOMES {
            let _ = metrics.claims.get_or_create(&OutcomeLabel { outcome });
        }
        for reason in DeadLetterReason::ALL {
            let _ = metrics.dead_letters.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        for &outcome in RENEWAL_OUTCOMES {
            let _ = metrics
                .lease_renewals
                .get_or_create(&OutcomeLabel { outcome });
        }
        for &op in STORE_OPS {
            let _ = metrics.store_duration.get_or_create(&OpLabel { op });
            for &kind in STORE_ERROR_KINDS {
                let _ = metrics
                    .store_errors
                    .get_or_create(&StoreErrorLabels { op, kind });
            }
        }
        Self {
            registry,
            ..metrics
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn message(&self, outcome: &'static str) {
        self.messages.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn renewal(&self, outcome: &'static str) {
        self.lease_renewals
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn dead_letter(&self, reason: &'static str) {
        self.dead_letters
            .get_or_create(&ReasonLabel { reason })
            .inc();
        self.message("dead_lettered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exposed_with_the_idemq_prefix() {
        let metrics = Metrics::new();
        metrics
            .claims
            .get_or_create(&OutcomeLabel {
                outcome: "acquired",
            })
            .inc();
        metrics.dead_letter("poison");
        metrics
            .store_duration
            .get_or_create(&OpLabel { op: "claim" })
            .observe(0.001);
        let text = metrics.encode();
        assert!(
            text.contains("idemq_claims_total{outcome=\"acquired\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("idemq_dead_letters_total{reason=\"poison\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("idemq_messages_total{outcome=\"dead_lettered\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE idemq_store_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("idemq_store_unavailable_passthrough_total 0"),
            "{text}"
        );
    }

    #[test]
    fn known_label_values_start_at_zero() {
        let text = Metrics::new().encode();
        for series in [
            r#"idemq_messages_total{outcome="duplicate"} 0"#,
            r#"idemq_dead_letters_total{reason="max_attempts"} 0"#,
            r#"idemq_claims_total{outcome="conflict"} 0"#,
            r#"idemq_store_errors_total{op="claim",kind="timeout"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
