//! `idemq-operator inject`: the workload with the sidecar, and every object
//! the policy implies, parsed back into Kubernetes types.

use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};

const BIN: &str = env!("CARGO_BIN_EXE_idemq-operator");
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

fn inject(policy: &str, workload: &str) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["inject", "--policy", policy, "-f", workload])
        .output()
        .expect("run inject");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn documents(stream: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(stream)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .collect()
}

#[test]
fn deployment_gets_a_native_sidecar_and_every_owned_object() {
    let (ok, out, err) = inject(
        &format!("{DATA}/policy.yaml"),
        &format!("{DATA}/deployment.yaml"),
    );
    assert!(ok, "{err}");
    let docs = documents(&out);
    let kinds: Vec<_> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "Deployment",
            "ConfigMap",
            "Secret",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget"
        ],
        "the managed store is durable by default"
    );

    let workload: Deployment = serde_yaml::from_value(docs[0].clone()).expect("a Deployment");
    let pod = workload.spec.expect("spec").template;
    let spec = pod.spec.expect("pod spec");
    assert_eq!(spec.containers.len(), 1, "the app container is untouched");
    assert_eq!(spec.containers[0].name, "app");
    let sidecar = &spec.init_containers.as_ref().expect("init containers")[0];
    assert_eq!(sidecar.name, "idemq-sidecar");
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "a native sidecar"
    );
    let security = sidecar.security_context.as_ref().expect("security context");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let env: Vec<_> = sidecar
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    assert!(
        env.contains(&"IDEMQ_BROKER_URL") && env.contains(&"IDEMQ_REDIS_PASSWORD"),
        "{env:?}"
    );
    let broker = sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "IDEMQ_BROKER_URL")
        .expect("broker env");
    assert!(
        broker.value.is_none(),
        "secrets come from Secret references only"
    );
    let annotations = pod
        .metadata
        .expect("template metadata")
        .annotations
        .expect("annotations");
    assert_eq!(annotations["idemq.dev/config-hash"].len(), 16);

    let config: ConfigMap = serde_yaml::from_value(docs[1].clone()).expect("a ConfigMap");
    let yaml = &config.data.expect("data")["sidecar.yaml"];
    let sidecar_config =
        idemq_sidecar::Config::from_yaml(yaml).expect("the sidecar accepts its config");
    assert_eq!(sidecar_config.consumer, "shop.orders");
    assert_eq!(
        sidecar_config.delivery.expect("delivery").url,
        "http://127.0.0.1:8080/messages"
    );
    assert!(!yaml.contains("amqp://"), "no secret in the ConfigMap");

    let secret: Secret = serde_yaml::from_value(docs[2].clone()).expect("a Secret");
    assert_eq!(secret.data.expect("data")["password"].0.len(), 32);
    let _: Service = serde_yaml::from_value(docs[3].clone()).expect("a Service");
    let redis: k8s_openapi::api::apps::v1::StatefulSet =
        serde_yaml::from_value(docs[4].clone()).expect("the Redis StatefulSet");
    assert_eq!(redis.metadata.name.as_deref(), Some("orders-idemq-redis"));
    assert!(redis
        .spec
        .and_then(|s| s.volume_claim_templates)
        .is_some_and(|claims| claims.len() == 1));
    assert!(
        docs.iter()
            .all(|d| d["metadata"]["ownerReferences"].is_null()),
        "offline output has no owner references"
    );
}

#[test]
fn injecting_twice_gives_the_same_workload() {
    let (_, first, _) = inject(
        &format!("{DATA}/policy.yaml"),
        &format!("{DATA}/deployment.yaml"),
    );
    let injected = std::env::temp_dir().join(format!("idemq-injected-{}.yaml", std::process::id()));
    std::fs::write(
        &injected,
        serde_yaml::to_string(&documents(&first)[0]).expect("yaml"),
    )
    .expect("write");
    let (ok, second, err) = inject(
        &format!("{DATA}/policy.yaml"),
        injected.to_str().expect("utf-8"),
    );
    assert!(ok, "{err}");
    assert_eq!(
        documents(&second)[0],
        documents(&first)[0],
        "one sidecar, one volume, same hash"
    );
    std::fs::remove_file(injected).ok();
}

#[test]
fn statefulset_target_is_injected_too() {
    let policy = std::fs::read_to_string(format!("{DATA}/policy.yaml"))
        .expect("policy")
        .replace("kind: Deployment", "kind: StatefulSet");
    let workload = std::fs::read_to_string(format!("{DATA}/deployment.yaml"))
        .expect("workload")
        .replace("kind: Deployment", "kind: StatefulSet")
        .replace(
            "  replicas: 2",
            "  serviceName: orders-worker\n  replicas: 2",
        );
    let dir = std::env::temp_dir().join(format!("idemq-sts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("p.yaml"), policy).expect("write");
    std::fs::write(dir.join("w.yaml"), workload).expect("write");
    let (ok, out, err) = inject(
        dir.join("p.yaml").to_str().expect("utf-8"),
        dir.join("w.yaml").to_str().expect("utf-8"),
    );
    assert!(ok, "{err}");
    let sts: StatefulSet =
        serde_yaml::from_value(documents(&out)[0].clone()).expect("a StatefulSet");
    let init = sts
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
        .init_containers
        .expect("init");
    assert_eq!(init[0].name, "idemq-sidecar");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_workload_the_policy_does_not_target_is_refused_by_name() {
    let workload = std::env::temp_dir().join(format!("idemq-other-{}.yaml", std::process::id()));
    std::fs::write(
        &workload,
        std::fs::read_to_string(format!("{DATA}/deployment.yaml"))
            .expect("read")
            .replace("name: orders-worker", "name: billing"),
    )
    .expect("write");
    let (ok, _, err) = inject(
        &format!("{DATA}/policy.yaml"),
        workload.to_str().expect("utf-8"),
    );
    assert!(!ok);
    assert!(
        err.contains("\"billing\"") && err.contains("\"orders-worker\""),
        "{err}"
    );
    std::fs::remove_file(workload).ok();
}
