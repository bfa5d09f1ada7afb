//! Natural batching of store calls: the requests that arrive while a batch is
//! at the store go together in the next one. Under light load a batch holds
//! one request and waits for nothing; under load the fixed cost of a call (a
//! round trip, a script's set-up in Redis, a reply to parse) is paid once per
//! batch instead of once per message.

use std::future::Future;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::StoreError;

/// Requests per batch at most: large enough to amortise a call, small enough
/// that one script call does not hold Redis for long.
pub const MAX_BATCH: usize = 64;

/// Batches at the store at once: a batch is assembled while others are
/// answered, so the store never waits for the sidecar.
const MAX_IN_FLIGHT: usize = 4;
/// Turns given to the runtime's ready tasks before a batch goes.
const LINGER_YIELDS: usize = 2;

type Reply<O> = oneshot::Sender<Result<O, StoreError>>;

/// Hands requests to a task that runs them in batches.
pub struct Batcher<I, O> {
    op: &'static str,
    requests: mpsc::UnboundedSender<(I, Reply<O>)>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Spawns the batching task (on the current tokio runtime). `run` takes a
    /// batch and answers one output per input, in order; its error answers
    /// every request of the batch. The task ends when the batcher is dropped.
    pub fn spawn<F, Fut>(op: &'static str, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, StoreError>> + Send + 'static,
    {
        let (requests, mut queue) = mpsc::unbounded_channel::<(I, Reply<O>)>();
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            loop {
                // While every slot is taken, requests queue up for the next batch.
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
                    return;
                }
                // Let every task that is ready to run now take its turn first:
                // the deliveries that are about to ask join this batch, at no
                // cost in latency (no timer, only the tasks already runnable).
                for _ in 0..LINGER_YIELDS {
                    if batch.len() >= MAX_BATCH {
                        break;
                    }
                    tokio::task::yield_now().await;
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                }
                let (inputs, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
                tokio::spawn(answer(op, run(inputs), replies, permit));
            }
        });
        Self { op, requests }
    }

    /// Runs `input` in the next batch and waits for its answer.
    pub async fn call(&self, input: I) -> Result<O, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Protocol {
            op: self.op,
            detail: "the batching task has stopped".into(),
        };
        self.requests.send((input, reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Waits for a batch's outputs and hands each to its request.
async fn answer<O>(
    op: &'static str,
    outputs: impl Future<Output = Result<Vec<O>, StoreError>>,
    replies: Vec<Reply<O>>,
    _permit: OwnedSemaphorePermit,
) {
    let expected = replies.len();
    match outputs.await {
        Ok(outputs) if outputs.len() == expected => {
            for (reply, output) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(output));
            }
        }
        Ok(outputs) => {
            let detail = format!("{} answers to {expected} requests", outputs.len());
            for reply in replies {
                let _ = reply.send(Err(StoreError::Protocol {
                    op,
                    detail: detail.clone(),
                }));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn concurrent_requests_share_batches_and_get_their_own_answers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let batcher = Arc::new(Batcher::spawn("double", {
            let calls = calls.clone();
            move |inputs: Vec<u32>| {
                calls.fetch_add(1, Ordering::Relaxed);
                async move {
                    tokio::task::yield_now().await;
                    Ok(inputs.into_iter().map(|i| i * 2).collect())
                }
            }
        }));
        let answers = futures::future::join_all((0..500u32).map(|i| {
            let batcher = batcher.clone();
            async move { batcher.call(i).await.expect("answer") }
        }))
        .await;
        assert_eq!(answers, (0..500u32).map(|i| i * 2).collect::<Vec<_>>());
        let calls = calls.load(Ordering::Relaxed);
        assert!(
            (500 / MAX_BATCH..500).contains(&calls),
            "500 requests took {calls} calls"
        );
    }

    #[tokio::test]
    async fn an_error_answers_every_request_of_its_batch() {
        let batcher = Batcher::spawn("fail", |_inputs: Vec<u32>| async {
            Err::<Vec<u32>, _>(StoreError::Protocol {
                op: "fail",
                detail: "down".into(),
            })
        });
        assert!(batcher.call(1).await.is_err());
        assert!(batcher.call(2).await.is_err());
    }
}
