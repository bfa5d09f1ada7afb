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
"""
import hashlib, os, sys
scripts, batch, messages, ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
read = lambda name: open(os.path.join(scripts, name)).read()
meta = read('meta.lua')
claim = meta + "\n" + read('claim.lua')
complete = meta + "\n" + read('complete.lua')
out = sys.stdout.buffer
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
    keys, args = [], [prefix, epoch, "e%015d" % m, width, "0"]
    for k, fresh in items:
        d = digest(k)
        keys.append(prefix + b"p:" + d)
        args += [d[2:], int.from_bytes(d[:3], "big"), b"", token(k), L, R]
    cmd("EVALSHA", cs, len(keys), *keys, *args)
    epoch = "e%015d" % batch  # first batch's candidate becomes the epoch
    fresh = [k for k, f in items if f]
    if not fresh: continue
    keys, args = [], [prefix, "e%015d" % m, width, 0]
    for k in fresh:
        d = digest(k)
        keys.append(prefix + b"p:" + d)
        args += [d[2:], int.from_bytes(d[:3], "big"), token(k), R]
    cmd("EVALSHA", ps, len(keys), *keys, *args)
    done = fresh
