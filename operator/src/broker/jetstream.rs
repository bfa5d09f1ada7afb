//! NATS JetStream bindings: the stream to consume must exist, the durable
//! pull consumer is created when missing, and the dead-letter stream when
//! the spec asks for one.
//!
//! The stream belongs to its producers, so it is never created here: a typo
//! in `stream` shows as `StreamNotFound` instead of becoming a new, empty
//! stream. A consumer that exists with other settings than the spec's (made
//! by hand, by another tool, or by an earlier spec) is reported as
//! `ConsumerMismatch` and never changed: updating it would change what
//! someone else consumes. The consumer is created with the settings the
//! sidecar would create it with ([`consumer_config`], the sidecar's own
//! function), so whichever of the two comes first makes the same consumer.
//!
//! One client per URL and credentials, pooled like every broker's clients
//! ([`Pool`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectErrorKind};
use idemq_sidecar::config::JetStreamConfig;
use idemq_sidecar::source::jetstream::consumer_config;

use super::pool::{Connector, Pool, PoolConfig};
use super::BindError;
use crate::crd::{IdempotentConsumer, JetStreamBinding, NatsAuth};
use crate::labels;
use crate::render::config::jetstream_config;

/// How long a connect, or one JetStream API request, may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What to check and create for one JetStream consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The stream, which must exist.
    pub stream: String,
    /// The durable pull consumer, created when missing.
    pub consumer: String,
    pub filter_subjects: Vec<String>,
    pub max_ack_pending: u32,
    pub ack_wait: Duration,
    pub max_deliver: Option<u32>,
    pub dead_letter_subject: String,
    /// A stream capturing `dead_letter_subject`, created when missing.
    pub dead_letter_stream: Option<String>,
}

impl Plan {
    /// `None` when the spec's durations do not parse (validation refuses
    /// such a spec before anything is bound).
    pub fn of(ic: &IdempotentConsumer, js: &JetStreamBinding) -> Option<Self> {
        let config = jetstream_config(ic, js).ok()?;
        Some(Self {
            stream: config.stream,
            consumer: config.consumer,
            filter_subjects: config.filter_subjects,
            max_ack_pending: config.max_ack_pending,
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
            dead_letter_subject: config.dead_letter_subject,
            dead_letter_stream: js.dead_letter_stream.clone(),
        })
    }

    /// The sidecar's section with these settings, for [`consumer_config`].
    fn sidecar(&self) -> JetStreamConfig {
        JetStreamConfig {
            url: None,
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            filter_subjects: self.filter_subjects.clone(),
            max_ack_pending: self.max_ack_pending,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            dead_letter_subject: self.dead_letter_subject.clone(),
        }
    }

    /// A sentence for the status: what is there once bound.
    pub fn describe(&self) -> String {
        let dead = match &self.dead_letter_stream {
            Some(dls) => format!(
                "; dead letters go to {} in stream {dls}",
                self.dead_letter_subject
            ),
            None => format!("; dead letters go to {}", self.dead_letter_subject),
        };
        format!(
            "stream {} exists and durable consumer {} is present{dead}",
            self.stream, self.consumer
        )
    }
}

/// How the client authenticates, from the connection Secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// The URL alone.
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// A `.creds` file's content.
    Creds(String),
}

/// The server URL and credentials from the connection Secret. Secret: no
/// `Debug`, and [`Connection::redact`] takes the secrets out of any text the
/// client or the server wrote.
#[derive(Clone, PartialEq, Eq)]
pub struct Connection {
    pub url: String,
    pub auth: Auth,
}

