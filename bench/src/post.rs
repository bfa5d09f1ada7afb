//! The baselines' POST to the app: idemq's own delivery (its HTTP client,
//! request and headers), so that raw and naive differ from idemq only by
//! what they leave out.

use std::sync::Arc;

use bytes::Bytes;
use idemq_sidecar::config::DeliveryConfig;
use idemq_sidecar::deliver::{Deliverer, Outcome};
use idemq_sidecar::source::Envelope;

#[derive(Clone)]
pub struct Post(Arc<Deliverer>);

impl Post {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Ok(Self(Arc::new(Deliverer::new(&DeliveryConfig::new(
            url.to_string(),
        ))?)))
    }

    /// POSTs `body` with the header `sent` (the send time, for latency)
    /// and, for naive, the idempotency key; whether the app took it.
    pub async fn send(
        &self,
        body: impl Into<Bytes>,
        key: Option<&str>,
        sent: Option<(&str, String)>,
    ) -> bool {
        let message = Envelope {
            body: body.into(),
            headers: sent
                .map(|(name, value)| vec![(name.to_string(), value)])
                .unwrap_or_default(),
            ..Envelope::default()
        };
        let (outcome, _) = self.0.deliver(&message, key, 1, None).await;
        outcome == Outcome::Success
    }
}
