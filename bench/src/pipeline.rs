//! The pipeline benchmark: what deduplication costs next to what users would
//! do without idemq, on the same messages, in one run.
//!
//! Scenarios, each on its own fresh queue (topic, stream, subscription or
//! endpoint):
//! - `raw`: the broker's client → HTTP POST → ack, no dedup, with idemq's
//!   prefetch, concurrency and ack or commit strategy (the honest baseline);
//! - `idemq`: the sidecar binary with the Redis store;
//! - `naive`: the tutorial consumer: one message at a time, the naive step
//!   (`naive.rs`: `SET key 1 NX EX`, POST), ack;
//! - `idemq-memory`: the sidecar binary with the in-memory store.
//!
//! Each broker's queues and baselines are in a module of its own:
//! `--broker rabbitmq` (the default) on a queue of the RabbitMQ on
//! 127.0.0.1:5672 (see `rabbitmq.rs`), `--broker kafka` on a topic of the
//! Kafka broker on 127.0.0.1:9092 (see `kafka.rs`),
//! `--broker jetstream` on a stream of the NATS server on 127.0.0.1:4222
//! (see `jetstream.rs`), `--broker mqtt` on a Mosquitto of its own per
//! scenario (see `mqtt.rs`), `--broker pubsub` on a subscription of the
//! Pub/Sub emulator on 127.0.0.1:8085 (see `pubsub.rs`), `--broker zeromq`
//! on a `router` endpoint of its own per scenario (see `zeromq.rs`).
//!
//! Throughput is measured draining a backlog (all messages published first).
//! Latency is measured separately on a paced stream (a fixed publish rate well
//! below capacity), since on a backlog it would only measure queueing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::app::App;
use crate::cpu::{process_usage, CpuSample};

pub(crate) const REDIS: &str = "redis://127.0.0.1:6379";
pub(crate) const SENT_HEADER: &str = "x-bench-sent-us";

#[derive(clap::Args, Clone)]
pub struct Args {
    /// The broker: `rabbitmq` (127.0.0.1:5672), `kafka` (127.0.0.1:9092) or
    /// `jetstream` (NATS on 127.0.0.1:4222), `mqtt` (a Mosquitto of its
    /// own per scenario), `pubsub` (the Pub/Sub emulator on 127.0.0.1:8085)
    /// or `zeromq` (a `router` endpoint per scenario).
    #[arg(long, default_value = "rabbitmq", value_parser = ["rabbitmq", "kafka", "jetstream", "mqtt", "pubsub", "zeromq"])]
    pub broker: String,
    /// Messages in the backlog (throughput) phase.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Prefetch (and delivery concurrency) of raw and idemq.
    #[arg(long, default_value_t = 200)]
    pub prefetch: u16,
    #[arg(long, default_value_t = 256)]
    pub body_bytes: usize,
    /// Share of messages that repeat an earlier message_id.
    #[arg(long, default_value_t = 0.2)]
    pub dup_ratio: f64,
    /// The naive consumer runs at most this many messages (it is slow).
    #[arg(long, default_value_t = 10_000)]
    pub naive_messages: usize,
    /// Publish rate of the latency phase, messages per second.
    #[arg(long, default_value_t = 2_000)]
    pub paced_rate: u64,
    /// Duration of the latency phase per scenario, seconds.
    #[arg(long, default_value_t = 5)]
    pub paced_seconds: u64,
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        default_value = "raw,idemq,naive,idemq-memory",
        value_delimiter = ','
    )]
    pub scenarios: Vec<String>,
    /// The sidecar binary (default: next to this one).
    #[arg(long)]
    pub sidecar_bin: Option<PathBuf>,
    /// Rounds of every scenario, interleaved (raw, idemq, …, raw, idemq, …);
    /// each scenario reports its median round, so that a machine whose speed
    /// drifts during the run does not favour the scenario that ran first.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Where to write the SVG chart of the results (default:
    /// `idemq-bench-<broker>.svg` in the current directory).
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

