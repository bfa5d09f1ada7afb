//! The Helm chart, rendered by a real `helm` binary: its CRDs are exactly
//! `crds/`, `crds.install=false` renders none, and the watch scope decides
//! between a ClusterRole and per-namespace Roles.

use serde::Deserialize as _;
use serde_yaml::Value;

#[path = "common/helm.rs"]
mod helm;

/// `helm template` of the chart with `args`, as its YAML documents.
fn render(args: &[&str]) -> Vec<Value> {
    documents(&helm::template("idemq-system", args).expect("helm template"))
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `v` with every number as a float: Helm re-encodes the CRD through Go's
/// YAML, which writes `65535.0` as `65535`; both are the same JSON number.
fn numbers_as_floats(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::from(n.as_f64().expect("a number")),
        Value::Sequence(items) => Value::Sequence(items.iter().map(numbers_as_floats).collect()),
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), numbers_as_floats(v)))
                .collect(),
        ),
        Value::Tagged(t) => numbers_as_floats(&t.value),
        other => other.clone(),
    }
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn chart_crds_are_exactly_the_committed_crds_and_are_kept_on_uninstall() {
    let docs = render(&[]);
    let rendered = of_kind(&docs, "CustomResourceDefinition");
    let committed: Vec<Value> = std::fs::read_dir(helm::root().join("crds"))
        .expect("crds/")
        .map(|entry| {
            let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
            serde_yaml::from_str(&text).expect("CRD YAML")
        })
        .collect();
    assert_eq!(
        rendered.len(),
        committed.len(),
        "one rendered CRD per file in crds/"
    );
    for crd in rendered {
        let mut crd = crd.clone();
        let annotations = crd["metadata"]
            .as_mapping_mut()
            .and_then(|m| m.remove("annotations"))
            .expect("the chart annotates its CRDs");
        assert_eq!(annotations["helm.sh/resource-policy"], "keep");
        let name = &crd["metadata"]["name"];
        let same = committed
            .iter()
            .find(|c| &c["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{name:?} is not in crds/"));
        assert!(
            numbers_as_floats(&crd) == numbers_as_floats(same),
            "the chart's CRD {name:?} differs from crds/: copy crds/*.yaml to charts/idemq/files/crds/"
        );
    }
}

#[test]
fn crds_install_false_renders_no_crd_but_the_operator() {
    let docs = render(&["--set", "crds.install=false"]);
    assert!(of_kind(&docs, "CustomResourceDefinition").is_empty());
    assert_eq!(of_kind(&docs, "Deployment").len(), 1);
}

#[test]
fn cluster_wide_by_default_and_namespaced_roles_when_namespaces_are_listed() {
    let names = |docs: &[Value], kind: &str| -> Vec<String> {
        of_kind(docs, kind)
            .iter()
            .map(|r| r["metadata"]["name"].as_str().expect("name").to_string())
            .collect()
    };
    let docs = render(&[]);
    // The operator's, and the webhook configuration's (a cluster object).
    assert_eq!(
        names(&docs, "ClusterRole"),
        ["idemq-operator", "idemq-operator-webhook"]
    );
    assert_eq!(names(&docs, "ClusterRoleBinding").len(), 2);
    // Only the leader-election Role, in the release namespace.
    let roles = of_kind(&docs, "Role");
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0]["metadata"]["namespace"], "idemq-system");

    let docs = render(&["--set", "watchNamespaces={payments,orders}"]);
    assert_eq!(names(&docs, "ClusterRole"), ["idemq-operator-webhook"]);
    assert_eq!(
        names(&docs, "ClusterRoleBinding"),
        ["idemq-operator-webhook"]
    );
    // A Role and its binding in each watched namespace, and the leader's in
    // the release namespace.
    for kind in ["Role", "RoleBinding"] {
        let mut placed: Vec<_> = of_kind(&docs, kind)
            .iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r["metadata"]["namespace"].as_str().expect("namespace"),
                    r["metadata"]["name"].as_str().expect("name")
                )
            })
            .collect();
        placed.sort();
        assert_eq!(
            placed,
            [
                "idemq-system/idemq-operator-leader",
                "orders/idemq-operator",
                "payments/idemq-operator"
            ],
            "{kind}s"
        );
    }
    let deployment = of_kind(&docs, "Deployment")[0];
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    for ns in ["payments", "orders"] {
        assert!(
            args.as_sequence()
                .expect("args")
                .contains(&Value::from(format!("--watch-namespace={ns}"))),
            "the operator is told to watch {ns}: {args:?}"
        );
    }
}

