//! OpenTelemetry traces of each message through the sidecar, exported over
//! OTLP/HTTP (protobuf) when an endpoint is configured.
//!
//! A message gets one span, `process <queue>` (kind consumer), whose parent is
//! the W3C trace context the message carries (`traceparent`/`tracestate`
//! headers, whatever the broker), or which starts a new trace
//! (`traces.newTraces`). Its children are the steps: `claim` (the key store's
//! answer), `deliver` (one per HTTP attempt; the application's request carries
//! a `traceparent` naming this span as parent), `complete` or `release` (the
//! claim's end in the store) and `settle` (what the broker is told). The dedup
//! outcome is an attribute; the key's value only with `traces.recordKey`.
//!
//! Without an endpoint [`Tracer::off`] is used: every call below is a check of
//! an `Option`, no span is built and the message's own headers go to the
//! application unchanged.
//!
//! Spans are exported in batches by the SDK's batch processor on its own
//! thread, with a blocking HTTP client, so exporting never runs on the
//! runtime's threads; [`Tracer::shutdown`] flushes what is left.

use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::TracesConfig;
use crate::secrets::Env;
use crate::source::{Envelope, Verdict};

const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";

#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("{var}: {url} is not an http:// URL (https is not built in)")]
    NotHttp { var: &'static str, url: String },
    #[error("build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Where a message was consumed from: the message span's attributes.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// `messaging.system`: `rabbitmq`, `kafka`, `nats`, `gcp_pubsub`.
    pub system: &'static str,
    /// `messaging.destination.name`: the queue, topic or subject.
    pub destination: &'a str,
}

/// Starts message spans; cheap to clone. Off unless an endpoint is configured.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    new_traces: bool,
    record_key: bool,
}

/// The OTLP/HTTP URL spans go to: `traces.endpoint` + `/v1/traces`, else
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is, else
/// `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`; None: tracing is off (also
/// with `OTEL_SDK_DISABLED=true`).
pub fn endpoint(config: &TracesConfig, env: &dyn Env) -> Result<Option<String>, TracesError> {
    let set = |name| env.var(name).filter(|v| !v.trim().is_empty());
    if set(SDK_DISABLED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let signal = |base: &str| format!("{}/v1/traces", base.trim_end_matches('/'));
    let (var, url) = if let Some(base) = &config.endpoint {
        ("traces.endpoint", signal(base))
    } else if let Some(url) = set(TRACES_ENDPOINT) {
        (TRACES_ENDPOINT, url)
    } else if let Some(base) = set(ENDPOINT) {
        (ENDPOINT, signal(&base))
    } else {
        return Ok(None);
    };
    if !url.starts_with("http://") {
        return Err(TracesError::NotHttp { var, url });
    }
    Ok(Some(url))
}

impl Tracer {
    /// Traces nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// A tracer exporting to the configured endpoint, or [`Tracer::off`]
    /// when none is configured. `consumer` becomes the resource attribute
    /// `idemq.consumer`.
    pub fn start(
        config: &TracesConfig,
        consumer: &str,
        env: &dyn Env,
    ) -> Result<Self, TracesError> {
        let Some(endpoint) = endpoint(config, env)? else {
            return Ok(Self::off());
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|source| TracesError::Exporter {
                endpoint: endpoint.clone(),
                source,
            })?;
        // The resource builder reads OTEL_SERVICE_NAME and
        // OTEL_RESOURCE_ATTRIBUTES itself; idemq names the service only when
        // the environment does not.
        let mut resource = Resource::builder()
            .with_attribute(KeyValue::new("idemq.consumer", consumer.to_string()));
        if env.var(SERVICE_NAME).is_none_or(|v| v.is_empty()) {
            resource = resource.with_service_name("idemq-sidecar");
        }
        // The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based,
        // always on), the batch settings from OTEL_BSP_*.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("idemq-sidecar");
        tracing::info!(%endpoint, new_traces = config.new_traces, record_key = config.record_key, "exporting traces over OTLP/HTTP");
        Ok(Self {
            inner: Some(Arc::new(Inner {
                provider,
                tracer,
                propagator: TraceContextPropagator::new(),
                new_traces: config.new_traces,
                record_key: config.record_key,
            })),
        })
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts the span of one message, a child of the trace it carries.
    pub fn message(&self, envelope: &Envelope, origin: Origin<'_>) -> MessageSpan {
        let Some(inner) = &self.inner else {
            return MessageSpan::default();
        };
        let parent = inner
            .propagator
            .extract_with_context(&Context::new(), &Headers(&envelope.headers));
        if !parent.span().span_context().is_valid() && !inner.new_traces {
            return MessageSpan::default();
        }
        let span = inner
            .tracer
            .span_builder(format!("process {}", origin.destination))
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", origin.system),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.name", origin.destination.to_string()),
                KeyValue::new("idemq.redelivered", envelope.redelivered),
                KeyValue::new("messaging.message.body.size", envelope.body.len() as i64),
            ])
            .start_with_context(&inner.tracer, &parent);
        MessageSpan {
            active: Some(Active {
                inner: inner.clone(),
                cx: parent.with_span(span),
            }),
        }
    }

    /// Exports what is still batched and stops the exporter's thread.
    pub async fn shutdown(&self) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        let done = tokio::task::spawn_blocking(move || inner.provider.shutdown()).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "exporting the last spans failed"),
            Err(e) => tracing::warn!(error = %e, "the span exporter's shutdown panicked"),
        }
    }
}

/// The span of one message and the parent of its steps; ends when dropped.
/// Without tracing (or for a message not traced), every method does nothing.
#[derive(Default)]
pub struct MessageSpan {
    active: Option<Active>,
}