impl Connection {
    /// Reads what `js` needs through `value` (a Secret key's value, or
    /// `Err(key)` when the Secret lacks it).
    pub fn from_secret(
        js: &JetStreamBinding,
        value: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Self, String> {
        let auth = match js.auth {
            NatsAuth::None => Auth::None,
            NatsAuth::UserPassword => Auth::UserPassword {
                user: value(labels::NATS_USERNAME_KEY)?,
                password: value(labels::NATS_PASSWORD_KEY)?,
            },
            NatsAuth::Token => Auth::Token(value(labels::NATS_TOKEN_KEY)?),
            NatsAuth::Creds => Auth::Creds(value(labels::NATS_CREDS_KEY)?),
        };
        Ok(Self {
            url: value(&js.connection_secret_ref.key)?,
            auth,
        })
    }

    /// Every field, so that changed credentials get their own client.
    pub fn identity(&self) -> Vec<u8> {
        let auth = match &self.auth {
            Auth::None => vec!["none"],
            Auth::UserPassword { user, password } => vec!["user", user, password],
            Auth::Token(token) => vec!["token", token],
            Auth::Creds(creds) => vec!["creds", creds],
        };
        let mut fields = vec![self.url.as_str()];
        fields.extend(auth);
        fields.join("\u{0}").into_bytes()
    }

    /// `text` without the password, token or the URL's credentials.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.replace(&self.url, &idemq_sidecar::secrets::redact(&self.url));
        let hidden = match &self.auth {
            Auth::UserPassword { password, .. } => Some(password),
            Auth::Token(token) => Some(token),
            Auth::Creds(_) | Auth::None => None,
        };
        if let Some(secret) = hidden.filter(|s| !s.is_empty()) {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }

    async fn connect(&self) -> Result<Client, BindError> {
        let mut options = async_nats::ConnectOptions::new()
            .name("idemq-operator")
            .connection_timeout(TIMEOUT)
            .request_timeout(Some(TIMEOUT));
        options = match &self.auth {
            Auth::None => options,
            Auth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::Token(token) => options.token(token.clone()),
            Auth::Creds(creds) => options.credentials(creds).map_err(|e| {
                BindError::AuthenticationFailed(format!(
                    "the Secret's key {} is not a NATS .creds file: {e}",
                    labels::NATS_CREDS_KEY
                ))
            })?,
        };
        let connected = tokio::time::timeout(TIMEOUT * 2, options.connect(self.url.as_str())).await;
        match connected {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => {
                let text = self.redact(&e.to_string());
                Err(match e.kind() {
                    ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                        BindError::AuthenticationFailed(text)
                    }
                    ConnectErrorKind::ServerParse => {
                        BindError::Refused(format!("the Secret's URL is not a NATS URL: {text}"))
                    }
                    _ => BindError::Unreachable(text),
                })
            }
            Err(_) => Err(BindError::Unreachable(format!(
                "no answer within {:?}",
                TIMEOUT * 2
            ))),
        }
    }
}

/// Opens NATS clients for the [`Pool`].
pub struct NatsConnector;

#[async_trait::async_trait]
impl Connector for NatsConnector {
    type Endpoint = Connection;
    type Client = Client;

    fn identity(connection: &Connection) -> Vec<u8> {
        connection.identity()
    }

    async fn connect(&self, connection: &Connection) -> Result<Client, BindError> {
        connection.connect().await
    }

    /// The client reconnects by itself; one that is not connected now is
    /// replaced, so that a request is not left waiting on it.
    fn usable(&self, client: &Client) -> bool {
        client.connection_state() == async_nats::connection::State::Connected
    }

    async fn close(&self, client: &Client) {
        let _ = tokio::time::timeout(TIMEOUT, client.drain()).await;
    }
}

/// The JetStream binder: one pooled client per URL and credentials.
pub struct JetStream {
    pool: Arc<Pool<NatsConnector>>,
}

impl Default for JetStream {
    fn default() -> Self {
        Self::new(PoolConfig::default())
    }
}

/// A request that failed on the way (no JetStream, no answer, no permission).
fn request_failed(what: &str, e: impl std::fmt::Display) -> BindError {
    BindError::Unreachable(format!(
        "{what}: {e} (is JetStream enabled, and may the user use its API?)"
    ))
}

impl JetStream {
    pub fn new(pool: PoolConfig) -> Self {
        Self {
            pool: Pool::new(NatsConnector, pool),
        }
    }

    /// Clients open now.
    pub fn clients(&self) -> usize {
        self.pool.open()
    }

