# Checks that Redis and RabbitMQ answer on loopback and starts them if not,
# installing them from Debian packages on a machine that lacks them.
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

ensure_redis() {
  port_open 6379 && redis-cli -h 127.0.0.1 ping | grep -q PONG && return 0
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port redis 6379 30
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

ensure_services() {
  echo "== services"
  ensure_redis
  ensure_rabbitmq
  echo "redis: $(redis-cli -h 127.0.0.1 ping), rabbitmq: $(rabbitmqctl status --formatter json 2>/dev/null | grep -o '"rabbitmq_version":"[^"]*"' || echo up)"
}