struct Active {
    inner: Arc<Inner>,
    /// Holds the message span.
    cx: Context,
}

impl MessageSpan {
    /// Records the key's value, if `traces.recordKey` asks for it.
    pub fn key(&self, key: &str) {
        if let Some(a) = &self.active {
            if a.inner.record_key {
                a.cx.span()
                    .set_attribute(KeyValue::new("idemq.key", key.to_string()));
            }
        }
    }

    /// A step of this message: a child span named `name`.
    pub fn step(&self, name: &'static str) -> Step {
        self.child(name, SpanKind::Internal)
    }

    /// An HTTP delivery to the application (kind client); its
    /// [`Step::trace_headers`] go in the request.
    pub fn delivery(&self, attempt: u32) -> Step {
        let mut step = self.child("deliver", SpanKind::Client);
        step.set("idemq.attempt", i64::from(attempt));
        step.set("http.request.method", "POST");
        step
    }

    /// Records the message's outcome on its span (`idemq.outcome`) and starts
    /// the `settle` step, which covers telling the broker.
    pub fn settlement(&self, verdict: &Verdict) -> Step {
        let Some(a) = &self.active else {
            return Step::default();
        };
        let span = a.cx.span();
        span.set_attribute(KeyValue::new("idemq.outcome", outcome(verdict)));
        if let Verdict::DeadLetter { reason, attempts } = verdict {
            span.set_attribute(KeyValue::new("idemq.dead_letter.reason", reason.as_str()));
            span.set_attribute(KeyValue::new("idemq.attempts", i64::from(*attempts)));
        }
        let mut step = self.step("settle");
        step.set("idemq.settlement", settlement(verdict));
        step
    }

    fn child(&self, name: &'static str, kind: SpanKind) -> Step {
        let Some(a) = &self.active else {
            return Step::default();
        };
        let span = a
            .inner
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&a.inner.tracer, &a.cx);
        Step {
            span: Some((span, a.inner.clone())),
        }
    }
}

/// One step's span; ends when dropped.
#[derive(Default)]
pub struct Step {
    span: Option<(opentelemetry_sdk::trace::Span, Arc<Inner>)>,
}

/// The trace context a delivery passes to the application: this step's span
/// is the parent of whatever the application does with the message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl Step {
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some((span, _)) = &mut self.span {
            span.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the step failed, saying why.
    pub fn fail(&mut self, why: impl std::fmt::Display) {
        if let Some((span, _)) = &mut self.span {
            span.set_status(Status::error(why.to_string()));
        }
    }

    /// `traceparent` (and `tracestate`) naming this step's span as parent.
    pub fn trace_headers(&self) -> Option<TraceHeaders> {
        let (span, inner) = self.span.as_ref()?;
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        let mut headers = TraceHeaders::default();
        inner.propagator.inject_context(&cx, &mut headers);
        Some(headers).filter(|h| !h.traceparent.is_empty())
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = value,
            "tracestate" if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// A message's headers, read by the propagator (names compare without case).
struct Headers<'a>(&'a [(String, String)]);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// `idemq.outcome`: what became of the message.
fn outcome(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Ack => "delivered",
        Verdict::Duplicate => "duplicate",
        Verdict::Requeue { .. } => "requeued",
        Verdict::DeadLetter { .. } => "dead_lettered",
        Verdict::StoreUnavailable => "store_unavailable",
        Verdict::AppUnavailable => "app_unavailable",
    }
}

/// `idemq.settlement`: what the broker is told.
fn settlement(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Ack | Verdict::Duplicate => "ack",
        Verdict::DeadLetter { .. } => "dead_letter",
        Verdict::Requeue { .. } | Verdict::StoreUnavailable | Verdict::AppUnavailable => "requeue",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_endpoint_comes_from_the_config_then_the_standard_variables() {
        let none = TracesConfig::default();
        assert_eq!(endpoint(&none, &env(&[])).expect("ok"), None, "off");
        let configured = TracesConfig {
            endpoint: Some("http://collector:4318/".into()),
            ..TracesConfig::default()
        };
        let both = env(&[(ENDPOINT, "http://other:4318")]);
        assert_eq!(
            endpoint(&configured, &both).expect("ok").as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            endpoint(&none, &both).expect("ok").as_deref(),
            Some("http://other:4318/v1/traces"),
            "the base endpoint gets the signal's path"
        );
        let signal = env(&[
            (ENDPOINT, "http://other:4318"),
            (TRACES_ENDPOINT, "http://traces:4318/custom"),
        ]);
        assert_eq!(
            endpoint(&none, &signal).expect("ok").as_deref(),
            Some("http://traces:4318/custom"),
            "the signal's endpoint is used as it is"
        );
        let disabled = env(&[(ENDPOINT, "http://other:4318"), (SDK_DISABLED, "true")]);
        assert_eq!(endpoint(&none, &disabled).expect("ok"), None);
        let https = env(&[(ENDPOINT, "https://collector:4318")]);
        assert!(matches!(
            endpoint(&none, &https),
            Err(TracesError::NotHttp { var: ENDPOINT, .. })
        ));
    }

    #[test]
    fn without_an_endpoint_nothing_is_traced_and_no_header_is_made() {
        let tracer =
            Tracer::start(&TracesConfig::default(), "shop.orders", &env(&[])).expect("off is fine");
        assert!(!tracer.is_on());
        let envelope = Envelope {
            headers: vec![(
                "traceparent".into(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            )],
            ..Envelope::default()
        };
        let origin = Origin {
            system: "rabbitmq",
            destination: "orders",
        };
        let span = tracer.message(&envelope, origin);
        assert!(span.active.is_none());
        assert_eq!(span.delivery(1).trace_headers(), None);
    }
}
