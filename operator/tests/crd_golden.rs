//! The committed CRD YAML (in `crds/` and in the chart) is exactly what the
//! Rust types generate.

use idemq_operator::crd::IdempotentConsumer;
use kube::CustomResourceExt;

/// The committed CRD: `crds/` for kubectl users and the chart's copy, which
/// `templates/crds.yaml` renders so that `helm upgrade` upgrades it.
const COMMITTED: [&str; 2] = [
    "crds/idempotentconsumers.idemq.dev.yaml",
    "charts/idemq/files/crds/idempotentconsumers.idemq.dev.yaml",
];

#[test]
fn committed_crds_match_the_types() {
    let generated = serde_yaml::to_string(&IdempotentConsumer::crd()).expect("serialize");
    for path in COMMITTED {
        let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
        let committed = std::fs::read_to_string(&full).expect("the CRD is committed");
        assert!(
            committed == generated,
            "{path} is stale; regenerate it with `make crds`"
        );
    }
}

#[test]
fn crd_has_the_names_columns_and_status_users_rely_on() {
    let crd = IdempotentConsumer::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("idempotentconsumers.idemq.dev")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["ic".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Target",
            "Injection",
            "Queue",
            "Topics",
            "Stream",
            "Ready",
            "Age"
        ]
    );
    let schema = serde_json::to_string(&version.schema).expect("schema");
    for rule in [
        "self.mode != 'external' || has(self.external)",
        "self.mode != 'http' || has(self.port)",
        "duration(self.retention) >= duration(self.lease)",
        "[has(self.rabbitmq), has(self.kafka), has(self.jetstream), has(self.mqtt), has(self.pubsub), has(self.zeromq)].exists_one(set, set)",
        "has(self.curve) != (has(self.plain) && self.plain)",
        "with ZeroMQ use messageId",
        "delivery.mode must be http",
        "has(self.deadLetterPolicy) || has(self.deadLetterTopic)",
        "Pub/Sub messages carry attributes",
        "with JetStream use messageId",
        "self.broker.mqtt.protocol != 'v3.1.1'",
        "self.key.from != 'messageId'",
        "== has(self.saslMechanism)",
        "self.injection == 'pod' ? (has(self.target.selector)",
        "self.injection == oldSelf.injection",
        "self.rollout == 'manual' || self.injection == 'pod'",
        "!has(self.replicas) || self.replicas == 0 || self.replicas >= 2",
        "!has(self.ephemeral) || !self.ephemeral",
        "has(self.managed.replicas) && self.managed.replicas >= 2",
    ] {
        assert!(schema.contains(rule), "missing CEL rule {rule}");
    }
}
