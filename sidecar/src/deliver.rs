//! Delivery to the application: an HTTP POST of the message body to a URL on
//! loopback, over a keep-alive connection pool.
//!
//! The application sees `Idempotency-Key` (absent for pass-through messages),
//! `Idemq-Delivery-Attempt`, the original content type, and the message's
//! headers as HTTP headers. The W3C `traceparent`/`tracestate` go on as the
//! message carries them, or, when the sidecar traces the message, name the
//! sidecar's delivery span as parent (see [`crate::traces`]).
//!
//! Redirects are not followed: a 3xx says the application did not process
//! the message (a followed 301/302 would turn the POST into a GET elsewhere,
//! whose 200 would count as processed). Nor is a delivery sent again by the
//! client: the engine decides every retry. Only a request that never left
//! (a pooled connection the application had closed) goes out on a new one.
//!
//! The client is hyper's own pooled HTTP/1 client, without reqwest's layers:
//! the URL is parsed once, and a request is the message's body and headers.
//! reqwest parsed the URL twice per request; with it the sidecar ran about
//! a fifth more instructions per message.

use std::error::Error as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::DeliveryConfig;
use crate::source::Envelope;
use crate::traces::TraceHeaders;

/// How the application answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: processed.
    Success,
    /// 500, 501, 505.., 408, 1xx/3xx: this message failed; worth another try.
    Retry(String),
    /// A timeout, a refused connection, 429, 502, 503 or 504: the application
    /// as a whole may be failing. The circuit breaker decides, across
    /// distinct messages, whether this counts as an attempt of the message.
    AppFailure {
        /// Nothing listens: the request never reached the application.
        refused: bool,
        why: String,
    },
    /// Any other 4xx: the message itself is bad; retrying cannot help.
    Poison(u16),
}

// The headers the sidecar sets, parsed once.
const DELIVERY_ATTEMPT: HeaderName = HeaderName::from_static("idemq-delivery-attempt");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Headers a message must not set: they belong to the HTTP exchange itself or
/// to idemq.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "connection",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "idempotency-key",
    "idemq-delivery-attempt",
];

/// A pooled HTTP/1 client for the application on loopback: keep-alive
/// connections, idle ones closed after 90 s, Nagle off (a request is one
/// write; waiting to coalesce only adds latency).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The client that delivers and checks readiness; `connect_timeout` bounds
/// a connection attempt.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// Sends `request` and reads the answer's body to its end (dropping it), so
/// that the connection goes back to the pool; returns the status.
pub async fn exchange(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
) -> Result<u16, hyper_util::client::legacy::Error> {
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
    Ok(status)
}