/// What a scenario measured.
#[derive(Default, Clone)]
struct Figures {
    consumed: usize,
    delivered: usize,
    duplicates: usize,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    rss_kib: Option<u64>,
    cpu_s_per_100k: Option<f64>,
    redis_bytes_per_key: Option<f64>,
    /// CPU seconds per 100k messages while draining the backlog: the whole
    /// machine, RabbitMQ and Redis (where the cost of a scenario lands).
    host_cpu_per_100k: f64,
    broker_cpu_per_100k: f64,
    redis_cpu_per_100k: f64,
    /// This process: the app, and the raw or naive consumer.
    bench_cpu_per_100k: f64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.consumed as f64 / self.elapsed.as_secs_f64()
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let app = App::start().await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut rounds: Vec<(String, Vec<Figures>)> = args
        .scenarios
        .iter()
        .map(|s| (s.clone(), Vec::new()))
        .collect();
    for round in 1..=args.rounds.max(1) {
        for (scenario, figures) in &mut rounds {
            let n = if scenario == "naive" {
                args.naive_messages.min(args.messages)
            } else {
                args.messages
            };
            eprintln!("== round {round}: {scenario}: {n} messages");
            let run_id = format!("{run_id}-r{round}");
            figures.push(
                scenario_run(&args, &app, scenario, n, &run_id)
                    .await
                    .with_context(|| format!("scenario {scenario}, round {round}"))?,
            );
        }
    }
    let by_round = round_ratios(&rounds, "idemq", "raw");
    let mut results: Vec<(String, Figures)> = Vec::new();
    for (scenario, mut figures) in rounds {
        figures.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        let rates: Vec<String> = figures.iter().map(|f| format!("{:.0}", f.rate())).collect();
        eprintln!("{scenario}: msg/s by round, sorted: {}", rates.join(", "));
        results.push((scenario, figures[figures.len() / 2].clone()));
    }
    print_table(&args, &results);
    if by_round.len() > 1 {
        let shown: Vec<String> = by_round.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "ratio idemq/raw throughput by round (each against the raw run of its own round): {}",
            shown.join(", ")
        );
    }
    let path = args
        .chart
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("idemq-bench-{}.svg", args.broker)));
    write_chart(&args, &results, &path)?;
    println!("chart: {}", path.display());
    Ok(())
}

/// The throughput ratio `a`/`b` of each round: scenarios of one round run
/// minutes apart, so these pairs drift less than the medians of all rounds.
fn round_ratios(rounds: &[(String, Vec<Figures>)], a: &str, b: &str) -> Vec<f64> {
    let get = |name: &str| rounds.iter().find(|(n, _)| n == name).map(|(_, f)| f);
    match (get(a), get(b)) {
        (Some(a), Some(b)) => a.iter().zip(b).map(|(a, b)| a.rate() / b.rate()).collect(),
        _ => Vec::new(),
    }
}

fn write_chart(
    args: &Args,
    results: &[(String, Figures)],
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let bars: Vec<_> = results
        .iter()
        .map(|(name, f)| crate::chart::Bar {
            scenario: name.clone(),
            rate: f.rate(),
            p50_ms: f.p50_ms,
            p99_ms: f.p99_ms,
            p999_ms: f.p999_ms,
        })
        .collect();
    let title = format!("idemq pipeline benchmark: {}", args.broker);
    let subtitle = format!(
        "{} messages ({}% duplicates, {}-byte bodies), prefetch {}, median of {} rounds; latency at {} msg/s for {} s",
        args.messages,
        (args.dup_ratio * 100.0).round(),
        args.body_bytes,
        args.prefetch,
        args.rounds.max(1),
        args.paced_rate,
        args.paced_seconds
    );
    crate::chart::write(path, &title, &subtitle, &bars)
}

/// The ids of `n` messages of which `dup_ratio` repeat an earlier id.
fn message_ids(n: usize, dup_ratio: f64) -> Vec<String> {
    let every = if dup_ratio > 0.0 {
        (1.0 / dup_ratio).round() as usize
    } else {
        usize::MAX
    };
    let mut distinct = 0;
    (0..n)
        .map(|i| {
            if every != usize::MAX && i % every == every - 1 && distinct > 0 {
                // A duplicate of an earlier message, spread over all of them
                // (a producer retry or a redelivery, from just now to long ago).
                format!("m-{}", (i * 7919) % distinct)
            } else {
                distinct += 1;
                format!("m-{}", distinct - 1)
            }
        })
        .collect()
}

