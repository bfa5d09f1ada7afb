//! Reading a configuration, and what is wrong or probably not meant in it,
//! each problem named by its field path (a broker section's own checks are
//! in `broker_checks.rs`).

use super::*;

/// One problem in a configuration, named by its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parse config: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("invalid config:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl Config {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_yaml::from_str(text)?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// Reads, parses and validates a YAML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Renders the configuration as YAML (used by the operator).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("the config type always serializes")
    }

    /// Returns every problem of the configuration, each with its field path.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, field: &str, message: &str| {
            if !ok {
                problems.push(Problem {
                    field: field.to_string(),
                    message: message.to_string(),
                });
            }
        };
        check(
            self.consumer.len() <= 253 && self.consumer.split('.').all(is_dns_label),
            "consumer",
            "must be a DNS subdomain: lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit",
        );
        check(
            !self.store.timeout.is_zero(),
            "store.timeout",
            "must be greater than zero",
        );
        check(
            (1..=1024).contains(&self.store.partitions),
            "store.partitions",
            "must be between 1 and 1024",
        );
        check(
            self.store
                .expected_rate
                .is_none_or(|r| r.is_finite() && r > 0.0),
            "store.expectedRate",
            "must be a positive number of messages per second",
        );
        let dedup = &self.dedup;
        check(
            dedup.lease >= Duration::from_millis(100),
            "dedup.lease",
            "must be at least 100ms",
        );
        check(
            dedup.retention >= Duration::from_secs(1),
            "dedup.retention",
            "must be at least 1s",
        );
        check(
            dedup.retention >= dedup.lease,
            "dedup.retention",
            "must be at least as long as dedup.lease",
        );
        check(
            dedup.max_attempts >= 1,
            "dedup.maxAttempts",
            "must be at least 1",
        );
        match &dedup.key {
            KeySource::Header { name } => check(
                !name.trim().is_empty(),
                "dedup.key.name",
                "must name a header",
            ),
            KeySource::Attribute { name } => check(
                !name.trim().is_empty(),
                "dedup.key.name",
                "must name an attribute",
            ),
            KeySource::JsonPointer { pointer } => check(
                pointer.starts_with('/'),
                "dedup.key.pointer",
                "must be a JSON pointer starting with '/', e.g. /order/id",
            ),
            KeySource::MessageId
            | KeySource::BodyHash
            | KeySource::CloudEvent
            | KeySource::RecordKey
            | KeySource::Coordinates => {}
        }
        if self.mode == Mode::Pipeline {
            check(
                self.broker.is_some(),
                "broker",
                "is required in pipeline mode",
            );
            check(
                self.delivery.is_some(),
                "delivery",
                "is required in pipeline mode",
            );
        }
        if let Some(broker) = &self.broker {
            check(
                broker.kinds_set().len() == 1,
                "broker",
                &format!(
                    "must set exactly one broker kind, one of: {}",
                    BrokerConfig::KINDS.join(", ")
                ),
            );
        }
        broker_checks::problems(
            self.broker.as_ref().and_then(|b| b.kind()),
            &dedup.key,
            &mut check,
        );
        if let Some(endpoint) = &self.traces.endpoint {
            check(
                endpoint.starts_with("http://"),
                "traces.endpoint",
                "must be an http:// URL of an OTLP/HTTP receiver (https is not built in: use a collector in the cluster or on the node)",
            );
        }
        if let Some(delivery) = &self.delivery {
            check(
                delivery.url.starts_with("http://"),
                "delivery.url",
                "must be an http:// URL on the loopback interface",
            );
            check(
                !delivery.timeout.is_zero(),
                "delivery.timeout",
                "must be greater than zero",
            );
            check(
                delivery.initial_backoff <= delivery.max_backoff,
                "delivery.initialBackoff",
                "must not exceed delivery.maxBackoff",
            );
            let readiness = &delivery.readiness;
            check(
                readiness.check != ReadinessCheck::Http
                    || readiness
                        .path
                        .as_deref()
                        .is_some_and(|p| p.starts_with('/')),
                "delivery.readiness.path",
                "must be a path starting with '/' when the check is http",
            );
            check(
                !readiness.interval.is_zero(),
                "delivery.readiness.interval",
                "must be greater than zero",
            );
            check(
                delivery.circuit_breaker.failures >= 1,
                "delivery.circuitBreaker.failures",
                "must be at least 1",
            );
            check(
                delivery.max_in_flight_bytes >= 64 * 1024,
                "delivery.maxInFlightBytes",
                "must be at least 65536 (64 KiB)",
            );
            check(
                delivery.expected_message_bytes != Some(0),
                "delivery.expectedMessageBytes",
                "must be greater than zero",
            );
        }
        let several = self.store.cluster || self.store.sentinel.is_some();
        if let Some(url) = &self.store.url {
            check(
                redis_url_problem(url, several).is_none(),
                "store.url",
                redis_url_problem(url, several).unwrap_or_default(),
            );
        }
        check(
            !(self.store.cluster && self.store.sentinel.is_some()),
            "store.sentinel",
            "cannot go with store.cluster: a Redis Cluster fails over by itself",
        );
        check(
            self.store
                .sentinel
                .as_ref()
                .is_none_or(|name| !name.trim().is_empty()),
            "store.sentinel",
            "must name the primary the Sentinels monitor (their `sentinel monitor <name>`)",
        );
        check(
            self.gate.listen.ip().is_loopback(),
            "gate.listen",
            "must be a loopback address: the claim API has no authentication",
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

impl Config {
    /// What is legal but probably not meant, each named by its field path.
    /// `check-config` prints these and the sidecar logs them at start.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut warnings = Vec::new();
        let lease = self.dedup.lease;
        if let Some(delivery) = &self.delivery {
            if lease < delivery.timeout {
                warnings.push(Problem {
                    field: "dedup.lease".into(),
                    message: format!(
                        "{} is shorter than delivery.timeout ({}): this holds only because the sidecar renews the lease every third of it while a delivery is in flight; if the store does not answer the renewals for a whole lease, another delivery of the same key may start beside a slow one",
                        humantime::format_duration(lease),
                        humantime::format_duration(delivery.timeout)
                    ),
                });
            }
        }
        if lease < self.store.timeout * 3 {
            warnings.push(Problem {
                field: "dedup.lease".into(),
                message: format!(
                    "{} is shorter than three store.timeout ({}): a renewal (every third of the lease) may not answer before the lease ends",
                    humantime::format_duration(lease),
                    humantime::format_duration(self.store.timeout)
                ),
            });
        }
        if self.store.cluster && self.store.partitions < 2 {
            warnings.push(Problem {
                field: "store.partitions".into(),
                message: "is 1 with store.cluster: every key of the consumer lives in one slot, so on one node of the Cluster; set it to a few times the number of primaries".into(),
            });
        }
        warnings
    }
}

/// What is wrong with a store URL, if anything: one `redis://` or
/// `rediss://` URL, or with `several` (a Cluster's seed nodes, or Sentinels)
/// one or more separated by commas.
pub fn redis_url_problem(url: &str, several: bool) -> Option<&'static str> {
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    if !several && urls.len() > 1 {
        return Some(
            "names several URLs: only a Cluster's seed nodes (store.cluster: true) or Sentinels (store.sentinel) come as a list",
        );
    }
    if urls
        .iter()
        .any(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
    {
        return Some("must start with redis:// or rediss:// (each seed node, with store.cluster)");
    }
    None
}

pub(super) fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}
