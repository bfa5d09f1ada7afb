//! A real Kafka-compatible broker on 127.0.0.1:9092 as a [`BrokerUnderTest`]:
//! a topic, its dead-letter topic and a consumer group unique to one test,
//! made and removed with rdkafka's admin client. Keys travel as record keys.

use std::sync::Mutex;
use std::time::Duration;

use idemq_sidecar::secrets::Secrets;
use idemq_sidecar::source::kafka::KafkaSecrets;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Message as _};

use super::broker::{BrokerUnderTest, DeadLetter, Message};

pub const BOOTSTRAP: &str = "127.0.0.1:9092";
const START: &str = "source .ci/services.sh && ensure_kafka";
const TIMEOUT: Duration = Duration::from_secs(10);
/// Partitions of a test topic: enough for two sidecars to share them.
pub const PARTITIONS: i32 = 4;
/// The largest record a test topic takes (`max.message.bytes`; Kafka's
/// default is about 1 MB) and the test's producer sends: the large-message
/// scenario sends 2 MiB bodies.
pub const MAX_MESSAGE_BYTES: &str = "8388608";

/// A topic (and `<topic>.dead`) and a consumer group of one test.
pub struct Kafka {
    /// The broker's address: the shared one, or a test's own ([`super::tansu`]).
    pub bootstrap: String,
    pub topic: String,
    pub dead: String,
    pub group: String,
    partitions: i32,
    admin: AdminClient<DefaultClientContext>,
    producer: FutureProducer,
    /// Reads the group's committed offsets (never joins the group).
    offsets: BaseConsumer,
    /// Reads dead letters, from where the last read stopped.
    dead_reader: BaseConsumer,
    dead_next: Mutex<i64>,
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

impl Kafka {
    /// A topology on the shared broker whose topic has `partitions` partitions.
    pub async fn with_partitions(test: &str, partitions: i32) -> Self {
        Self::on(BOOTSTRAP, test, partitions).await
    }