#[test]
fn network_policies_are_granted_only_the_verbs_a_zeromq_endpoint_needs() {
    let docs = render(&[]);
    let role = of_kind(&docs, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "idemq-operator")
        .expect("the operator's ClusterRole");
    let rules: Vec<&Value> = role["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter(|r| {
            r["apiGroups"]
                .as_sequence()
                .is_some_and(|g| g.contains(&Value::from("networking.k8s.io")))
        })
        .collect();
    assert_eq!(rules.len(), 1, "one networking rule: {rules:?}");
    assert_eq!(rules[0]["resources"], Value::from(vec!["networkpolicies"]));
    // Applied (created or patched), watched as an owned object, deleted when
    // no longer asked for; never updated or listed beyond that.
    assert_eq!(
        rules[0]["verbs"],
        Value::from(vec!["get", "list", "watch", "create", "patch", "delete"])
    );
}

#[test]
fn the_operator_runs_non_root_on_a_read_only_root_filesystem() {
    let docs = render(&[]);
    let pod = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0]["securityContext"];
    assert_eq!(container["readOnlyRootFilesystem"], true);
    assert_eq!(container["allowPrivilegeEscalation"], false);
    assert_eq!(container["capabilities"]["drop"][0], "ALL");
}

#[test]
fn a_wrong_value_fails_with_a_message_naming_it() {
    let refused = helm::template("idemq-system", &["--set", "crds.install=yes"])
        .expect_err("crds.install=yes was accepted");
    let stderr = refused.to_string();
    assert!(
        stderr.contains("crds") && stderr.contains("install"),
        "{stderr}"
    );
}

#[test]
fn the_operators_bounds_reach_its_environment_and_a_zero_bound_is_refused() {
    let docs = render(&[
        "--set",
        "concurrency.reconciles=4",
        "--set",
        "concurrency.brokerConnections=3",
    ]);
    let container = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    let env = |name: &str| {
        container["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_string))
    };
    assert_eq!(env("IDEMQ_MAX_CONCURRENT_RECONCILES").as_deref(), Some("4"));
    assert_eq!(env("IDEMQ_MAX_BROKER_CONNECTIONS").as_deref(), Some("3"));
    assert_eq!(env("IDEMQ_MAX_BROKER_OPERATIONS").as_deref(), Some("8"));
    assert_eq!(env("IDEMQ_BROKER_IDLE_TIMEOUT").as_deref(), Some("60s"));
    let refused = helm::template("idemq-system", &["--set", "concurrency.brokerOperations=0"])
        .expect_err("brokerOperations=0 was accepted");
    assert!(
        refused.to_string().contains("brokerOperations"),
        "{refused}"
    );
}

#[test]
fn the_webhook_takes_labelled_pods_only_fails_closed_and_its_rbac_names_its_objects() {
    let docs = render(&[]);
    let config = of_kind(&docs, "MutatingWebhookConfiguration");
    assert_eq!(config.len(), 1);
    let hook = &config[0]["webhooks"][0];
    assert_eq!(
        hook["objectSelector"]["matchLabels"]["idemq.dev/inject"],
        "enabled"
    );
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
    assert!(hook["timeoutSeconds"].as_u64().is_some_and(|t| t <= 10));
    assert_eq!(hook["rules"][0]["operations"][0], "CREATE");
    assert_eq!(hook["rules"][0]["resources"][0], "pods");
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0]["values"][0], "kube-system",
        "never kube-system"
    );
    let service = &hook["clientConfig"]["service"];
    let svc = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == service["name"])
        .expect("the webhook's Service");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "webhook");
    let container = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    assert!(container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .any(|p| p["name"] == "webhook" && p["containerPort"] == 9443));
    let args = container["args"].as_sequence().expect("args");
    assert!(args.contains(&Value::from(
        "--webhook-names=idemq-operator-webhook.idemq-system.svc"
    )));
    assert!(args.contains(&Value::from("--webhook-configuration=idemq-operator")));

    // Least privilege: the configuration and the Secret by name.
    let role = of_kind(&docs, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "idemq-operator-webhook")
        .expect("the webhook's ClusterRole");
    assert_eq!(
        role["rules"][0]["resourceNames"][0],
        config[0]["metadata"]["name"]
    );
    let leader = of_kind(&docs, "Role")[0];
    let secret_rules: Vec<&Value> = leader["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter(|r| r["resources"][0] == "secrets")
        .collect();
    assert_eq!(secret_rules.len(), 2);
    assert_eq!(secret_rules[0]["verbs"][0], "create");
    assert_eq!(
        secret_rules[1]["resourceNames"][0],
        "idemq-operator-webhook-tls"
    );

    let docs = render(&["--set", "webhook.enabled=false"]);
    assert!(of_kind(&docs, "MutatingWebhookConfiguration").is_empty());
    assert_eq!(of_kind(&docs, "ClusterRole").len(), 1);
    let args =
        &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(!format!("{args:?}").contains("--webhook"));
}

