# The Redis container's preStop hook: a pod that is stopped on purpose (a
# drain, a rolling update) and holds the primary hands it over first. It asks
# another pod's Sentinel for a failover (its own gets SIGTERM at once, having
# no hook), again until one takes it, and waits until every Sentinel still
# answering names another primary, so that the sidecars, whichever Sentinel
# they ask, move in a second or two instead of waiting out down-after (5 s)
# for a primary that is gone. This Redis then becomes the new primary's
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
# ask_failover: asks the other pods' Sentinels, in turn, until one takes the
# failover; says which did, or nothing (a Sentinel refuses while it does
# not yet see a replica fit to promote).
ask_failover() {
  for other in $IDEMQ_SENTINELS; do
    [ "$other" = "$own_sentinel" ] && continue
    answer=$(cli_at "$other" SENTINEL failover "$IDEMQ_PRIMARY_NAME" 2>&1) || continue
    if [ "$answer" = "OK" ]; then
      echo "$other"
      return 0
    fi
    echo "hand-over: Sentinel $other answered: $answer" >&2
  done
  return 0
}

# named_by_all: the primary that every Sentinel still answering names, or
# nothing while they differ. The Sentinel that fails over names the new
# primary first; the others learn it within a few seconds, and a sidecar
# may ask any of them.
named_by_all() {
  agreed=""
  for sentinel in $IDEMQ_SENTINELS; do
    named=$(named_by "$sentinel")
    [ -z "$named" ] && continue
    if [ -n "$agreed" ] && [ "$named" != "$agreed" ]; then
      return 0
    fi
    agreed=$named
  done
  echo "$agreed"
}

deadline=$(($(date +%s) + 20))
taken_by=""
while [ "$(date +%s)" -lt "$deadline" ]; do
  if [ -z "$taken_by" ]; then
    taken_by=$(ask_failover)
    [ -n "$taken_by" ] && echo "hand-over: Sentinel $taken_by fails $self over"
  fi
  now=$(named_by_all)
  if [ -n "$taken_by" ] && [ -n "$now" ] && [ "$now" != "$self" ]; then
    echo "hand-over: $now is the primary"
    cli_at "127.0.0.1:${self##*:}" REPLICAOF "${now%:*}" "${now##*:}" >/dev/null &&
      echo "hand-over: $self replicates $now until it stops"
    exit 0
  fi
  sleep 0.5
done
echo "hand-over: no other primary named by every Sentinel within 20 s; stopping anyway"
exit 0