async fn scenario_run(
    args: &Args,
    app: &App,
    scenario: &str,
    n: usize,
    run_id: &str,
) -> anyhow::Result<Figures> {
    let queue = format!("bench-{run_id}-{scenario}");
    let broker = Topology::create(args, &queue).await?;
    let ids = message_ids(n, args.dup_ratio);
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    let body = vec![b'x'; args.body_bytes];

    // Throughput: drain a backlog.
    broker.publish_all(&ids, &body, None).await?;
    app.reset();
    let mut redis_admin = crate::redis_admin::connection(REDIS).await?;
    let memory_before = crate::redis_admin::used_memory(&mut redis_admin).await?;
    let cpu_before = CpuSample::take(&mut redis_admin, broker.process()).await?;
    let consumer = Consumer::start(args, scenario, &broker, &queue, app, run_id)?;
    let expected_app = if scenario == "raw" { n } else { distinct };
    wait(Duration::from_secs(600), || app.count() >= expected_app).await?;
    let delivered_after = app.since_first();
    broker.wait_settled().await?;
    // From the first delivery: a consumer's start-up is not its throughput.
    // Mosquitto reports what it holds once a second, too coarse to time the
    // last acks by, and the Pub/Sub emulator reports no backlog at all: their
    // figures end at the last delivery (what is left then is at most Receive
    // Maximum PUBACKs, or maxOutstandingMessages acks).
    let elapsed = match broker {
        Topology::Mqtt(_) | Topology::PubSub(_) => delivered_after,
        _ => app.since_first(),
    };
    let cpu = CpuSample::take(&mut redis_admin, broker.process())
        .await?
        .since(&cpu_before);
    let per_100k = |seconds: f64| seconds / n as f64 * 100_000.0;
    let mut figures = Figures {
        consumed: n,
        delivered: app.count(),
        duplicates: n - app.count(),
        elapsed,
        host_cpu_per_100k: per_100k(cpu.host),
        broker_cpu_per_100k: per_100k(cpu.broker),
        redis_cpu_per_100k: per_100k(cpu.redis),
        bench_cpu_per_100k: per_100k(cpu.bench),
        ..Default::default()
    };
    if scenario == "idemq" {
        let memory_after = crate::redis_admin::used_memory(&mut redis_admin).await?;
        figures.redis_bytes_per_key =
            Some(memory_after.saturating_sub(memory_before) as f64 / distinct as f64);
    }
    if let Consumer::Sidecar(child) = &consumer {
        let (rss, cpu) = process_usage(child.id())?;
        figures.rss_kib = Some(rss);
        figures.cpu_s_per_100k = Some(cpu / n as f64 * 100_000.0);
    }
    if scenario != "raw" && app.max_per_key() > 1 {
        bail!("{scenario} delivered a message twice: exactly-once broken");
    }

    // Latency: a paced stream while the same consumer runs.
    {
        app.reset();
        let paced = (args.paced_rate * args.paced_seconds) as usize;
        let paced_ids: Vec<String> = message_ids(paced, args.dup_ratio)
            .into_iter()
            .map(|id| format!("p{id}"))
            .collect();
        broker
            .publish_all(&paced_ids, &body, Some(args.paced_rate))
            .await?;
        let paced_distinct = paced_ids
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        let expected = if scenario == "raw" {
            paced
        } else {
            paced_distinct
        };
        wait(Duration::from_secs(120), || app.count() >= expected).await?;
        let h = app.latencies();
        figures.p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0;
        figures.p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
        figures.p999_ms = h.value_at_quantile(0.999) as f64 / 1000.0;
    }
    consumer.stop().await;
    broker.delete().await;
    crate::redis_admin::delete_prefix(
        &mut redis_admin,
        &format!("idemq:{{bench-{run_id}-{scenario}}}:"),
    )
    .await?;
    crate::redis_admin::delete_prefix(&mut redis_admin, &crate::naive::prefix(run_id)).await?;
    Ok(figures)
}

