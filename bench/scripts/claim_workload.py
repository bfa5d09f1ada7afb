"""A fixed key-store workload for counting what Redis spends on it.

Writes, for `redis-cli --pipe`, the script calls the sidecar makes for
MESSAGES messages in batches of BATCH (1 in 5 a duplicate of a completed key),
with the argument layout of sidecar/src/store/redis.rs: one settle call per
batch that completes the keys the previous batch acquired and claims this
batch's keys, as under load, where completions and claims share a call.
Fixed keys, tokens and batches: the same Redis work on every run, whatever
the machine's load.

    python3 bench/scripts/claim_workload.py sidecar/src/store 16 5000 ns1 > w.resp
    valgrind --tool=callgrind --toggle-collect=evalShaCommand \
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
settle = read('meta.lua') + "\n" + read('settle.lua')
rest = sys.stdout.buffer
out = open(warmup, "wb") if warmup else rest
def cmd(*args):
    a = [x if isinstance(x, bytes) else str(x).encode() for x in args]
    out.write(b"*%d\r\n" % len(a))
    for x in a:
        out.write(b"$%d\r\n%s\r\n" % (len(x), x))
sha = hashlib.sha1(settle.encode()).hexdigest()
cmd("SCRIPT", "LOAD", settle)
prefix = ("idemq:{%s}:" % ns).encode()
R, L = 3600000, 30000
width = R // 4
def digest(k): return hashlib.sha256(k.encode()).digest()[:16]
def token(k): return hashlib.md5(k.encode()).hexdigest()
def settle_call(epoch, candidate, completing, claiming):
    keys, args = [], [prefix, epoch, candidate, width, "0", R, 0, len(completing)]
    for k in completing:
        d = digest(k)
        keys.append(prefix + b"p:" + d)
        args += [d[2:], token(k)]
    for k in claiming:
        d = digest(k)
        keys.append(prefix + b"p:" + d)
        args += [d[2:], b"", token(k), L]
    cmd("EVALSHA", sha, len(keys), *keys, *args)
done, acquired, m, epoch = [], [], 0, ""
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
    settle_call(epoch, "e%015d" % m, acquired, [k for k, _ in items])
    epoch = "e%015d" % batch  # first batch's candidate becomes the epoch
    if acquired:
        done = acquired
    acquired = [k for k, f in items if f]
    if out is not rest:
        now_window = int(time.time() * 1000) // width
        for w in range(now_window - past_windows, now_window):
            cmd("HSET", prefix + b"m", "b:%d" % w, 12)
        out.close()
        out = rest
settle_call(epoch, "e%015d" % m, acquired, [])
