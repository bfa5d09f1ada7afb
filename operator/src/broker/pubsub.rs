//! Google Cloud Pub/Sub bindings: the topic to consume must exist, the
//! subscription is created with the spec's settings when it is missing, and
//! so are the dead-letter topics.
//!
//! The topic belongs to its producers, so it is never created here: a typo
//! in `topic` shows as `TopicNotFound` instead of becoming a new topic that
//! nobody publishes to. A subscription that exists with other settings than
//! the spec's (made by hand, by another tool, or by an earlier spec) is
//! reported as `SubscriptionMismatch` and never changed: updating it would
//! change what someone else consumes. Credentials the project refuses an
//! operation are `PermissionDenied`.
//!
//! The client is the sidecar's ([`idemq_sidecar::source::pubsub::client`]),
//! one per project and service-account key, pooled like every broker's
//! clients ([`Pool`]). With `PUBSUB_EMULATOR_HOST` set on the operator it
//! talks to that emulator without credentials (tests and local clusters).

use std::sync::Arc;
use std::time::Duration;

use gcloud_gax::grpc::{Code, Status};
use gcloud_googleapis::pubsub::v1::{DeadLetterPolicy, RetryPolicy};
use gcloud_pubsub::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_pubsub::client::Client;
use gcloud_pubsub::subscription::SubscriptionConfig;
use idemq_sidecar::source::pubsub::{client, SourceError};

use super::pool::{Connector, Pool, PoolConfig};
use super::BindError;
use crate::crd::PubSubBinding;

/// How long the whole binding (a few admin calls) may take.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Pub/Sub's defaults for what a retry policy leaves unset.
const MINIMUM_BACKOFF: Duration = Duration::from_secs(10);
const MAXIMUM_BACKOFF: Duration = Duration::from_secs(600);
const ACK_DEADLINE_SECONDS: i32 = 60;
const MAX_DELIVERY_ATTEMPTS: i32 = 5;

/// What to check and create for one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub project: String,
    /// The topic, which must exist.
    pub topic: String,
    /// Created when missing, with the settings below.
    pub subscription: String,
    pub ack_deadline_seconds: i32,
    /// Minimum and maximum backoff; `None`: redelivery at once.
    pub retry_policy: Option<(Duration, Duration)>,
    /// The dead-letter topic and the deliveries before a message moves there.
    pub dead_letter_policy: Option<(String, i32)>,
    /// The topic the sidecar publishes dead letters to, without a policy.
    pub dead_letter_topic: Option<String>,
    pub exactly_once: bool,
    pub ordering: bool,
    /// Empty: no filter.
    pub filter: String,
}

impl Plan {
    /// `None` when the retry policy's durations do not parse (validation
    /// refuses such a spec before anything is bound).
    pub fn of(ps: &PubSubBinding) -> Option<Self> {
        let retry_policy = match &ps.retry_policy {
            None => None,
            Some(r) => {
                let parse = |value: &Option<String>, default| match value {
                    None => Some(default),
                    Some(v) => humantime::parse_duration(v).ok(),
                };
                Some((
                    parse(&r.minimum_backoff, MINIMUM_BACKOFF)?,
                    parse(&r.maximum_backoff, MAXIMUM_BACKOFF)?,
                ))
            }
        };
        Some(Self {
            project: ps.project.clone(),
            topic: ps.topic.clone(),
            subscription: ps.subscription.clone(),
            ack_deadline_seconds: ps.ack_deadline_seconds.unwrap_or(ACK_DEADLINE_SECONDS),
            retry_policy,
            dead_letter_policy: ps.dead_letter_policy.as_ref().map(|d| {
                (
                    d.topic.clone(),
                    d.max_delivery_attempts.unwrap_or(MAX_DELIVERY_ATTEMPTS),
                )
            }),
            dead_letter_topic: ps.dead_letter_topic.clone(),
            exactly_once: ps.enable_exactly_once_delivery,
            ordering: ps.enable_message_ordering,
            filter: ps.filter.clone().unwrap_or_default(),
        })
    }

    /// A sentence for the status: what is there once bound.
    pub fn describe(&self) -> String {
        let dead = match (&self.dead_letter_policy, &self.dead_letter_topic) {
            (Some((topic, attempts)), _) => {
                format!("; Pub/Sub moves a message to {topic} after {attempts} deliveries")
            }
            (None, Some(topic)) => format!("; dead letters go to {topic}"),
            (None, None) => String::new(),
        };
        format!(
            "topic {} exists and subscription {} is present in project {}{dead}",
            self.topic, self.subscription, self.project
        )
    }

