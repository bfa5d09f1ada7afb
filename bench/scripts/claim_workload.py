"""A fixed key-store workload for counting what Redis spends on it.

Writes, for `redis-cli --pipe`, the script calls the sidecar makes for
MESSAGES messages in batches of BATCH (1 in 5 a duplicate of a completed key):
a claim call per batch, then a completion call for the keys it acquired, with
the argument layout of sidecar/src/store/redis.rs. Fixed keys, tokens and
batches: the same Redis work on every run, whatever the machine's load.

    python3 bench/scripts/claim_workload.py sidecar/src/store 16 5000 ns1 > w.resp
    valgrind --tool=callgrind --toggle-collect=readQueryFromClient \
      --toggle-collect=handleClientsWithPendingWritesUsingThreads \
      redis-server --port 6391 --save '' --appendonly no &
    redis-cli -p 6391 --pipe < w.resp; redis-cli -p 6391 shutdown nosave

With a fifth argument, a file, the script loads and the first batch go there
instead: send it, zero the counts (`callgrind_control -z <pid>`), then send
the rest, so that the one-time creation of the meta hash is left out. A sixth,
N, also marks N past windows as holding keys: a claim then looks in N + 1
windows, as once a consumer has run for a retention (the steady state).
"""
import hashlib, os, sys, time
scripts, batch, messages, ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
warmup = sys.argv[5] if len(sys.argv) > 5 else None
past_windows = int(sys.argv[6]) if len(sys.argv) > 6 else 0
read = lambda name: open(os.path.join(scripts, name)).read()
meta = read('meta.lua')
claim = meta + "\n" + read('claim.lua')
complete = meta + "\n" + read('complete.lua')
rest = sys.stdout.buffer
out = open(warmup, "wb") if warmup else rest
def cmd(*args):
    a = [x if isinstance(x, bytes) else str(x).encode() for x in args]
    out.write(b"*%d\r\n" % len(a))
    for x in a:
        out.write(b"$%d\r\n%s\r\n" % (len(x), x))
cs, ps = hashlib.sha1(claim.encode()).hexdigest(), hashlib.sha1(complete.encode()).hexdigest()
cmd("SCRIPT", "LOAD", claim); cmd("SCRIPT", "LOAD", complete)
prefix = ("idemq:{%s}:" % ns).encode()
R, L = 3600000, 30000
width = R // 4
def digest(k): return hashlib.sha256(k.encode()).digest()[:16]
def token(k): return hashlib.md5(k.encode()).hexdigest()
done, m, epoch = [], 0, ""
while m < messages:
    n = min(batch, messages - m)
    items = []
    for j in range(n):
        i = m + j
        if i % 5 == 4 and done:
            items.append((done[-1], False))
        else:
            items.append(("k%d" % i, True))
    m += n
    keys, args = [], [prefix, epoch, "e%015d" % m, width, "0", R]
    for k, fresh in items:
        d = digest(k)
        keys.append(prefix + b"p:" + d)
        args += [d[2:], b"", token(k), L]
    cmd("EVALSHA", cs, len(keys), *keys, *args)
    epoch = "e%015d" % batch  # first batch's candidate becomes the epoch
    fresh = [k for k, f in items if f]
    if not fresh: continue
    keys, args = [], [prefix, "e%015d" % m, width, 0, R]
    for k in fresh:
        d = digest(k)
        keys.append(prefix + b"p:" + d)
        args += [d[2:], token(k)]
    cmd("EVALSHA", ps, len(keys), *keys, *args)
    done = fresh
    if out is not rest:
        now_window = int(time.time() * 1000) // width
        for w in range(now_window - past_windows, now_window):
            cmd("HSET", prefix + b"m", "b:%d" % w, 12)
        out.close()
        out = rest
