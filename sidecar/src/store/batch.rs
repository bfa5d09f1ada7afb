//! Natural batching of store calls: the requests that arrive while a batch is
//! at the store go together in the next one. Under light load a batch holds
//! one request and waits for nothing; under load the fixed cost of a call (a
//! round trip, a script's set-up in Redis, a reply to parse) is paid once per
//! batch instead of once per message. While a batch is at the store, the next
//! one waits for its answer unless it is full: sent at once, a batch of a few
//! requests would pay a whole call's fixed cost, and with a steady trickle of
//! messages (RabbitMQ hands them over one by one) every batch was that small.
//! A batch that is already large when the store is free again shows load, and
//! waits up to a millisecond more to fill: under a RabbitMQ backlog that cut
//! script calls by about a sixth and Redis's CPU per message by as much
//! (bench/README.md), while a paced stream's batches mostly stay small and
//! do not wait.

use std::future::Future;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use super::StoreError;

/// Requests per batch at most: large enough to amortise a call, small enough
/// that one script call does not hold Redis for long.
pub const MAX_BATCH: usize = 64;

/// Batches at the store at once: full batches are sent while others are
/// answered, so under a burst the store never waits for the sidecar.
const MAX_IN_FLIGHT: usize = 4;
/// Turns given to the runtime's ready tasks before a batch goes.
const LINGER_YIELDS: usize = 2;
/// A batch that holds this many requests when it could go shows load: it
/// waits up to `LINGER` more to fill. A paced stream's batches stay below it.
const LINGER_FROM: usize = 8;
const LINGER: Duration = Duration::from_millis(1);

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
        let answered = Arc::new(Notify::new());
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
                // This batch holds one permit; any other taken is a batch at
                // the store. Until that one is answered, this one fills up.
                while batch.len() < MAX_BATCH && in_flight.available_permits() + 1 < MAX_IN_FLIGHT {
                    if !fill(&mut queue, &mut batch, answered.notified()).await {
                        break;
                    }
                }
                // Under load, a fuller batch costs Redis less per request
                // than the millisecond costs the requests.
                if batch.len() >= LINGER_FROM {
                    fill(&mut queue, &mut batch, tokio::time::sleep(LINGER)).await;
                }
                let (inputs, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
                tokio::spawn(answer(op, run(inputs), replies, permit, answered.clone()));
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

/// Adds the requests that arrive to `batch` until it is full or `until`
/// completes. False when the queue has closed.
async fn fill<T>(
    queue: &mut mpsc::UnboundedReceiver<T>,
    batch: &mut Vec<T>,
    until: impl Future<Output = ()>,
) -> bool {
    tokio::pin!(until);
    while batch.len() < MAX_BATCH {
        let room = MAX_BATCH - batch.len();
        tokio::select! {
            _ = &mut until => return true,
            received = queue.recv_many(batch, room) => {
                if received == 0 {
                    return false;
                }
            }
        }
    }
    true
}

/// Waits for a batch's outputs and hands each to its request.
async fn answer<O>(
    op: &'static str,
    outputs: impl Future<Output = Result<Vec<O>, StoreError>>,
    replies: Vec<Reply<O>>,
    permit: OwnedSemaphorePermit,
    answered: Arc<Notify>,
) {
    let expected = replies.len();
    let outputs = outputs.await;
    // The slot is free before a waiting batch hears of it.
    drop(permit);
    answered.notify_one();
    match outputs {
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

    /// A batcher whose calls wait for `gate` and count themselves.
    fn gated(calls: Arc<AtomicUsize>, gate: Arc<Notify>) -> Arc<Batcher<u32, u32>> {
        Arc::new(Batcher::spawn("gated", move |inputs: Vec<u32>| {
            let (calls, gate) = (calls.clone(), gate.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
                Ok(inputs)
            }
        }))
    }

    /// A call of `batcher` with `i`, in a task of its own.
    fn spawn_call(
        batcher: &Arc<Batcher<u32, u32>>,
        i: u32,
    ) -> tokio::task::JoinHandle<Result<u32, StoreError>> {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.call(i).await })
    }

    async fn settle_tasks() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    // Paused time: the clock moves only when a test advances it, so a batch
    // that went did not wait for its linger.
    #[tokio::test(start_paused = true)]
    async fn a_small_batch_waits_for_the_one_at_the_store_and_no_longer() {
        let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let batcher = gated(calls.clone(), gate.clone());
        let first = spawn_call(&batcher, 0);
        settle_tasks().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a lone request waited");
        let small = LINGER_FROM as u32 - 1;
        let rest: Vec<_> = (1..=small).map(|i| spawn_call(&batcher, i)).collect();
        settle_tasks().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "requests went to the store beside a batch still there"
        );
        gate.notify_one();
        settle_tasks().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the small batch waited once the store was free"
        );
        assert_eq!(first.await.expect("task").expect("answer"), 0);
        gate.notify_one();
        for (i, task) in (1..).zip(rest) {
            assert_eq!(task.await.expect("task").expect("answer"), i);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_batch_waits_a_little_to_fill() {
        let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let batcher = gated(calls.clone(), gate.clone());
        let first = spawn_call(&batcher, 0);
        settle_tasks().await;
        let large = LINGER_FROM as u32;
        let mut rest: Vec<_> = (1..=large).map(|i| spawn_call(&batcher, i)).collect();
        settle_tasks().await;
        gate.notify_one();
        settle_tasks().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a batch of {large} went without waiting to fill"
        );
        rest.extend((large + 1..=large + 5).map(|i| spawn_call(&batcher, i)));
        settle_tasks().await;
        tokio::time::advance(LINGER).await;
        settle_tasks().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the batch did not go after its linger"
        );
        gate.notify_one();
        assert_eq!(first.await.expect("task").expect("answer"), 0);
        for (i, task) in (1..).zip(rest) {
            assert_eq!(task.await.expect("task").expect("answer"), i);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the requests that came during the linger went in the same batch"
        );
    }

    #[tokio::test]
    async fn a_full_batch_goes_beside_the_one_at_the_store() {
        let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let batcher = gated(calls.clone(), gate.clone());
        let first = spawn_call(&batcher, 0);
        settle_tasks().await;
        let rest: Vec<_> = (1..=MAX_BATCH as u32)
            .map(|i| spawn_call(&batcher, i))
            .collect();
        settle_tasks().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a full batch waited");
        gate.notify_waiters();
        assert_eq!(first.await.expect("task").expect("answer"), 0);
        for (i, task) in (1..).zip(rest) {
            assert_eq!(task.await.expect("task").expect("answer"), i);
        }
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