    /// Checks the stream, creates the dead-letter stream and the consumer
    /// when missing, and reports a consumer that exists with other settings.
    pub async fn bind(&self, connection: &Connection, plan: &Plan) -> Result<(), BindError> {
        let client = self.pool.get(connection).await?;
        let js = jetstream::new((*client).clone());
        let bound = tokio::time::timeout(TIMEOUT * 4, bind(&js, plan)).await;
        match bound {
            Ok(result) => result.map_err(|e| redacted(connection, e)),
            Err(_) => Err(BindError::Unreachable(format!(
                "JetStream did not answer within {:?}",
                TIMEOUT * 4
            ))),
        }
    }
}

/// `e` without any secret of `connection` in its text.
fn redacted(connection: &Connection, e: BindError) -> BindError {
    match e {
        BindError::Unreachable(t) => BindError::Unreachable(connection.redact(&t)),
        BindError::AuthenticationFailed(t) => {
            BindError::AuthenticationFailed(connection.redact(&t))
        }
        BindError::Refused(t) => BindError::Refused(connection.redact(&t)),
        other => other,
    }
}

async fn bind(js: &jetstream::Context, plan: &Plan) -> Result<(), BindError> {
    let stream = match js.get_stream(&plan.stream).await {
        Ok(stream) => stream,
        Err(e) => {
            return Err(match e.kind() {
                GetStreamErrorKind::JetStream(err)
                    if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    BindError::StreamNotFound(plan.stream.clone())
                }
                GetStreamErrorKind::JetStream(err) => {
                    BindError::Refused(format!("stream {}: {err}", plan.stream))
                }
                _ => request_failed(&format!("look up stream {}", plan.stream), e),
            })
        }
    };
    if let Some(name) = &plan.dead_letter_stream {
        dead_letter_stream(js, name, &plan.dead_letter_subject).await?;
    }
    let wanted = consumer_config(&plan.sidecar());
    match stream.consumer_info(&plan.consumer).await {
        Ok(info) => {
            let differences = differences(&wanted, &info.config);
            if differences.is_empty() {
                Ok(())
            } else {
                Err(BindError::ConsumerMismatch(format!(
                    "consumer {} on stream {} exists with {}; idemq does not change a consumer it did not create: delete it (idemq creates it again; what it had delivered and not acknowledged comes again and is deduplicated) or align the spec",
                    plan.consumer,
                    plan.stream,
                    differences.join(", ")
                )))
            }
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => stream
            .create_consumer(wanted)
            .await
            .map(|_| ())
            .map_err(|e| {
                BindError::Refused(format!(
                    "create consumer {} on stream {}: {e}",
                    plan.consumer, plan.stream
                ))
            }),
        Err(e) => Err(request_failed(
            &format!("look up consumer {}", plan.consumer),
            e,
        )),
    }
}

/// Creates the dead-letter stream, capturing `subject`, when it is missing.
async fn dead_letter_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
) -> Result<(), BindError> {
    match js.get_stream(name).await {
        Ok(_) => Ok(()),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(err)
                if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                js.create_stream(stream::Config {
                    name: name.to_string(),
                    subjects: vec![subject.to_string()],
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| {
                    BindError::Refused(format!(
                        "create dead-letter stream {name} for subject {subject}: {e}"
                    ))
                })
            }
            _ => Err(request_failed(
                &format!("look up dead-letter stream {name}"),
                e,
            )),
        },
    }
}

