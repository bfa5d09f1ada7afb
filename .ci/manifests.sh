#!/usr/bin/env bash
# Lints and renders the Helm chart, and validates every manifest offline
# against the Kubernetes schemas: the chart rendered with default and with
# non-trivial values, crds/, examples/ (our resources against the CRD's schema
# and CEL rules), and what `idemq-operator inject` prints for each example.
# Needs `bash .ci/tools.sh` and a built operator.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=.tools/bin/helm
VALIDATE=".tools/venv/bin/kubernetes-validate --strict --kubernetes-version 1.33.0"
PY=.tools/venv/bin/python
OPERATOR=${IDEMQ_OPERATOR:-${CARGO_TARGET_DIR:-target}/debug/idemq-operator}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== helm lint"
$HELM lint --strict charts/idemq
$HELM lint --strict charts/idemq -f charts/idemq/ci/full-values.yaml
$HELM lint --strict charts/idemq --set webhook.certManager.enabled=true

echo "== helm template"
$HELM template idemq charts/idemq --namespace idemq-system > "$out/chart-default.yaml"
$HELM template idemq charts/idemq --namespace idemq-system -f charts/idemq/ci/full-values.yaml > "$out/chart-full.yaml"
# The webhook's certificate issued by cert-manager: the release's own CA, and a platform issuer.
$HELM template idemq charts/idemq --namespace idemq-system --set webhook.certManager.enabled=true > "$out/chart-certmanager.yaml"
$HELM template idemq charts/idemq --namespace idemq-system --set webhook.certManager.enabled=true \
  --set webhook.certManager.issuerRef.name=platform-ca --set webhook.certManager.issuerRef.kind=ClusterIssuer > "$out/chart-certmanager-issuer.yaml"

echo "== a wrong value is refused by values.schema.json"
if $HELM template idemq charts/idemq --set replicaCount=0 > /dev/null 2> "$out/refused.txt"; then
  echo "replicaCount=0 was accepted" >&2
  exit 1
fi
grep -q "replicaCount" "$out/refused.txt" || { cat "$out/refused.txt" >&2; exit 1; }
echo "refused as expected: $(grep -m1 -o 'replicaCount.*' "$out/refused.txt")"

echo "== promtool check rules (the chart's alerts)"
.tools/bin/promtool check rules charts/idemq/files/alerts.yaml
$PY - "$out/chart-full.yaml" "$out/rules.yaml" <<'PY'
import sys, yaml
rules = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
assert len(rules) == 1, f"{len(rules)} PrometheusRules rendered with the full values"
yaml.safe_dump(rules[0]["spec"], open(sys.argv[2], "w"))
PY
.tools/bin/promtool check rules "$out/rules.yaml"