/// The local demo: the sidecar binary with the in-memory store between the
/// local RabbitMQ and a tiny app; prints what was published and delivered.
pub async fn demo(messages: usize, sidecar_bin: Option<PathBuf>) -> anyhow::Result<()> {
    let args = Args {
        broker: "rabbitmq".into(),
        messages,
        prefetch: 50,
        body_bytes: 64,
        dup_ratio: 0.2,
        naive_messages: 0,
        paced_rate: 0,
        paced_seconds: 0,
        scenarios: vec![],
        sidecar_bin,
        rounds: 1,
        chart: None,
    };
    let app = App::start().await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let queue = format!("idemq-demo-{run_id}");
    let broker = Topology::create(&args, &queue).await?;
    let ids = message_ids(messages, args.dup_ratio);
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    broker
        .publish_all(&ids, b"{\"order\":\"demo\"}", None)
        .await?;
    println!(
        "published {messages} messages to queue {queue} ({} repeat an earlier message_id)",
        messages - distinct
    );
    let consumer = Consumer::start(&args, "idemq-memory", &broker, &queue, &app, &run_id)?;
    let settled = async {
        wait(Duration::from_secs(60), || app.count() >= distinct).await?;
        broker.wait_settled().await
    }
    .await;
    let delivered = app.count();
    consumer.stop().await;
    broker.delete().await;
    settled?;
    println!(
        "the app received {delivered} messages, each once (most deliveries of one key: {}); idemq dropped {} duplicates",
        app.max_per_key(),
        messages - delivered
    );
    anyhow::ensure!(
        app.max_per_key() == 1 && delivered == distinct,
        "deduplication failed"
    );
    Ok(())
}

fn print_table(args: &Args, results: &[(String, Figures)]) {
    println!();
    println!(
        "idemq pipeline benchmark: {} messages ({}% duplicates by message_id, {}-byte bodies), prefetch {}, median of {} interleaved rounds",
        args.messages,
        (args.dup_ratio * 100.0).round(),
        args.body_bytes,
        args.prefetch,
        args.rounds.max(1)
    );
    println!("throughput drains a backlog; latency is end to end (publish → app) on a paced stream of {} msg/s", args.paced_rate);
    println!(
        "{:<14} {:>9} {:>10} {:>10} {:>11} {:>9} {:>9} {:>9} {:>10} {:>12}",
        "scenario",
        "messages",
        "msg/s",
        "delivered",
        "duplicates",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "RSS MiB",
        "CPU s/100k"
    );
    for (name, f) in results {
        println!(
            "{:<14} {:>9} {:>10.0} {:>10} {:>11} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>12}",
            name,
            f.consumed,
            f.rate(),
            f.delivered,
            f.duplicates,
            f.p50_ms,
            f.p99_ms,
            f.p999_ms,
            f.rss_kib
                .map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "-".into()),
            f.cpu_s_per_100k
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    println!("CPU seconds per 100k messages while draining the backlog (where the cost lands):");
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "scenario", "machine", args.broker, "redis", "sidecar", "bench"
    );
    for (name, f) in results {
        println!(
            "{:<14} {:>9.2} {:>9.2} {:>9.2} {:>9} {:>9.2}",
            name,
            f.host_cpu_per_100k,
            f.broker_cpu_per_100k,
            f.redis_cpu_per_100k,
            f.cpu_s_per_100k
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
            f.bench_cpu_per_100k,
        );
    }
    println!("(bench: this process, the app and the in-process raw or naive consumer)");
    let get = |name: &str| results.iter().find(|(n, _)| n == name).map(|(_, f)| f);
    if let Some(idemq) = get("idemq") {
        if let Some(b) = idemq.redis_bytes_per_key {
            println!("redis bytes per retained key (idemq): {b:.1}");
        }
        if let Some(naive) = get("naive") {
            println!(
                "ratio idemq/naive throughput: {:.2}",
                idemq.rate() / naive.rate()
            );
        }
        if let Some(mem) = get("idemq-memory") {
            println!(
                "ratio idemq/idemq-memory throughput: {:.2}",
                idemq.rate() / mem.rate()
            );
        }
        if let Some(raw) = get("raw") {
            println!(
                "added p99 latency idemq vs raw: {:.2} ms",
                idemq.p99_ms - raw.p99_ms
            );
            let broker = if args.broker == "rabbitmq" {
                String::new()
            } else {
                format!(" ({})", args.broker)
            };
            println!(
                "ratio idemq/raw throughput{broker}: {:.2}",
                idemq.rate() / raw.rate()
            );
        }
    }
}