    /// The dead-letter topics to create when missing.
    fn dead_letter_topics(&self) -> impl Iterator<Item = &str> {
        self.dead_letter_policy
            .as_ref()
            .map(|(t, _)| t.as_str())
            .into_iter()
            .chain(self.dead_letter_topic.as_deref())
    }

    /// The subscription's settings, dead-letter topic by its full name.
    fn config(&self, client: &Client) -> SubscriptionConfig {
        SubscriptionConfig {
            ack_deadline_seconds: self.ack_deadline_seconds,
            retry_policy: self.retry_policy.map(|(min, max)| RetryPolicy {
                minimum_backoff: min.try_into().ok(),
                maximum_backoff: max.try_into().ok(),
            }),
            dead_letter_policy: self.dead_letter_policy.as_ref().map(|(topic, attempts)| {
                DeadLetterPolicy {
                    dead_letter_topic: client.fully_qualified_topic_name(topic),
                    max_delivery_attempts: *attempts,
                }
            }),
            enable_exactly_once_delivery: self.exactly_once,
            enable_message_ordering: self.ordering,
            filter: self.filter.clone(),
            ..SubscriptionConfig::default()
        }
    }
}

/// The service-account key from the credentials Secret. Secret: no
/// `Debug`, and nothing prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Connection {
    /// The key file's content (JSON).
    pub key: String,
}

impl Connection {
    pub fn from_secret(
        ps: &PubSubBinding,
        value: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Self, String> {
        Ok(Self {
            key: value(&ps.credentials_secret_ref.key)?,
        })
    }

    pub fn identity(&self) -> Vec<u8> {
        self.key.as_bytes().to_vec()
    }
}

/// What one client is for: a project, with a key.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub project: String,
    pub key: String,
}

/// Opens Pub/Sub clients for the [`Pool`]: to the emulator at
/// `emulator_host` when set, otherwise to Google Cloud with the key.
pub struct PubSubConnector {
    pub emulator_host: Option<String>,
}

#[async_trait::async_trait]
impl Connector for PubSubConnector {
    type Endpoint = Endpoint;
    type Client = Client;

    fn identity(endpoint: &Endpoint) -> Vec<u8> {
        [endpoint.project.as_bytes(), b"\0", endpoint.key.as_bytes()].concat()
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Client, BindError> {
        let key = match &self.emulator_host {
            Some(_) => None,
            // The parser's errors name a position, never the content.
            None => Some(
                CredentialsFile::new_from_str(&endpoint.key)
                    .await
                    .map_err(|e| {
                        BindError::AuthenticationFailed(format!(
                    "the credentials Secret does not hold a service-account key (JSON): {e}"
                ))
                    })?,
            ),
        };
        client(&endpoint.project, self.emulator_host.as_deref(), key)
            .await
            .map_err(|e| match e {
                SourceError::Credentials(_) | SourceError::KeyFile { .. } => {
                    BindError::AuthenticationFailed(e.to_string())
                }
                _ => BindError::Unreachable(e.to_string()),
            })
    }

    /// The gRPC channel reconnects by itself.
    fn usable(&self, _: &Client) -> bool {
        true
    }

    async fn close(&self, _: &Client) {}
}

/// The Pub/Sub binder: one pooled client per project and key.
pub struct PubSub {
    pool: Arc<Pool<PubSubConnector>>,
}

impl Default for PubSub {
    /// Honours `PUBSUB_EMULATOR_HOST`, as Google's clients do.
    fn default() -> Self {
        Self::new(PoolConfig::default(), emulator_host_from_env())
    }
}

/// The operator's `PUBSUB_EMULATOR_HOST`, when set and not empty.
pub fn emulator_host_from_env() -> Option<String> {
    std::env::var(idemq_sidecar::config::SecretEnv::PUBSUB_EMULATOR_HOST)
        .ok()
        .filter(|h| !h.is_empty())
}

impl PubSub {
    pub fn new(pool: PoolConfig, emulator_host: Option<String>) -> Self {
        Self {
            pool: Pool::new(PubSubConnector { emulator_host }, pool),
        }
    }

