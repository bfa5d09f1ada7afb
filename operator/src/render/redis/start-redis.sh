# Starts this pod's Redis as the primary or as a replica, and never as a
# second primary: the Sentinels are asked first, and a Sentinel that
# answers names the primary (after a failover, the promoted replica).
# Only when no Sentinel answers (the set is starting, or every pod was
# restarted at once) does pod 0 start as the primary, the others as its
# replicas. A replica of a lost primary is promoted by the Sentinels, not
# by this script.
self=$(nth "$IDEMQ_REDIS_NODES" "$ordinal")
primary=$(primary_from_sentinels)
if [ -z "$primary" ]; then
  primary=$(nth "$IDEMQ_REDIS_NODES" 0)
  echo "no Sentinel answers: $primary is the primary"
fi
if [ "$primary" = "$self" ]; then
  echo "starting $self as the primary"
  set --
else
  echo "starting $self as a replica of $primary"
  set -- --replicaof "${primary%:*}" "${primary##*:}"
fi
# masterauth on every node: any of them may become a replica. `exec` makes
# Redis PID 1, so SIGTERM reaches it and it flushes the append-only file.
# IDEMQ_MIN_REPLICAS 1 (durability: replicated): writes are refused while no
# replica has acknowledged for 4 s, less than the Sentinels' down-after (5 s),
# so a primary cut off from its replicas stops taking writes before another
# is promoted.
exec redis-server --port "${self##*:}" \
  --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD" \
  --replica-announce-ip "${self%:*}" --replica-announce-port "${self##*:}" \
  --dir "$IDEMQ_DATA_DIR" --appendonly yes --appendfsync "$IDEMQ_APPENDFSYNC" --save "" \
  --min-replicas-to-write "${IDEMQ_MIN_REPLICAS:-0}" --min-replicas-max-lag 4 \
  --maxmemory-policy noeviction ${IDEMQ_MAXMEMORY:+--maxmemory "$IDEMQ_MAXMEMORY"} "$@"