pub struct Deliverer {
    client: HttpClient,
    /// Parsed once: parsing it for every message shows in profiles.
    uri: Uri,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DelivererError {
    #[error("delivery.url is not a valid URL: {0}")]
    Url(#[from] http::uri::InvalidUri),
    #[error("delivery.url must be an http:// URL with a host: {0}")]
    NotHttp(String),
}

impl Deliverer {
    pub fn new(config: &DeliveryConfig) -> Result<Self, DelivererError> {
        let uri: Uri = config.url.parse()?;
        if uri.scheme() != Some(&http::uri::Scheme::HTTP) || uri.host().is_none() {
            return Err(DelivererError::NotHttp(config.url.clone()));
        }
        Ok(Self {
            client: http_client(config.timeout.min(Duration::from_secs(2))),
            uri,
            timeout: config.timeout,
        })
    }

    /// POSTs `message` to the application; returns its verdict and how long
    /// it took. `trace` replaces the message's own trace context.
    pub async fn deliver(
        &self,
        message: &Envelope,
        key: Option<&str>,
        attempt: u32,
        trace: Option<&TraceHeaders>,
    ) -> (Outcome, Duration) {
        let started = Instant::now();
        let mut request = Request::new(Full::new(message.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        headers(request.headers_mut(), message, key, attempt, trace);
        let outcome =
            match tokio::time::timeout(self.timeout, exchange(&self.client, request)).await {
                Ok(Ok(status)) => classify(status),
                Err(_) => Outcome::AppFailure {
                    refused: false,
                    why: "timeout".into(),
                },
                Ok(Err(e)) if e.is_connect() && !timed_out(&e) => Outcome::AppFailure {
                    refused: true,
                    why: format!("connect: {}", chain(&e)),
                },
                // A connection attempt that timed out, or a connection that broke
                // mid-request (the application crashed).
                Ok(Err(e)) => Outcome::AppFailure {
                    refused: false,
                    why: chain(&e),
                },
            };
        (outcome, started.elapsed())
    }
}

/// The request's headers: the attempt, the key, the content type, the
/// message's own headers (less the reserved ones and those that are not
/// valid HTTP, which are left out rather than failing the delivery), and
/// the trace context.
fn headers(
    into: &mut HeaderMap,
    message: &Envelope,
    key: Option<&str>,
    attempt: u32,
    trace: Option<&TraceHeaders>,
) {
    into.insert(DELIVERY_ATTEMPT, HeaderValue::from(attempt));
    if let Some(key) = key.and_then(|k| HeaderValue::from_str(k).ok()) {
        into.insert(IDEMPOTENCY_KEY, key);
    }
    if let Some(ct) = message
        .content_type
        .as_deref()
        .and_then(|ct| HeaderValue::from_str(ct).ok())
    {
        into.insert(CONTENT_TYPE, ct);
    }
    for (name, value) in &message.headers {
        // The parsed name is lower case whatever the message's case was.
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if RESERVED.contains(&name.as_str())
            || (trace.is_some() && (name == TRACEPARENT || name == TRACESTATE))
        {
            continue;
        }
        if let Ok(value) = HeaderValue::from_str(value) {
            into.append(name, value);
        }
    }
    if let Some(trace) = trace {
        if let Ok(v) = HeaderValue::from_str(&trace.traceparent) {
            into.insert(TRACEPARENT, v);
        }
        if let Some(v) = trace
            .tracestate
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            into.insert(TRACESTATE, v);
        }
    }
}

/// What caused `e`, from the nearest cause on.
fn causes(
    e: &hyper_util::client::legacy::Error,
) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(e.source(), |&s| s.source())
}

/// Whether a connection attempt timed out (the application may be stuck,
/// not absent).
fn timed_out(e: &hyper_util::client::legacy::Error) -> bool {
    causes(e).any(|s| {
        s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// An error with its causes, as one line.
fn chain(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    for cause in causes(e) {
        text.push_str(": ");
        text.push_str(&cause.to_string());
    }
    text
}

impl Outcome {
    /// The span attribute `idemq.delivery.result`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Retry(_) => "retry",
            Self::AppFailure { .. } => "app_failure",
            Self::Poison(_) => "poison",
        }
    }
}

fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Success,
        429 | 502..=504 => Outcome::AppFailure {
            refused: false,
            why: format!("status {status}"),
        },
        408 | 500..=599 => Outcome::Retry(format!("status {status}")),
        400..=499 => Outcome::Poison(status),
        // 1xx and 3xx: the app did not say it processed the message.
        other => Outcome::Retry(format!("status {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_the_message_headers_less_the_reserved_and_the_invalid() {
        let message = Envelope {
            headers: [
                ("X-Tenant", "acme"),
                ("Host", "elsewhere"),
                ("Content-Length", "5"),
                ("TraceParent", "00-from-the-message"),
                ("bad name", "dropped"),
                ("x-bad-value", "line\nbreak"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            content_type: Some("application/json".into()),
            ..Envelope::default()
        };
        let trace = TraceHeaders {
            traceparent: "00-of-the-sidecar".into(),
            tracestate: None,
        };
        let mut sent = HeaderMap::new();
        headers(&mut sent, &message, Some("order-7"), 2, Some(&trace));
        let get = |name: &str| sent.get(name).map(|v| v.to_str().expect("ASCII"));
        assert_eq!(
            get("x-tenant"),
            Some("acme"),
            "mixed case is kept as a header"
        );
        assert_eq!(get("idempotency-key"), Some("order-7"));
        assert_eq!(get("idemq-delivery-attempt"), Some("2"));
        assert_eq!(get("content-type"), Some("application/json"));
        assert_eq!(get("host"), None);
        assert_eq!(get("content-length"), None);
        assert_eq!(
            sent.get_all("traceparent").iter().collect::<Vec<_>>(),
            ["00-of-the-sidecar"],
            "the sidecar's span replaces the message's parent"
        );
        assert_eq!(get("x-bad-value"), None);
        assert_eq!(sent.len(), 5, "{sent:?}");

        let mut untraced = HeaderMap::new();
        headers(&mut untraced, &message, None, 1, None);
        assert_eq!(
            untraced
                .get("traceparent")
                .map(|v| v.to_str().expect("ASCII")),
            Some("00-from-the-message"),
            "without a span of its own the sidecar passes the message's on"
        );
        assert_eq!(untraced.get("idempotency-key"), None);
    }

    #[test]
    fn statuses_are_classified_as_the_contract_says() {
        assert_eq!(classify(200), Outcome::Success);
        assert_eq!(classify(204), Outcome::Success);
        assert!(matches!(classify(500), Outcome::Retry(_)));
        assert!(matches!(
            classify(503),
            Outcome::AppFailure { refused: false, .. }
        ));
        assert!(matches!(classify(502), Outcome::AppFailure { .. }));
        assert!(matches!(classify(504), Outcome::AppFailure { .. }));
        assert!(matches!(classify(429), Outcome::AppFailure { .. }));
        assert!(matches!(classify(501), Outcome::Retry(_)));
        assert!(matches!(classify(408), Outcome::Retry(_)));
        assert_eq!(classify(400), Outcome::Poison(400));
        assert_eq!(classify(422), Outcome::Poison(422));
        assert!(matches!(classify(302), Outcome::Retry(_)));
    }

    /// An application on loopback that answers `/in` with a redirect to
    /// `/elsewhere`, and counts the requests that reach `/elsewhere`.
    async fn redirecting_app() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        let elsewhere = std::sync::Arc::new(AtomicUsize::new(0));
        let reached = elsewhere.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let reached = reached.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    while let Ok(n @ 1..) = socket.read(&mut buf).await {
                        let head = String::from_utf8_lossy(&buf[..n]);
                        let answer = if head.contains(" /elsewhere ") {
                            reached.fetch_add(1, Ordering::SeqCst);
                            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            "HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n"
                        };
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, elsewhere)
    }

    #[tokio::test]
    async fn a_redirect_is_a_failed_delivery_and_is_not_followed() {
        let (url, elsewhere) = redirecting_app().await;
        let deliverer = Deliverer::new(&crate::config::DeliveryConfig::new(url)).unwrap();
        let message = Envelope {
            body: bytes::Bytes::from_static(b"{}"),
            ..Envelope::default()
        };
        let (outcome, _) = deliverer.deliver(&message, Some("k-1"), 1, None).await;
        assert_eq!(outcome, Outcome::Retry("status 302".into()));
        assert_eq!(
            elsewhere.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the redirect was followed"
        );
    }

    /// An application on loopback that reads a request and answers `answer`
    /// on the same connection, request after request (or never, when
    /// `answer` is `None`); counts the connections it accepted.
    async fn app(
        answer: Option<String>,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        let connections = std::sync::Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        let answer = answer.map(std::sync::Arc::<str>::from);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    while let Ok(1..) = socket.read(&mut buf).await {
                        let Some(answer) = &answer else { continue };
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, connections)
    }

    fn message() -> Envelope {
        Envelope {
            body: bytes::Bytes::from_static(b"{}"),
            ..Envelope::default()
        }
    }

    /// The answer's body is read to its end, so the connection goes back to
    /// the pool: a body left unread would cost a new connection per message.
    #[tokio::test]
    async fn an_answer_with_a_body_keeps_its_connection_for_the_next_delivery() {
        // Larger than one read: a body dropped unread leaves part of it on the
        // connection, which then cannot carry another request.
        let body = "x".repeat(256 * 1024);
        let (url, connections) = app(Some(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )))
        .await;
        let deliverer = Deliverer::new(&DeliveryConfig::new(url)).unwrap();
        for attempt in 1..=10 {
            let (outcome, _) = deliverer
                .deliver(&message(), Some("k-1"), attempt, None)
                .await;
            assert_eq!(outcome, Outcome::Success);
        }
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_refused_connection() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let deliverer =
            Deliverer::new(&DeliveryConfig::new(format!("http://127.0.0.1:{port}/in"))).unwrap();
        let (outcome, _) = deliverer.deliver(&message(), None, 1, None).await;
        assert!(
            matches!(&outcome, Outcome::AppFailure { refused: true, why } if why.starts_with("connect: ")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn an_application_that_never_answers_times_out() {
        let (url, _) = app(None).await;
        let mut config = DeliveryConfig::new(url);
        config.timeout = Duration::from_millis(300);
        let deliverer = Deliverer::new(&config).unwrap();
        let (outcome, took) = deliverer.deliver(&message(), None, 1, None).await;
        assert_eq!(
            outcome,
            Outcome::AppFailure {
                refused: false,
                why: "timeout".into()
            }
        );
        assert!(took >= Duration::from_millis(300), "{took:?}");
    }

    #[test]
    fn a_url_that_is_not_plain_http_is_refused() {
        for url in ["https://127.0.0.1:8080/in", "/in", "127.0.0.1:8080"] {
            assert!(Deliverer::new(&DeliveryConfig::new(url)).is_err(), "{url}");
        }
    }
}
