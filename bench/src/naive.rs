//! The `naive` scenario's step, the same on every broker: the tutorial way to
//! make a consumer idempotent, `SET key 1 NX EX` in Redis, then the POST when
//! the key was new. Each broker's naive consumer takes one message at a time,
//! runs this step, then acknowledges it the broker's way.

use anyhow::Context;

use crate::pipeline::{REDIS, SENT_HEADER};
use crate::post::Post;

/// How long a naive key is kept: a day, as tutorials do.
const KEY_TTL_SECONDS: u64 = 86_400;

/// The prefix of a run's naive keys, which the benchmark deletes after each scenario.
pub fn prefix(run_id: &str) -> String {
    format!("naive:{run_id}:")
}

pub struct Naive {
    redis: redis::aio::MultiplexedConnection,
    post: Post,
    prefix: String,
}

impl Naive {
    /// Connects to the benchmark's Redis; POSTs go to `url`.
    pub async fn connect(url: String, run_id: &str) -> anyhow::Result<Self> {
        Ok(Self {
            redis: crate::redis_admin::connection(REDIS).await?,
            post: Post::new(&url)?,
            prefix: prefix(run_id),
        })
    }

    /// Claims `key` and POSTs `body` when the key was new (with the send
    /// time `sent`, for latency); a key seen before is skipped. Returns
    /// whether it was POSTed. The caller acknowledges the message afterwards.
    pub async fn step(
        &mut self,
        key: &str,
        body: impl Into<bytes::Bytes>,
        sent: Option<String>,
    ) -> anyhow::Result<bool> {
        let fresh: Option<String> = redis::cmd("SET")
            .arg(format!("{}{key}", self.prefix))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(KEY_TTL_SECONDS)
            .query_async(&mut self.redis)
            .await
            .context("SET NX EX")?;
        if fresh.is_none() {
            return Ok(false);
        }
        let sent = sent.map(|sent| (SENT_HEADER, sent));
        if !self.post.send(body, Some(key), sent).await {
            anyhow::bail!("the app did not take a POST");
        }
        Ok(true)
    }
}