async fn wait(timeout: Duration, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The send times of one publishing run: message `i` is due `i / rate`
/// seconds after the start, or at once without a rate.
pub(crate) struct Pace {
    started: Instant,
    rate: Option<u64>,
}

impl Pace {
    pub(crate) fn new(rate: Option<u64>) -> Self {
        Self {
            started: Instant::now(),
            rate,
        }
    }

    /// When message `i` is due.
    pub(crate) fn due(&self, i: usize) -> Instant {
        match self.rate {
            Some(rate) => self.started + Duration::from_micros(i as u64 * 1_000_000 / rate),
            None => self.started,
        }
    }

    /// Waits until message `i` is due (never without a rate).
    pub(crate) async fn wait(&self, i: usize) {
        if self.rate.is_some() {
            tokio::time::sleep_until(self.due(i).into()).await;
        }
    }
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A scenario's queue or topic on the broker under benchmark.
enum Topology {
    RabbitMq(crate::rabbitmq::Queue),
    Kafka(crate::kafka::Topic),
    JetStream(crate::jetstream::Stream),
    Mqtt(crate::mqtt::Topic),
    PubSub(crate::pubsub::Subscription),
    ZeroMq(crate::zeromq::Endpoint),
}

impl Topology {
    async fn create(args: &Args, name: &str) -> anyhow::Result<Self> {
        Ok(match args.broker.as_str() {
            "rabbitmq" => Self::RabbitMq(crate::rabbitmq::Queue::create(name).await?),
            "kafka" => Self::Kafka(crate::kafka::Topic::create(name).await?),
            "jetstream" => Self::JetStream(crate::jetstream::Stream::create(name).await?),
            "mqtt" => Self::Mqtt(crate::mqtt::Topic::create(name).await?),
            "pubsub" => Self::PubSub(crate::pubsub::Subscription::create(name).await?),
            "zeromq" => Self::ZeroMq(crate::zeromq::Endpoint::create().await?),
            other => bail!("unknown broker {other}"),
        })
    }

    async fn publish_all(
        &self,
        ids: &[String],
        body: &[u8],
        rate: Option<u64>,
    ) -> anyhow::Result<()> {
        match self {
            Self::RabbitMq(queue) => queue.publish_all(ids, body, rate, SENT_HEADER).await,
            Self::Kafka(topic) => topic.publish_all(ids, body, rate, SENT_HEADER).await,
            Self::JetStream(stream) => stream.publish_all(ids, body, rate, SENT_HEADER).await,
            Self::Mqtt(topic) => topic.publish_all(ids, body, rate, SENT_HEADER).await,
            Self::PubSub(subscription) => subscription.publish_all(ids, body, rate).await,
            Self::ZeroMq(endpoint) => endpoint.publish_all(ids, body, rate).await,
        }
    }

    /// Waits until the consumer settled everything (queue empty, or all committed).
    async fn wait_settled(&self) -> anyhow::Result<()> {
        match self {
            Self::RabbitMq(queue) => queue.wait_settled().await,
            Self::Kafka(topic) => topic.wait_committed().await,
            Self::JetStream(stream) => stream.wait_settled().await,
            Self::Mqtt(topic) => topic.wait_settled().await,
            // The emulator reports no backlog (Google Cloud's is a
            // Monitoring metric): nothing to wait for.
            Self::PubSub(_) => Ok(()),
            Self::ZeroMq(endpoint) => endpoint.wait_settled().await,
        }
    }

    /// The broker's processes, for their CPU time: the process name, and a
    /// word of the command line (the emulator is one Java process of many).
    fn process(&self) -> (&'static str, &'static str) {
        match self {
            Self::RabbitMq(_) => ("beam.smp", ""),
            Self::Kafka(_) => ("tansu", ""),
            Self::JetStream(_) => ("nats-server", ""),
            Self::Mqtt(_) => ("mosquitto", ""),
            Self::PubSub(_) => ("java", "pubsub-emulator"),
            // No broker: the client runs in this process ("bench").
            Self::ZeroMq(_) => ("-", ""),
        }
    }

    /// The sidecar's `dedup` (where the key is) and `broker` sections for
    /// this queue.
    fn sidecar_config(&self, queue: &str, prefetch: u16) -> String {
        match self {
            Self::RabbitMq(queue) => format!(
                "broker:\n  rabbitmq:\n    queue: {}\n    prefetch: {prefetch}\n    deadLetterExchange: {}\n",
                queue.name, queue.dlx
            ),
            Self::Kafka(_) => format!(
                "dedup:\n  key:\n    from: recordKey\nbroker:\n  kafka:\n    topics: [{queue}]\n    groupId: {}\n    maxInFlight: {prefetch}\n    sessionTimeout: 6s\n",
                crate::kafka::group(queue),
            ),
            Self::JetStream(_) => {
                let js = crate::jetstream::settings(queue, prefetch);
                format!(
                    "dedup:\n  key:\n    from: header\n    name: {}\nbroker:\n  jetstream:\n    stream: {}\n    consumer: {}\n    maxAckPending: {}\n    ackWait: 30s\n    deadLetterSubject: {}\n",
                    crate::jetstream::KEY_HEADER,
                    js.stream,
                    js.consumer,
                    js.max_ack_pending,
                    js.dead_letter_subject
                )
            }
            Self::Mqtt(topic) => format!(
                "broker:\n  mqtt:\n    clientId: {}\n    topics: [{}]\n    receiveMaximum: {prefetch}\n    deadLetterTopic: {queue}/dead\n",
                topic.client_id(),
                topic.filter(),
            ),
            Self::PubSub(subscription) => {
                let pubsub = crate::pubsub::settings(subscription, prefetch);
                format!(
                    "dedup:\n  key:\n    from: attribute\n    name: {}\nbroker:\n  pubsub:\n    project: {}\n    subscription: {}\n    maxOutstandingMessages: {}\n    deadLetterTopic: {}\n",
                    crate::pubsub::KEY_ATTRIBUTE,
                    pubsub.project,
                    pubsub.subscription,
                    pubsub.max_outstanding_messages,
                    pubsub.dead_letter_topic.unwrap_or_default()
                )
            }
            Self::ZeroMq(endpoint) => format!(
                "broker:\n  zeromq:\n    bind: {}\n    maxInFlight: {prefetch}\n    plain: true\n    deadLetter:\n      endpoint: {}\n",
                endpoint.bind(),
                endpoint.dead_letters
            ),
        }
    }

    /// The sidecar's `IDEMQ_BROKER_URL` (Kafka's bootstrap servers and the
    /// Pub/Sub emulator have variables of their own; ZeroMQ binds).
    fn broker_url(&self) -> String {
        match self {
            Self::Mqtt(topic) => topic.url(),
            Self::JetStream(_) => crate::jetstream::URL.to_string(),
            _ => crate::rabbitmq::URL.to_string(),
        }
    }

    async fn delete(self) {
        match self {
            Self::RabbitMq(queue) => queue.delete().await,
            Self::Kafka(topic) => topic.delete().await,
            Self::JetStream(stream) => stream.delete().await,
            Self::Mqtt(topic) => topic.delete().await,
            Self::PubSub(subscription) => subscription.delete().await,
            Self::ZeroMq(endpoint) => endpoint.delete().await,
        }
    }
}

/// A running consumer of one scenario.
enum Consumer {
    InProcess(
        tokio::task::JoinHandle<()>,
        tokio_util::sync::CancellationToken,
    ),
    Sidecar(Child),
}

impl Consumer {
    fn start(
        args: &Args,
        scenario: &str,
        topology: &Topology,
        queue: &str,
        app: &App,
        run_id: &str,
    ) -> anyhow::Result<Self> {
        let stop = tokio_util::sync::CancellationToken::new();
        if matches!(scenario, "raw" | "naive") {
            let (name, url, run_id) = (queue.to_string(), app.url(), run_id.to_string());
            let naive = scenario == "naive";
            let task = match topology {
                Topology::RabbitMq(_) if naive => {
                    tokio::spawn(crate::rabbitmq::naive(name, url, run_id, stop.clone()))
                }
                Topology::RabbitMq(_) => tokio::spawn(crate::rabbitmq::raw(
                    name,
                    args.prefetch,
                    url,
                    SENT_HEADER,
                    stop.clone(),
                )),
                Topology::Kafka(_) if naive => {
                    tokio::spawn(crate::kafka::naive(name, url, run_id, stop.clone()))
                }
                Topology::Kafka(_) => tokio::spawn(crate::kafka::raw(
                    name,
                    args.prefetch,
                    url,
                    SENT_HEADER,
                    stop.clone(),
                )),
                Topology::JetStream(_) if naive => tokio::spawn(crate::jetstream::naive(
                    name,
                    args.prefetch,
                    url,
                    run_id,
                    stop.clone(),
                )),
                Topology::JetStream(_) => tokio::spawn(crate::jetstream::raw(
                    name,
                    args.prefetch,
                    url,
                    SENT_HEADER,
                    stop.clone(),
                )),
                Topology::Mqtt(topic) if naive => tokio::spawn(crate::mqtt::naive(
                    topic.port,
                    topic.client_id(),
                    topic.filter(),
                    url,
                    run_id,
                    stop.clone(),
                )),
                Topology::Mqtt(topic) => tokio::spawn(crate::mqtt::raw(
                    topic.port,
                    topic.client_id(),
                    topic.filter(),
                    args.prefetch,
                    url,
                    SENT_HEADER,
                    stop.clone(),
                )),
                Topology::ZeroMq(_) if naive => {
                    bail!("no naive consumer for zeromq: run --scenarios raw,idemq,idemq-memory")
                }
                Topology::ZeroMq(endpoint) => tokio::spawn(crate::zeromq::raw(
                    endpoint.bind(),
                    args.prefetch,
                    url,
                    SENT_HEADER,
                    stop.clone(),
                )),
                Topology::PubSub(subscription) => {
                    let settings = crate::pubsub::settings(subscription, args.prefetch);
                    if naive {
                        tokio::spawn(crate::pubsub::naive(settings, url, run_id, stop.clone()))
                    } else {
                        tokio::spawn(crate::pubsub::raw(settings, url, stop.clone()))
                    }
                }
            };
            return Ok(Self::InProcess(task, stop));
        }
        Ok(match scenario {
            "idemq" | "idemq-memory" => {
                Self::Sidecar(sidecar(args, scenario, topology, queue, app, run_id)?)
            }
            other => bail!("unknown scenario {other}"),
        })
    }

    async fn stop(self) {
        match self {
            Self::InProcess(task, stop) => {
                stop.cancel();
                let _ = task.await;
            }
            Self::Sidecar(mut child) => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let _ = child.wait();
            }
        }
    }
}

fn sidecar(
    args: &Args,
    scenario: &str,
    topology: &Topology,
    queue: &str,
    app: &App,
    run_id: &str,
) -> anyhow::Result<Child> {
    let bin = match &args.sidecar_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("idemq-sidecar"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p idemq-sidecar`",
        bin.display()
    );
    let store = if scenario == "idemq" {
        "redis"
    } else {
        "memory"
    };
    let broker = topology.sidecar_config(queue, args.prefetch);
    let config = format!(
        "consumer: bench-{run_id}-{scenario}\nstore:\n  kind: {store}\n{broker}delivery:\n  url: {}\nadmin:\n  listen: 127.0.0.1:0\n",
        app.url()
    );
    let path = std::env::temp_dir().join(format!("idemq-bench-{run_id}-{scenario}.yaml"));
    std::fs::write(&path, config)?;
    Ok(Command::new(bin)
        .arg("--config")
        .arg(&path)
        .env("IDEMQ_BROKER_URL", topology.broker_url())
        .env("IDEMQ_KAFKA_BOOTSTRAP_SERVERS", crate::kafka::BOOTSTRAP)
        .env("PUBSUB_EMULATOR_HOST", crate::pubsub::EMULATOR)
        .env("IDEMQ_REDIS_URL", REDIS)
        .env(
            "IDEMQ_LOG",
            std::env::var("IDEMQ_BENCH_SIDECAR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .spawn()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(consumed: usize, secs: u64) -> Figures {
        Figures {
            consumed,
            elapsed: Duration::from_secs(secs),
            ..Figures::default()
        }
    }

    #[test]
    fn each_round_is_compared_with_its_own_baseline() {
        let rounds = vec![
            ("raw".to_string(), vec![drained(100, 1), drained(100, 2)]),
            ("idemq".to_string(), vec![drained(90, 1), drained(40, 1)]),
        ];
        assert_eq!(round_ratios(&rounds, "idemq", "raw"), vec![0.9, 0.8]);
        assert!(round_ratios(&rounds, "idemq", "naive").is_empty());
    }
}