    /// Checks the topic, creates the dead-letter topics and the subscription
    /// when missing, and reports a subscription with other settings.
    pub async fn bind(&self, connection: &Connection, plan: &Plan) -> Result<(), BindError> {
        let endpoint = Endpoint {
            project: plan.project.clone(),
            key: connection.key.clone(),
        };
        let client = self.pool.get(&endpoint).await?;
        match tokio::time::timeout(TIMEOUT, bind(&client, plan)).await {
            Ok(result) => result,
            Err(_) => Err(BindError::Unreachable(format!(
                "Pub/Sub did not answer within {TIMEOUT:?}"
            ))),
        }
    }
}

/// `status` of a call on `what`, as a binding error.
fn failed(what: &str, status: &Status) -> BindError {
    let text = format!("{what}: {}", status.message());
    match status.code() {
        Code::PermissionDenied => BindError::PermissionDenied(text),
        Code::Unauthenticated => BindError::AuthenticationFailed(text),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => BindError::Unreachable(text),
        _ => BindError::Refused(text),
    }
}

async fn bind(client: &Client, plan: &Plan) -> Result<(), BindError> {
    let topic = client.topic(&plan.topic);
    match topic.exists(None).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(BindError::PubSubTopicNotFound(
                topic.fully_qualified_name().to_string(),
            ))
        }
        Err(status) => return Err(failed(&format!("look up topic {}", plan.topic), &status)),
    }
    for name in plan.dead_letter_topics() {
        dead_letter_topic(client, name).await?;
    }
    let subscription = client.subscription(&plan.subscription);
    let wanted = plan.config(client);
    let what = format!("subscription {}", plan.subscription);
    let existing = match subscription.config(None).await {
        Ok(existing) => existing,
        Err(status) if status.code() == Code::NotFound => {
            let created = subscription
                .create(topic.fully_qualified_name(), wanted.clone(), None)
                .await;
            match created {
                Ok(()) => return Ok(()),
                // Created meanwhile (by a sidecar, another replica): compare.
                Err(status) if status.code() == Code::AlreadyExists => subscription
                    .config(None)
                    .await
                    .map_err(|status| failed(&format!("look up {what}"), &status))?,
                Err(status) => return Err(failed(&format!("create {what}"), &status)),
            }
        }
        Err(status) => return Err(failed(&format!("look up {what}"), &status)),
    };
    let differences = differences(topic.fully_qualified_name(), &wanted, &existing);
    if differences.is_empty() {
        return Ok(());
    }
    Err(BindError::SubscriptionMismatch(format!(
        "{what} exists with {}; idemq does not change a subscription it did not create: delete it (idemq creates it again; what it held unacknowledged is lost with it) or align the spec",
        differences.join(", ")
    )))
}

/// Creates the dead-letter topic `name` when it is missing.
async fn dead_letter_topic(client: &Client, name: &str) -> Result<(), BindError> {
    let topic = client.topic(name);
    let what = format!("dead-letter topic {name}");
    match topic.exists(None).await {
        Ok(true) => Ok(()),
        Ok(false) => match topic.create(None, None).await {
            Ok(()) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            Err(status) => Err(failed(&format!("create {what}"), &status)),
        },
        Err(status) => Err(failed(&format!("look up {what}"), &status)),
    }
}

/// The settings in which `existing` (its topic and configuration) differs
/// from `wanted` on `topic`, each as "<setting> <existing> (the spec:
/// <wanted>)"; empty when it matches.
fn differences(
    topic: &str,
    wanted: &SubscriptionConfig,
    existing: &(String, SubscriptionConfig),
) -> Vec<String> {
    let (existing_topic, existing) = existing;
    let mut out = Vec::new();
    let mut differ = |setting: &str, has: String, wants: String| {
        if has != wants {
            out.push(format!("{setting} {has} (the spec: {wants})"));
        }
    };
    differ("topic", existing_topic.clone(), topic.to_string());
    let push = existing
        .push_config
        .as_ref()
        .is_some_and(|p| !p.push_endpoint.is_empty());
    differ(
        "type",
        if push { "push" } else { "pull" }.into(),
        "pull".into(),
    );
    differ(
        "ackDeadlineSeconds",
        existing.ack_deadline_seconds.to_string(),
        wanted.ack_deadline_seconds.to_string(),
    );
    differ(
        "retryPolicy",
        retry_policy(existing.retry_policy.as_ref()),
        retry_policy(wanted.retry_policy.as_ref()),
    );
    differ(
        "deadLetterPolicy",
        dead_letter_policy(existing.dead_letter_policy.as_ref()),
        dead_letter_policy(wanted.dead_letter_policy.as_ref()),
    );
    differ(
        "enableExactlyOnceDelivery",
        existing.enable_exactly_once_delivery.to_string(),
        wanted.enable_exactly_once_delivery.to_string(),
    );
    differ(
        "enableMessageOrdering",
        existing.enable_message_ordering.to_string(),
        wanted.enable_message_ordering.to_string(),
    );
    let filter = |f: &str| {
        if f.is_empty() {
            "none".to_string()
        } else {
            format!("{f:?}")
        }
    };
    differ("filter", filter(&existing.filter), filter(&wanted.filter));
    out
}