#[test]
fn with_cert_manager_the_chart_issues_the_certificate_and_the_operator_only_reads_it() {
    let docs = render(&["--set", "webhook.certManager.enabled=true"]);
    let config = of_kind(&docs, "MutatingWebhookConfiguration");
    assert_eq!(
        config[0]["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "idemq-system/idemq-operator-webhook",
        "cainjector writes the caBundle from the serving Certificate"
    );
    let service = &config[0]["webhooks"][0]["clientConfig"]["service"];
    let certificates = of_kind(&docs, "Certificate");
    let serving = certificates
        .iter()
        .find(|c| c["metadata"]["name"] == "idemq-operator-webhook")
        .expect("the serving Certificate");
    assert_eq!(serving["metadata"]["namespace"], "idemq-system");
    assert_eq!(
        serving["spec"]["dnsNames"][0].as_str(),
        Some(
            format!(
                "{}.{}.svc",
                service["name"].as_str().expect("name"),
                service["namespace"].as_str().expect("namespace")
            )
            .as_str()
        ),
        "the name the API server calls"
    );
    assert_eq!(serving["spec"]["secretName"], "idemq-operator-webhook-cert");
    // The default issuer: a CA of the release's own, kept across renewals.
    assert_eq!(
        serving["spec"]["issuerRef"]["name"],
        "idemq-operator-webhook-ca"
    );
    let issuers = of_kind(&docs, "Issuer");
    let ca_issuer = issuers
        .iter()
        .find(|i| i["metadata"]["name"] == "idemq-operator-webhook-ca")
        .expect("the CA Issuer");
    let ca = certificates
        .iter()
        .find(|c| c["spec"]["isCA"] == true)
        .expect("the CA Certificate");
    assert_eq!(
        ca_issuer["spec"]["ca"]["secretName"],
        ca["spec"]["secretName"]
    );
    assert_eq!(ca["spec"]["privateKey"]["rotationPolicy"], "Never");
    let selfsigned = issuers
        .iter()
        .find(|i| i["metadata"]["name"] == ca["spec"]["issuerRef"]["name"])
        .expect("the CA's Issuer");
    assert!(selfsigned["spec"]["selfSigned"].is_mapping());

    // The operator serves the Secret cert-manager writes, and nothing more.
    let args = of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .expect("args")
        .clone();
    assert!(args.contains(&Value::from("--webhook-external-cert")));
    assert!(args.contains(&Value::from("--webhook-secret=idemq-operator-webhook-cert")));
    assert!(!format!("{args:?}").contains("--webhook-configuration"));
    let cluster_roles: Vec<&Value> = of_kind(&docs, "ClusterRole")
        .iter()
        .map(|r| &r["metadata"]["name"])
        .collect();
    assert_eq!(
        cluster_roles,
        [&Value::from("idemq-operator")],
        "no rights on the webhook configuration"
    );
    assert!(!format!("{:?}", of_kind(&docs, "ClusterRole")).contains("mutatingwebhook"));
    let leader = of_kind(&docs, "Role")[0];
    let secret_rules: Vec<&Value> = leader["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter(|r| r["resources"][0] == "secrets")
        .collect();
    assert_eq!(secret_rules.len(), 1, "{secret_rules:?}");
    assert_eq!(secret_rules[0]["verbs"], Value::from(vec!["get"]));
    assert_eq!(
        secret_rules[0]["resourceNames"],
        Value::from(vec!["idemq-operator-webhook-cert"])
    );

    // An issuer of the platform's: no CA of the release's own.
    let docs = render(&[
        "--set",
        "webhook.certManager.enabled=true",
        "--set",
        "webhook.certManager.issuerRef.name=platform-ca",
        "--set",
        "webhook.certManager.issuerRef.kind=ClusterIssuer",
    ]);
    assert!(of_kind(&docs, "Issuer").is_empty());
    let certificates = of_kind(&docs, "Certificate");
    assert_eq!(certificates.len(), 1);
    let issuer = &certificates[0]["spec"]["issuerRef"];
    assert_eq!(
        (&issuer["name"], &issuer["kind"], &issuer["group"]),
        (
            &Value::from("platform-ca"),
            &Value::from("ClusterIssuer"),
            &Value::from("cert-manager.io")
        )
    );
    let refused = helm::template(
        "idemq-system",
        &[
            "--set",
            "webhook.certManager.enabled=true",
            "--set",
            "webhook.certManager.issuerRef.kind=ClusterIssuer",
        ],
    )
    .expect_err("a kind without a name");
    assert!(refused.to_string().contains("name"), "{refused}");

    // Without cert-manager, none of its resources.
    let docs = render(&[]);
    assert!(of_kind(&docs, "Certificate").is_empty() && of_kind(&docs, "Issuer").is_empty());
    assert!(config_annotations(&docs).is_null());
}

fn config_annotations(docs: &[Value]) -> Value {
    of_kind(docs, "MutatingWebhookConfiguration")[0]["metadata"]["annotations"].clone()
}
