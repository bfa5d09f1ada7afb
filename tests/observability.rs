//! The chart's dashboard, alerts and PodMonitor: rendered by a real `helm`,
//! off by default, and every metric their queries name is one that the
//! sidecar or the operator really exports (read from their registries, so a
//! renamed metric fails here rather than in someone's empty dashboard).

use std::collections::BTreeSet;

use serde::Deserialize as _;
use serde_yaml::Value;

#[path = "common/helm.rs"]
mod helm;

const ENABLED: &[&str] = &[
    "--set",
    "dashboards.enabled=true,podMonitor.enabled=true,prometheusRule.enabled=true",
];

/// Labels that look like metric names: the PodMonitor turns the pod label
/// `idemq.dev/consumer` into `idemq_dev_consumer`.
const LABELS: &[&str] = &["idemq_dev_consumer"];

fn render(args: &[&str]) -> Vec<Value> {
    let text = helm::template("idemq-system", args).expect("helm template");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The series names a Prometheus scrape of these registries yields, from the
/// `# TYPE` lines of their text encoding.
fn exported(encodings: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in encodings.iter().flat_map(|e| e.lines()) {
        let mut words = line.split_whitespace();
        if words.next() != Some("#") || words.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

fn known_metrics() -> BTreeSet<String> {
    exported(&[
        idemq_sidecar::metrics::Metrics::new().encode(),
        idemq_operator::metrics::Metrics::new().encode(),
    ])
}

/// The `idemq_…` names in a query that are neither an exported metric nor a
/// known label.
fn unknown_metrics(query: &str, known: &BTreeSet<String>) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut rest = query;
    while let Some(at) = rest.find("idemq_") {
        let preceded_by_word = rest[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        if !preceded_by_word && !known.contains(name) && !LABELS.contains(&name) {
            unknown.push(name.to_string());
        }
        rest = &tail[end..];
    }
    unknown
}

/// Every PromQL expression of the dashboard and the alert rules, with where it is.
fn queries(docs: &[Value]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for cm in of_kind(docs, "ConfigMap") {
        let Some(json) = cm["data"]["idemq.json"].as_str() else {
            continue;
        };
        let dashboard: serde_json::Value = serde_json::from_str(json).expect("dashboard JSON");
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                found.push((format!("panel {}", panel["title"]), expr.to_string()));
            }
        }
        for var in dashboard["templating"]["list"]
            .as_array()
            .expect("variables")
        {
            if let Some(q) = var["query"]["query"].as_str() {
                found.push((format!("variable {}", var["name"]), q.to_string()));
            }
        }
    }
    for rule in of_kind(docs, "PrometheusRule") {
        for group in rule["spec"]["groups"].as_sequence().expect("groups") {
            for r in group["rules"].as_sequence().expect("rules") {
                let expr = r["expr"].as_str().expect("expr");
                found.push((format!("alert {:?}", r["alert"]), expr.to_string()));
            }
        }
    }
    found
}

#[test]
fn dashboards_alerts_and_pod_monitor_are_off_by_default() {
    let docs = render(&[]);
    assert!(of_kind(&docs, "PrometheusRule").is_empty());
    assert!(of_kind(&docs, "PodMonitor").is_empty());
    assert!(of_kind(&docs, "ConfigMap").is_empty());
}

#[test]
fn every_query_of_the_dashboard_and_the_alerts_names_an_exported_metric() {
    let docs = render(ENABLED);
    let dashboard = of_kind(&docs, "ConfigMap");
    assert_eq!(dashboard.len(), 1, "one dashboard ConfigMap");
    assert_eq!(dashboard[0]["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(of_kind(&docs, "PodMonitor").len(), 1);
    assert_eq!(of_kind(&docs, "PrometheusRule").len(), 1);

    let known = known_metrics();
    let queries = queries(&docs);
    assert!(queries.len() >= 15, "{} queries found", queries.len());
    let bad: Vec<_> = queries
        .iter()
        .map(|(at, q)| (at, unknown_metrics(q, &known)))
        .filter(|(_, unknown)| !unknown.is_empty())
        .collect();
    assert!(
        bad.is_empty(),
        "queries name metrics nobody exports: {bad:?}\nexported: {known:?}"
    );
    // Every alert names a metric at all (a query on a label alone is no alert).
    for (at, q) in &queries {
        assert!(
            known.iter().any(|m| q.contains(m.as_str())),
            "{at} names no exported metric: {q}"
        );
    }
}

#[test]
fn an_unknown_or_misspelt_metric_is_caught() {
    let known = known_metrics();
    assert!(known.contains("idemq_messages_total"), "{known:?}");
    assert!(known.contains("idemq_end_to_end_duration_seconds_bucket"));
    assert!(known.contains("idemq_operator_reconciles_total"));
    assert_eq!(
        unknown_metrics(
            r#"sum by (idemq_dev_consumer) (rate(idemq_message_total{outcome="delivered"}[5m]))"#,
            &known
        ),
        ["idemq_message_total"]
    );
    assert_eq!(
        unknown_metrics(
            "histogram_quantile(0.9, idemq_end_to_end_duration_seconds)",
            &known
        ),
        ["idemq_end_to_end_duration_seconds"],
        "a histogram is queried through its _bucket series"
    );
    assert!(unknown_metrics("min(idemq_store_connected) == 0", &known).is_empty());
}
