# The Redis container's preStop hook: a pod that is stopped on purpose (a
# drain, a rolling update) and holds the primary hands it over first. It asks
# another pod's Sentinel for a failover (its own gets SIGTERM at once, having
# no hook) and waits until the Sentinels name another primary, so that the
# sidecars move in a second or two instead of waiting out down-after (5 s)
# for a primary that is gone. Once another is named, this Redis becomes its
# replica at once (the Sentinels would do so only later), so that a sidecar
# still connected to it is refused (READONLY) rather than write where the
# new primary will not see it; the sidecar writes a refused completion again.
# It is reached on 127.0.0.1: a terminating pod's name may no longer resolve.
# Bounded to 20 s, and it never fails the stop: the Sentinels replace a lost
# primary anyway.
self=$(nth "$IDEMQ_REDIS_NODES" "$ordinal")
own_sentinel=$(nth "$IDEMQ_SENTINELS" "$ordinal")
primary=$(primary_from_sentinels "$own_sentinel")
if [ "$primary" != "$self" ]; then
  echo "hand-over: $self is not the primary (${primary:-none named}): nothing to hand over"
  exit 0
fi
for sentinel in $IDEMQ_SENTINELS; do
  [ "$sentinel" = "$own_sentinel" ] && continue
  answer=$(timeout 2 redis-cli -h "${sentinel%:*}" -p "${sentinel##*:}" \
    -a "$REDIS_PASSWORD" --no-auth-warning \
    SENTINEL failover "$IDEMQ_PRIMARY_NAME" 2>&1) || continue
  if [ "$answer" = "OK" ]; then
    echo "hand-over: Sentinel $sentinel fails $self over"
    break
  fi
  echo "hand-over: Sentinel $sentinel answered: $answer"
done
waited=0
while [ "$waited" -lt 40 ]; do
  now=$(primary_from_sentinels "$own_sentinel")
  if [ -n "$now" ] && [ "$now" != "$self" ]; then
    echo "hand-over: $now is the primary"
    redis-cli -h 127.0.0.1 -p "${self##*:}" -a "$REDIS_PASSWORD" --no-auth-warning \
      REPLICAOF "${now%:*}" "${now##*:}" >/dev/null &&
      echo "hand-over: $self replicates $now until it stops"
    exit 0
  fi
  sleep 0.5
  waited=$((waited + 1))
done
echo "hand-over: no other primary named within 20 s; stopping anyway"
exit 0