    /// A topology on the broker at `bootstrap`.
    pub async fn on(bootstrap: &str, test: &str, partitions: i32) -> Self {
        let topic = super::unique(test);
        let dead = format!("{topic}.dead");
        let group = format!("{topic}-group");
        let admin: AdminClient<DefaultClientContext> =
            client(bootstrap).create().expect("kafka admin client");
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let created = admin
            .create_topics(
                &[
                    NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))
                        .set("max.message.bytes", MAX_MESSAGE_BYTES),
                    NewTopic::new(&dead, 1, TopicReplication::Fixed(1))
                        .set("max.message.bytes", MAX_MESSAGE_BYTES),
                ],
                &opts,
            )
            .await
            .unwrap_or_else(|e| {
                panic!("Kafka does not answer on {bootstrap} ({e}); start it with: {START}")
            });
        for result in created {
            if let Err((name, code)) = result {
                panic!("create topic {name}: {code}");
            }
        }
        // One record per batch: tansu's high watermark counts a batch as one
        // record past its base offset, and backlog() needs it exact.
        let producer: FutureProducer = client(bootstrap)
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .set("message.max.bytes", MAX_MESSAGE_BYTES)
            .create()
            .expect("kafka producer");
        let offsets: BaseConsumer = client(bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("kafka offsets reader");
        // assign() needs a group id; this one never joins or commits.
        let dead_reader: BaseConsumer = client(bootstrap)
            .set("group.id", format!("{group}-dead-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("kafka dead-letter reader");
        let kafka = Self {
            bootstrap: bootstrap.to_string(),
            topic,
            dead,
            group,
            partitions,
            admin,
            producer,
            offsets,
            dead_reader,
            dead_next: Mutex::new(0),
        };
        kafka.wait_for_metadata();
        kafka
    }

    /// Waits until the new topics are in the cluster's metadata.
    fn wait_for_metadata(&self) {
        for _ in 0..50 {
            let ready = [&self.topic, &self.dead].iter().all(|t| {
                self.offsets
                    .fetch_metadata(Some(t), TIMEOUT)
                    .is_ok_and(|m| m.topics().iter().any(|mt| !mt.partitions().is_empty()))
            });
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("topics {} and {} never appeared", self.topic, self.dead);
    }

    /// The group's committed offset of each partition (None: nothing committed).
    pub fn committed(&self) -> Vec<Option<i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self
            .offsets
            .committed_offsets(tpl, TIMEOUT)
            .expect("committed offsets");
        (0..self.partitions)
            .map(
                |p| match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
            .collect()
    }

    /// Offsets past the last record of each partition.
    pub fn ends(&self) -> Vec<i64> {
        (0..self.partitions)
            .map(|p| {
                self.offsets
                    .fetch_watermarks(&self.topic, p, TIMEOUT)
                    .expect("watermarks")
                    .1
            })
            .collect()
    }
}

impl BrokerUnderTest for Kafka {
    const NAME: &'static str = "kafka";

    async fn create(test: &str) -> Self {
        Self::with_partitions(test, PARTITIONS).await
    }

    fn broker_yaml(&self, max_in_flight: u32) -> String {
        // A short session timeout: a group assigns partitions after about half of it.
        format!(
            "  kafka:\n    bootstrapServers: {}\n    topics: [{}]\n    groupId: {}\n    maxInFlight: {max_in_flight}\n    sessionTimeout: 6s\n    commitInterval: 200ms\n",
            self.bootstrap, self.topic, self.group
        )
    }

    fn dedup_key_yaml(&self) -> String {
        "  key:\n    from: recordKey".to_string()
    }

    fn secrets(&self) -> Secrets {
        Secrets {
            kafka: Some(KafkaSecrets {
                bootstrap_servers: self.bootstrap.clone(),
                ..KafkaSecrets::default()
            }),
            ..Secrets::default()
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![(
            "IDEMQ_KAFKA_BOOTSTRAP_SERVERS".to_string(),
            self.bootstrap.clone(),
        )]
    }

    async fn publish(&self, messages: Vec<Message>) {
        let mut sends = Vec::with_capacity(messages.len());
        for m in &messages {
            let mut record: FutureRecord<'_, str, [u8]> =
                FutureRecord::to(&self.topic).payload(&m.body[..]);
            if let Some(key) = &m.key {
                record = record.key(key.as_str());
            }
            sends.push(self.producer.send(record, TIMEOUT));
        }
        for sent in futures::future::join_all(sends).await {
            if let Err((e, _)) = sent {
                panic!("publish to {}: {e}", self.topic);
            }
        }
    }

    async fn backlog(&self) -> u64 {
        let committed = self.committed();
        self.ends()
            .iter()
            .zip(committed)
            .map(|(end, c)| u64::try_from(end - c.unwrap_or(0)).unwrap_or(0))
            .sum()
    }

    /// Reads on until the topic stays quiet for a second: the broker's high
    /// watermark cannot be trusted here (tansu reports the base offset of
    /// the last batch plus one, and the sidecar batches its dead letters).
    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut next = self.dead_next.lock().expect("lock");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.dead, 0, Offset::Offset(*next))
            .expect("partition offset");
        self.dead_reader
            .assign(&tpl)
            .expect("assign dead-letter topic");
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::time::Instant::now() < deadline {
            let Some(polled) = self.dead_reader.poll(Duration::from_secs(1)) else {
                break;
            };
            let m = match polled {
                Ok(m) => m,
                // The reader's connection to a broker of the test's own
                // that was restarted: librdkafka reconnects by itself.
                Err(e)
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::BrokerTransportFailure
                                | RDKafkaErrorCode::AllBrokersDown
                        )
                    ) =>
                {
                    continue
                }
                Err(e) => panic!("read a dead letter: {e}"),
            };
            let reason = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "x-idemq-reason")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .unwrap_or_default();
            out.push(DeadLetter {
                reason,
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            });
            *next = m.offset() + 1;
        }
        out
    }

    /// Deletes the topics and groups. The test's own clients go first:
    /// librdkafka 2.12 crashes on the metadata tansu returns for a deleted
    /// topic (an entry with neither a name nor an id), so no client of
    /// this test may still ask for it.
    async fn delete(self) {
        let Self {
            topic,
            dead,
            group,
            admin,
            producer,
            offsets,
            dead_reader,
            ..
        } = self;
        drop((producer, offsets, dead_reader));
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let _ = admin.delete_topics(&[&topic, &dead], &opts).await;
        let reader = format!("{group}-dead-reader");
        let _ = admin.delete_groups(&[&group, &reader], &opts).await;
    }
}
