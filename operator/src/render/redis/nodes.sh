# What the start scripts of a managed store with replicas share: where every
# pod's Redis and Sentinel is, and which primary the Sentinels name.
#
# Environment (the StatefulSet sets it; a test sets it to run pods on
# loopback): POD_NAME, whose ordinal suffix is the pod's place in the lists;
# IDEMQ_REDIS_NODES and IDEMQ_SENTINELS, host:port of every pod's Redis and
# Sentinel in ordinal order; IDEMQ_PRIMARY_NAME, the name the Sentinels
# monitor the primary under; REDIS_PASSWORD, the store's password, which
# the Sentinels ask for too.
set -eu

ordinal=${POD_NAME##*-}

# nth LIST N: the Nth word (from 0) of LIST.
nth() {
  i=0
  for word in $1; do
    if [ "$i" -eq "$2" ]; then
      echo "$word"
      return 0
    fi
    i=$((i + 1))
  done
  echo "no entry $2 in \"$1\"" >&2
  return 1
}

# cli_at HOST:PORT COMMAND...: COMMAND sent to the Redis or Sentinel at
# HOST:PORT, given up after 2 seconds (its pod may be gone).
cli_at() {
  cli_host=${1%:*}
  cli_port=${1##*:}
  shift
  timeout 2 redis-cli -h "$cli_host" -p "$cli_port" \
    -a "$REDIS_PASSWORD" --no-auth-warning "$@"
}

# named_by SENTINEL: host:port of the primary as SENTINEL names it, or
# nothing when it does not answer or names none.
named_by() {
  answer=$(cli_at "$1" SENTINEL get-master-addr-by-name "$IDEMQ_PRIMARY_NAME" 2>/dev/null) || return 0
  # An answer is two lines, host and port; an error or nil is not.
  set -- $answer
  [ "$#" -eq 2 ] || return 0
  case $2 in '' | *[!0-9]*) return 0 ;; esac
  echo "$1:$2"
}

# primary_from_sentinels [SKIP]: host:port of the primary as the first
# Sentinel that answers names it (leaving out SKIP, a Sentinel's own
# address), or nothing when none answers.
primary_from_sentinels() {
  for sentinel in $IDEMQ_SENTINELS; do
    [ "$sentinel" = "${1:-}" ] && continue
    named=$(named_by "$sentinel")
    if [ -n "$named" ]; then
      echo "$named"
      return 0
    fi
  done
  return 0
}