/// The settings in which `existing` differs from `wanted`, each as
/// "<setting> <existing> (the spec: <wanted>)"; empty when it matches.
fn differences(
    wanted: &jetstream::consumer::pull::Config,
    existing: &jetstream::consumer::Config,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |setting: &str, has: String, wants: String| {
        if has != wants {
            out.push(format!("{setting} {has} (the spec: {wants})"));
        }
    };
    differ(
        "type",
        if existing.deliver_subject.is_some() {
            "push".into()
        } else {
            "pull".into()
        },
        "pull".into(),
    );
    differ(
        "ackPolicy",
        format!("{:?}", existing.ack_policy).to_lowercase(),
        format!("{:?}", AckPolicy::Explicit).to_lowercase(),
    );
    differ(
        "ackWait",
        humantime::format_duration(existing.ack_wait).to_string(),
        humantime::format_duration(wanted.ack_wait).to_string(),
    );
    differ(
        "maxAckPending",
        existing.max_ack_pending.to_string(),
        wanted.max_ack_pending.to_string(),
    );
    let deliver = |n: i64| {
        if n > 0 {
            n.to_string()
        } else {
            "unlimited".into()
        }
    };
    differ(
        "maxDeliver",
        deliver(existing.max_deliver),
        deliver(wanted.max_deliver),
    );
    let subjects = |one: &String, many: &Vec<String>| {
        let mut all: Vec<&str> = many.iter().map(String::as_str).collect();
        if !one.is_empty() {
            all.push(one);
        }
        all.sort_unstable();
        if all.is_empty() {
            "all".to_string()
        } else {
            format!("[{}]", all.join(", "))
        }
    };
    differ(
        "filterSubjects",
        subjects(&existing.filter_subject, &existing.filter_subjects),
        subjects(&wanted.filter_subject, &wanted.filter_subjects),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::sample;
    use async_nats::jetstream::consumer::IntoConsumerConfig;

    fn binding(ic: &IdempotentConsumer) -> &JetStreamBinding {
        ic.spec.broker.jetstream.as_ref().expect("jetstream")
    }

    #[test]
    fn the_plan_takes_the_spec_and_defaults_the_consumer_from_namespace_and_name() {
        let mut ic = sample::jetstream_policy();
        let plan = Plan::of(&ic, binding(&ic)).expect("plan");
        assert_eq!(
            (plan.stream.as_str(), plan.consumer.as_str()),
            ("ORDERS", "shop_orders")
        );
        assert_eq!(plan.filter_subjects, ["orders.created"]);
        assert_eq!(
            (plan.max_ack_pending, plan.ack_wait, plan.max_deliver),
            (50, Duration::from_secs(20), Some(10))
        );
        assert_eq!(plan.dead_letter_stream.as_deref(), Some("ORDERS-DEAD"));
        assert_eq!(
            plan.describe(),
            "stream ORDERS exists and durable consumer shop_orders is present; dead letters go to orders.dead in stream ORDERS-DEAD"
        );
        ic.metadata.name = Some("orders.v2".into());
        ic.spec.broker.jetstream.as_mut().expect("js").consumer = None;
        let plan = Plan::of(&ic, binding(&ic)).expect("plan");
        assert_eq!(plan.consumer, "shop_orders_v2", "NATS names take no dots");
    }

    #[test]
    fn a_consumer_with_other_settings_is_described_setting_by_setting() {
        let ic = sample::jetstream_policy();
        let plan = Plan::of(&ic, binding(&ic)).expect("plan");
        let wanted = consumer_config(&plan.sidecar());
        let same = wanted.clone().into_consumer_config();
        assert!(differences(&wanted, &same).is_empty(), "the same settings");
        let mut other = same.clone();
        other.ack_wait = Duration::from_secs(30);
        other.max_deliver = -1;
        other.filter_subject = String::new();
        assert_eq!(
            differences(&wanted, &other),
            [
                "ackWait 30s (the spec: 20s)",
                "maxDeliver unlimited (the spec: 10)",
                "filterSubjects all (the spec: [orders.created])"
            ]
        );
    }

    #[test]
    fn the_connection_takes_the_keys_its_auth_needs_and_shows_no_secret() {
        let mut ic = sample::jetstream_policy();
        let secret = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
                    .ok_or_else(|| key.to_string())
            }
        };
        let only_url = secret(&[("url", "nats://n:4222")]);
        assert_eq!(
            Connection::from_secret(binding(&ic), only_url).err(),
            Some("username".to_string())
        );
        let full = secret(&[
            ("url", "nats://n:4222"),
            ("username", "billing"),
            ("password", "s3cret"),
        ]);
        let c = Connection::from_secret(binding(&ic), full).expect("complete");
        assert_eq!(
            c.redact("user billing, password s3cret at nats://n:4222"),
            "user billing, password *** at nats://n:4222"
        );
        ic.spec.broker.jetstream.as_mut().expect("js").auth = NatsAuth::Token;
        let token = secret(&[("url", "nats://n:4222"), ("token", "t0k")]);
        let t = Connection::from_secret(binding(&ic), token).expect("token");
        assert!(t.auth == Auth::Token("t0k".into()));
        assert_ne!(t.identity(), c.identity());
    }
}