fn retry_policy(policy: Option<&RetryPolicy>) -> String {
    let Some(policy) = policy else {
        return "none".into();
    };
    let backoff = |d: Option<_>, default: Duration| {
        let d = d
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(default);
        humantime::format_duration(d).to_string()
    };
    format!(
        "{}..{}",
        backoff(policy.minimum_backoff, MINIMUM_BACKOFF),
        backoff(policy.maximum_backoff, MAXIMUM_BACKOFF)
    )
}

fn dead_letter_policy(policy: Option<&DeadLetterPolicy>) -> String {
    match policy {
        None => "none".into(),
        Some(p) => format!(
            "{} after {} deliveries",
            p.dead_letter_topic, p.max_delivery_attempts
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::sample;

    fn binding(ic: &crate::crd::IdempotentConsumer) -> &PubSubBinding {
        ic.spec.broker.pubsub.as_ref().expect("pubsub")
    }

    #[test]
    fn the_plan_takes_the_spec_with_pubsubs_defaults() {
        let mut ic = sample::pubsub_policy();
        let plan = Plan::of(binding(&ic)).expect("plan");
        assert_eq!(
            (plan.project.as_str(), plan.topic.as_str()),
            ("shop-prod", "orders")
        );
        assert_eq!(plan.subscription, "orders-billing");
        assert_eq!(plan.ack_deadline_seconds, 30);
        assert_eq!(
            plan.retry_policy,
            Some((Duration::from_secs(5), Duration::from_secs(600)))
        );
        assert_eq!(plan.dead_letter_policy, Some(("orders-dead".into(), 5)));
        assert_eq!(
            plan.describe(),
            "topic orders exists and subscription orders-billing is present in project shop-prod; Pub/Sub moves a message to orders-dead after 5 deliveries"
        );
        let ps = ic.spec.broker.pubsub.as_mut().expect("pubsub");
        ps.retry_policy = None;
        ps.ack_deadline_seconds = None;
        let plan = Plan::of(binding(&ic)).expect("plan");
        assert_eq!((plan.retry_policy, plan.ack_deadline_seconds), (None, 60));
    }

    #[test]
    fn a_subscription_with_other_settings_is_described_setting_by_setting() {
        let ic = sample::pubsub_policy();
        let plan = Plan::of(binding(&ic)).expect("plan");
        let topic = "projects/shop-prod/topics/orders";
        let dead = "projects/shop-prod/topics/orders-dead";
        let wanted = SubscriptionConfig {
            ack_deadline_seconds: 30,
            retry_policy: Some(RetryPolicy {
                minimum_backoff: Duration::from_secs(5).try_into().ok(),
                maximum_backoff: Duration::from_secs(600).try_into().ok(),
            }),
            dead_letter_policy: Some(DeadLetterPolicy {
                dead_letter_topic: dead.into(),
                max_delivery_attempts: 5,
            }),
            ..SubscriptionConfig::default()
        };
        let same = (topic.to_string(), wanted.clone());
        assert!(differences(topic, &wanted, &same).is_empty());
        let other = SubscriptionConfig {
            ack_deadline_seconds: 10,
            retry_policy: None,
            filter: "attributes.kind = \"a\"".into(),
            ..wanted.clone()
        };
        assert_eq!(
            differences(topic, &wanted, &("projects/shop-prod/topics/refunds".into(), other)),
            [
                "topic projects/shop-prod/topics/refunds (the spec: projects/shop-prod/topics/orders)",
                "ackDeadlineSeconds 10 (the spec: 30)",
                "retryPolicy none (the spec: 5s..10m)",
                "filter \"attributes.kind = \\\"a\\\"\" (the spec: none)"
            ]
        );
        assert_eq!(
            plan.dead_letter_topics().collect::<Vec<_>>(),
            ["orders-dead"]
        );
    }

    #[test]
    fn refusals_map_to_what_they_mean() {
        let denied = failed(
            "look up topic orders",
            &Status::new(Code::PermissionDenied, "no"),
        );
        assert_eq!(
            denied,
            BindError::PermissionDenied("look up topic orders: no".into())
        );
        assert!(matches!(
            failed("x", &Status::new(Code::Unauthenticated, "no")),
            BindError::AuthenticationFailed(_)
        ));
        assert!(matches!(
            failed("x", &Status::new(Code::Unavailable, "no")),
            BindError::Unreachable(_)
        ));
        assert!(matches!(
            failed("x", &Status::new(Code::InvalidArgument, "no")),
            BindError::Refused(_)
        ));
    }
}