echo "== idemq-operator inject on every example"
for example in examples/*.yaml; do
  name=$(basename "$example" .yaml)
  # Split each example into its workload and its policy.
  $PY - "$example" "$out/$name" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    kind = "policy" if d["kind"] == "IdempotentConsumer" else "workload"
    open(f"{sys.argv[2]}.{kind}.yaml", "w").write(yaml.safe_dump(d))
PY
  "$OPERATOR" inject --policy "$out/$name.policy.yaml" -f "$out/$name.workload.yaml" > "$out/$name.injected.yaml"
done

echo "== kubernetes-validate"
files=("$out"/chart-*.yaml crds/*.yaml examples/*.yaml "$out"/*.injected.yaml)
report=$($VALIDATE "${files[@]}" 2>&1) || { echo "$report"; exit 1; }
echo "$report" | grep -v "Couldn't find schema for kind \(IdempotentConsumer\|ServiceMonitor\|PodMonitor\|PrometheusRule\|Certificate\|Issuer\)" || true
passed=$(echo "$report" | grep -c ' passed for resource ' || true)
echo "kubernetes-validate: $passed resources passed"
$PY .ci/validate_custom.py crds/idempotentconsumers.idemq.dev.yaml examples/*.yaml

# refused FILE WHAT MESSAGE...: the CRD's CEL rules must refuse FILE (WHAT
# names it in the error), and say each MESSAGE; prints the refusals.
refused() {
  local file=$1 what=$2 report="${1%.yaml}.cel.txt"
  shift 2
  if $PY .ci/validate_custom.py crds/idempotentconsumers.idemq.dev.yaml "$file" > "$report"; then
    cat "$report" >&2
    echo "$what was accepted" >&2
    exit 1
  fi
  for message in "$@"; do
    grep -q "$message" "$report" || { cat "$report" >&2; exit 1; }
  done
  grep FAIL "$report"
}

echo "== the CRD's CEL rules refuse a resource with two brokers and a Kafka messageId key"
$PY - examples/kafka.yaml examples/rabbitmq-managed-redis.yaml "$out/two-brokers.yaml" <<'PY'
import sys, yaml
kafka, rabbit = ([d for d in yaml.safe_load_all(open(p)) if d and d["kind"] == "IdempotentConsumer"][0] for p in sys.argv[1:3])
kafka["spec"]["broker"]["rabbitmq"] = rabbit["spec"]["broker"]["rabbitmq"]
kafka["spec"]["key"] = {"from": "messageId"}
yaml.safe_dump(kafka, open(sys.argv[3], "w"))
PY
refused "$out/two-brokers.yaml" "a resource with two brokers" "exactly one broker" "no message id"

echo "== the CRD's CEL rules refuse a JetStream resource with a Kafka key"
$PY - examples/jetstream.yaml "$out/jetstream-record-key.yaml" <<'PY'
import sys, yaml
js = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "IdempotentConsumer"][0]
js["spec"]["key"] = {"from": "recordKey"}
yaml.safe_dump(js, open(sys.argv[2], "w"))
PY
refused "$out/jetstream-record-key.yaml" "a JetStream resource keyed by recordKey" "with JetStream use messageId"

echo "== the CRD's CEL rules refuse an MQTT 3.1.1 resource keyed by messageId (3.1.1 has no properties)"
$PY - examples/mqtt.yaml "$out/mqtt-311.yaml" <<'PY'
import sys, yaml
mqtt = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "IdempotentConsumer"][0]
mqtt["spec"]["broker"]["mqtt"]["protocol"] = "v3.1.1"
mqtt["spec"]["key"] = {"from": "messageId"}
yaml.safe_dump(mqtt, open(sys.argv[2], "w"))
PY
refused "$out/mqtt-311.yaml" "an MQTT 3.1.1 resource keyed by messageId" "3.1.1 messages have no properties"

echo "== the CRD's CEL rules refuse rollout: evict with injection: workload"
$PY - examples/rabbitmq-managed-redis.yaml "$out/rollout-workload.yaml" <<'PY'
import sys, yaml
ic = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "IdempotentConsumer"][0]
ic["spec"]["rollout"] = "evict"
yaml.safe_dump(ic, open(sys.argv[2], "w"))
PY
refused "$out/rollout-workload.yaml" "rollout: evict with injection: workload" "rollout: evict is for injection: pod"
echo "== the CRD's CEL rules refuse a Pub/Sub resource keyed by a header, or with nowhere for dead letters"
$PY - examples/pubsub.yaml "$out/pubsub-header.yaml" <<'PY'
import sys, yaml
ps = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "IdempotentConsumer"][0]
ps["spec"]["key"] = {"from": "header", "name": "event-id"}
del ps["spec"]["broker"]["pubsub"]["deadLetterPolicy"]
yaml.safe_dump(ps, open(sys.argv[2], "w"))
PY
refused "$out/pubsub-header.yaml" "a Pub/Sub resource keyed by a header, without a dead-letter route," "Pub/Sub messages carry attributes" "dead letters need somewhere to go"

echo "== the CRD's CEL rules refuse a ZeroMQ resource with neither CURVE keys nor plain: true, or keyed by a Kafka key"
$PY - examples/zeromq.yaml "$out/zeromq-neither.yaml" <<'PY'
import sys, yaml
z = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "IdempotentConsumer"][0]
del z["spec"]["broker"]["zeromq"]["curve"]
z["spec"]["key"] = {"from": "recordKey"}
yaml.safe_dump(z, open(sys.argv[2], "w"))
PY
refused "$out/zeromq-neither.yaml" "a ZeroMQ resource without keys or plain: true" "not both, not neither" "with ZeroMQ use messageId"

echo "== the CRD's CEL rules refuse a ZeroMQ resource with two dead-letter targets, or a RabbitMQ one with both exchange and queue"
$PY - examples/zeromq-kafka-dead-letters.yaml "$out/zeromq-two-dead.yaml" "$out/zeromq-rabbit-both.yaml" <<'PY'
import sys, yaml
z = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "IdempotentConsumer"][0]
z["spec"]["broker"]["zeromq"]["deadLetter"]["endpoint"] = "tcp://dead.shop.svc:5556"
yaml.safe_dump(z, open(sys.argv[2], "w"))
z["spec"]["broker"]["zeromq"]["deadLetter"] = {"rabbitmq": {
    "connectionSecretRef": {"name": "rabbitmq-dead"}, "exchange": "idemq.dlx", "queue": "metrics.dead"}}
yaml.safe_dump(z, open(sys.argv[3], "w"))
PY
refused "$out/zeromq-two-dead.yaml" "a ZeroMQ resource (two-dead)" "exactly one dead-letter target"
refused "$out/zeromq-rabbit-both.yaml" "a ZeroMQ resource (rabbit-both)" "exactly one of exchange (with routingKey) or queue"

echo "== the CRD's CEL rules refuse managed.replicas 1, replicas with ephemeral, and durability replicated with one managed Redis"
$PY - examples/managed-redis-ha.yaml "$out" <<'PY'
import copy, sys, yaml
ic = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "IdempotentConsumer"][0]
cases = {
    "one-replica": {"replicas": 1},
    "ephemeral-replicas": {"replicas": 2, "ephemeral": True},
    "replicated-without-replicas": {},
}
for case, managed in cases.items():
    doc = copy.deepcopy(ic)
    doc["spec"]["store"]["managed"] = managed
    yaml.safe_dump(doc, open(f"{sys.argv[2]}/ha-{case}.yaml", "w"))
PY
refused "$out/ha-one-replica.yaml" "a managed store (one-replica)" "managed.replicas must be 0 (one Redis) or at least 2"
refused "$out/ha-ephemeral-replicas.yaml" "a managed store (ephemeral-replicas)" "managed.replicas needs the durable store"
refused "$out/ha-replicated-without-replicas.yaml" "a managed store (replicated-without-replicas)" "store.durability replicated needs replicas"
