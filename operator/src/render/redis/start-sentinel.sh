# Starts this pod's Sentinel. Sentinel rewrites its configuration file, so
# the file is written here, at every start, into IDEMQ_SENTINEL_DIR (a
# writable emptyDir: the root filesystem is read-only). It monitors the
# primary the other Sentinels name, or pod 0's Redis when none answers (the
# set is starting); the Sentinels then learn the replicas and each other
# from the primary.
self=$(nth "$IDEMQ_SENTINELS" "$ordinal")
primary=$(primary_from_sentinels "$self")
if [ -z "$primary" ]; then
  primary=$(nth "$IDEMQ_REDIS_NODES" 0)
fi
echo "Sentinel $self monitors $IDEMQ_PRIMARY_NAME at $primary"
name=$IDEMQ_PRIMARY_NAME
conf=$IDEMQ_SENTINEL_DIR/sentinel.conf
# Quorum 2 of 3: one lost pod leaves enough Sentinels to agree on a
# failover. Host names, not addresses: a pod's address changes when it is
# re-created, its name does not.
cat > "$conf" <<CONF
port ${self##*:}
dir $IDEMQ_SENTINEL_DIR
requirepass $REDIS_PASSWORD
sentinel sentinel-pass $REDIS_PASSWORD
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${self%:*}
sentinel announce-port ${self##*:}
sentinel monitor $name ${primary%:*} ${primary##*:} 2
sentinel auth-pass $name $REDIS_PASSWORD
sentinel down-after-milliseconds $name 5000
sentinel failover-timeout $name 20000
sentinel parallel-syncs $name 1
CONF
# `redis-server --sentinel`: the same as redis-sentinel, which not every
# installation links.
exec redis-server "$conf" --sentinel
