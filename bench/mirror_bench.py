"""The pull-through mirror rows of bench/run.py (issue 14).

- The upstream: CNCF distribution 2.8.2 (`docker-registry`), filesystem driver, on loopback,
  its access log on (it writes a line per request once the response is sent); every upstream
  request is counted from that log. A berth mirror (`proxy:` with the prefix `up/`, ttl 10m) on
  Garage, its own bucket and data dir, `blob_serving: proxy`.
- Cold: each repetition pushes a fresh image (one 64 MiB layer of its own random bytes) to the
  upstream with skopeo, then starts 32 curls at once on that blob through the mirror, none of
  which the mirror holds yet. Each body is hashed as it arrives (sha256 in the harness, the
  curl's stdout a pipe): the row records the upstream blob GETs (the target: 1), how many bodies
  were complete and digest-correct, the aggregate MB/s (32 x size / wall), berth's peak RSS
  (VmHWM, reset before) and the object-store requests (Garage's counters). The same 32 GETs are
  then made once more, now cached, with the same hashing client: what the miss costs.
- Warm: an image of 3 x 64 MiB pushed to the upstream, pulled once through the mirror (cold,
  filling it), then pushed to an ordinary repository of the same berth (the same digests: the
  same objects in the bucket). Then skopeo pulls (to `oci:`, as the core pull rows) through the
  mirror and from the ordinary repository, rounds interleaved with the order alternating, after
  one untimed round; the upstream's access log must show no blob GET during them.

`section()` takes the run module (`B`) for its helpers, so that every process it starts is
stopped by the run's cleanup.
"""
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
import urllib.request

MiB = 1 << 20
PREFIX = "up/"
BUCKET = "berth-mirror"
CONCURRENT = 32
LAYER = 64 * MiB
TTL = "10m"
REPS = {True: 3, False: 5}  # cold repetitions (a fresh layer each)
PULL_ROUNDS = {True: 3, False: 7}  # warm pull rounds (one mirror and one ordinary pull each)
ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) ')


# ------------------------------------------------------------------------------------------
# the upstream's access log and berth's mirror metrics

class AccessLog:
    """Requests distribution logged (its combined access log, in its log file)."""

    def __init__(self, path):
        self.path = path

    def mark(self):
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def since(self, mark, settle=0.5):
        """[(method, path, status)] logged after `mark` (after `settle` s: a line is written when
        its response has been sent)."""
        time.sleep(settle)
        with open(self.path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return [(m.group(1), m.group(2), int(m.group(3))) for m in ACCESS.finditer(text)]


def blob_gets(requests, digest=None):
    return sum(1 for meth, path, _ in requests
               if meth == "GET" and "/blobs/sha256:" in path and (digest is None or path.endswith(digest)))


def manifest_requests(requests):
    return sum(1 for _, path, _ in requests if "/manifests/" in path)


def mirror_metrics(reg):
    """berth_mirror_* series of berth's /metrics: {name{labels}: value}."""
    with urllib.request.urlopen(reg.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(berth_mirror_\S+) (\S+)$", text, re.M)}


def metrics_delta(before, after):
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in sorted(d.items()) if v}


# ------------------------------------------------------------------------------------------
# clients

def hashed_gets(url, n, timeout=600):
    """n curls at once on `url`, each body hashed (sha256) by a thread of the harness as it
    arrives. Returns ([(http code, bytes, sha256 hex)], wall seconds)."""
    procs, threads, out = [], [], [None] * n

    def read(i, p):
        h, size = hashlib.sha256(), 0
        while True:
            b = p.stdout.read(MiB)
            if not b:
                break
            h.update(b)
            size += len(b)
        out[i] = [None, size, h.hexdigest()]

    t = time.monotonic()
    try:
        for i in range(n):
            p = subprocess.Popen(["curl", "-s", "-o", "-", "-w", "%{stderr}%{http_code}", url],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(p)
            th = threading.Thread(target=read, args=(i, p), daemon=True)
            th.start()
            threads.append(th)
        for i, (p, th) in enumerate(zip(procs, threads)):
            th.join(max(1, timeout - (time.monotonic() - t)))
            if th.is_alive():
                raise RuntimeError(f"GET {url}: a download took more than {timeout} s")
            _, err = p.communicate(timeout=max(1, timeout - (time.monotonic() - t)))
            out[i][0] = int((err.decode().strip().split() or ["0"])[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [tuple(x) for x in out], time.monotonic() - t


def _check_bodies(bodies, size, digest):
    want = digest.split(":", 1)[1]
    good = sum(1 for code, n, h in bodies if code == 200 and n == size and h == want)
    return good, len({h for _, _, h in bodies}) == 1


# ------------------------------------------------------------------------------------------
# the section

def section(B, P, work, garage, berth_bin, quick):
    """Runs the pull-through mirror rows; returns their results (R["mirror"])."""
    reps, rounds = REPS[bool(quick)], PULL_ROUNDS[bool(quick)]
    d = os.path.join(work, "mirror")
    imgdir = os.path.join(d, "images")
    os.makedirs(imgdir, exist_ok=True)
    G = {"params": {"reps": reps, "pull_rounds": rounds, "concurrent": CONCURRENT, "layer": LAYER,
                    "prefix": PREFIX, "ttl": TTL, "pull_layers": list(P["layers"])}}
    # A bucket of its own: no Garage block another path stored, no other berth's journal.
    garage.cli("bucket", "create", BUCKET)
    garage.cli("bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", garage.key_id)
    upstream = B.dist_registry("mirror-upstream", work, B.free_port(),
                               f"  filesystem:\n    rootdirectory: {os.path.join(d, 'upstream-root')}",
                               access_log=True)
    upstream.start()
    alog = AccessLog(upstream.logfile)
    proxy = f"proxy:\n  - prefix: {PREFIX}\n    remoteurl: {upstream.base}\n    ttl: {TTL}\n"
    mirror = B.berth_registry("berth-mirror", berth_bin, work, garage, BUCKET, B.free_port(), "proxy",
                              os.path.join(work, "berth-mirror", "data"), extra=proxy)
    mirror.start()
    B.log(f"mirror: upstream distribution (filesystem) on {upstream.port}, berth mirror on {mirror.port} "
          f"(prefix {PREFIX})")
    try:
        _cold(B, G, garage, upstream, alog, mirror, imgdir, reps)
        _warm(B, P, G, garage, upstream, alog, mirror, imgdir, d, rounds)
    finally:
        mirror.stop()
        upstream.stop()
        shutil.rmtree(imgdir, ignore_errors=True)
    return G


def _cold(B, G, garage, upstream, alog, mirror, imgdir, reps):
    rows = {"cold": [], "cached": []}
    for i in range(reps):
        img = B.make_image(os.path.join(imgdir, f"cold{i}"), [LAYER])
        repo = f"bench/cold{i}"
        B.skopeo_push(img, upstream, repo)
        layer = img["layers"][0]
        digest, size = layer["digest"], layer["size"]
        url = f"{mirror.base}/v2/{PREFIX}{repo}/blobs/{digest}"
        os.sync()
        for kind in ("cold", "cached"):
            mark, m0, s0 = alog.mark(), mirror_metrics(mirror), garage.counters()
            mirror.reset_hwm()
            cpu0, g0 = B.cpu_seconds(mirror.pid), B.cpu_seconds(garage.proc.pid)
            bodies, wall = hashed_gets(url, CONCURRENT)
            cpu, gcpu, hwm = B.cpu_seconds(mirror.pid) - cpu0, B.cpu_seconds(garage.proc.pid) - g0, mirror.hwm()
            reqs = alog.since(mark)
            s3 = B.counter_delta(s0, garage.counters())
            good, same = _check_bodies(bodies, size, digest)
            row = {"upstream_blob_gets": blob_gets(reqs, digest), "upstream_blob_gets_all": blob_gets(reqs),
                   "upstream_requests": len(reqs), "bodies_ok": good, "identical": int(same),
                   "mbps": CONCURRENT * size / wall / 1e6, "seconds": wall, "hwm": hwm, "cpu_s": cpu,
                   "garage_cpu_s": gcpu, "s3_gets": s3.get("GetObject", 0),
                   "s3_writes": sum(v for k, v in s3.items() if k != "GetObject"),
                   "s3": s3, "metrics": metrics_delta(m0, mirror_metrics(mirror))}
            rows[kind].append(row)
            B.log(f"mirror {kind} {i}: {CONCURRENT} x GET {size / MiB:.0f} MiB: {row['upstream_blob_gets']} upstream "
                  f"blob GET(s), {good}/{CONCURRENT} bodies digest-correct, {row['mbps']:.0f} MB/s aggregate, "
                  f"{wall:.2f} s, berth peak RSS {hwm / MiB:.1f} MiB, S3 GETs {row['s3_gets']}")
            if good != CONCURRENT:
                bad = [b for b in bodies if b[0] != 200 or b[1] != size]
                B.log(f"mirror {kind} {i}: bad bodies (code, bytes): {[(c, n) for c, n, _ in bad][:8]}")
        shutil.rmtree(img["path"], ignore_errors=True)
    G["cold"] = {k: B._agg(v) for k, v in rows.items()}


def _warm(B, P, G, garage, upstream, alog, mirror, imgdir, d, rounds):
    img = B.make_image(os.path.join(imgdir, "pull"), P["layers"])
    G["image_bytes"] = img["bytes"]
    B.skopeo_push(img, upstream, "bench/pull")
    dest = os.path.join(d, "pulled")
    repos = {"mirror": f"{PREFIX}bench/pull", "normal": "bench/pull"}

    # the cold pull through the mirror (fills it), once
    os.sync()
    mark = alog.mark()
    mirror.reset_hwm()
    secs = B.skopeo_pull(mirror, repos["mirror"], img["tag"], dest)
    reqs = alog.since(mark)
    G["cold_pull"] = {"seconds": secs, "mbps": img["bytes"] / secs / 1e6, "hwm": mirror.hwm(),
                      "upstream_blob_gets": blob_gets(reqs), "upstream_manifest_requests": manifest_requests(reqs),
                      "upstream_requests": len(reqs), "blobs": 1 + len(img["layers"])}
    B.log(f"mirror: cold pull through the mirror {secs:.2f} s, {G['cold_pull']['upstream_blob_gets']} upstream "
          f"blob GETs for {G['cold_pull']['blobs']} blobs")
    # the same image in an ordinary repository of the same berth
    B.skopeo_push(img, mirror, repos["normal"])

    rows = {"mirror": [], "normal": []}
    mark_all = alog.mark()
    for rnd in range(rounds + 1):  # round 0: untimed warm-up
        order = ("mirror", "normal") if rnd % 2 == 0 else ("normal", "mirror")
        for kind in order:
            os.sync()
            mark, s0 = alog.mark(), garage.counters()
            mirror.reset_hwm()
            cpu0 = B.cpu_seconds(mirror.pid)
            secs = B.skopeo_pull(mirror, repos[kind], img["tag"], dest)
            cpu, hwm = B.cpu_seconds(mirror.pid) - cpu0, mirror.hwm()
            reqs = alog.since(mark, settle=0.2)
            s3 = B.counter_delta(s0, garage.counters())
            if rnd:
                rows[kind].append({"seconds": secs, "mbps": img["bytes"] / secs / 1e6, "hwm": hwm, "cpu_s": cpu,
                                   "s3_gets": s3.get("GetObject", 0), "upstream_blob_gets": blob_gets(reqs),
                                   "upstream_requests": len(reqs)})
    shutil.rmtree(dest, ignore_errors=True)
    reqs = alog.since(mark_all, settle=0)
    G["warm"] = {k: B._agg(v) for k, v in rows.items()}
    G["warm_upstream"] = {"blob_gets": blob_gets(reqs), "manifest_requests": manifest_requests(reqs),
                          "requests": len(reqs), "pulls": 2 * (rounds + 1)}
    w = G["warm"]
    B.log(f"mirror: warm pull through the mirror {B.fmt(w['mirror']['mbps'])} MB/s, from the ordinary "
          f"repository {B.fmt(w['normal']['mbps'])} MB/s; upstream during them: "
          f"{G['warm_upstream']['blob_gets']} blob GETs, {G['warm_upstream']['requests']} requests")


# ------------------------------------------------------------------------------------------
# targets and report

def targets(R, add, med):
    G = R.get("mirror")
    if not G:
        return
    n, size = G["params"]["concurrent"], G["params"]["layer"] // MiB
    c = G["cold"]["cold"]
    ups = c["upstream_blob_gets"]
    # Every repetition, not only the median, must have made exactly one upstream GET.
    add(f"{n} concurrent GETs of one uncached {size} MiB layer through a mirror -> 1 upstream blob GET "
        "(every repetition)", med(ups), "GETs", "== 1", ups["min"] == 1 and ups["max"] == 1,
        note=f"{ups['min']:.0f}-{ups['max']:.0f} over {ups['n']} repetitions" if ups["min"] != ups["max"] else "")
    ok = c["bodies_ok"]
    add(f"(info) those {n} bodies complete and digest-correct (fewest in a repetition)", ok["min"], "bodies",
        f"({n})", ok["min"] == n and c["identical"]["min"] == 1, info=True)
    cached = G["cold"]["cached"]
    r = med(c["mbps"]) / med(cached["mbps"])
    # The miss adds the leader's upstream fetch (the others wait for it): a reference of 10%.
    add(f"(info) {n} concurrent GETs of an uncached {size} MiB layer through the mirror: aggregate vs the same "
        "GETs once cached", med(c["mbps"]), "MB/s", "(0.9x)", r >= 0.9, r, info=True)
    h = med(c["hwm"]) / MiB
    add(f"(info) {n} concurrent GETs of an uncached {size} MiB layer through the mirror: berth peak RSS", h, "MiB",
        "(< 128 MiB)", h < 128, info=True)
    w = G["warm"]
    r = med(w["mirror"]["mbps"]) / med(w["normal"]["mbps"])
    u = G["warm_upstream"]
    add("a warm mirror serves a pull (skopeo, 3x64 MiB) as fast as a normal pull from the same berth",
        med(w["mirror"]["mbps"]), "MB/s", ">= 0.95x", r >= 0.95, r,
        note=f"not warm: {u['blob_gets']} upstream blob GETs during the pulls" if u["blob_gets"] else "")
    add(f"(info) upstream blob GETs during the {u['pulls']} warm pulls", u["blob_gets"], "GETs", "(0)",
        u["blob_gets"] == 0, info=True)
    pr = _paired(w["mirror"]["mbps"], w["normal"]["mbps"])
    if pr is not None:
        add("(info) warm mirror pull / normal pull, median of per-round ratios", med(w["mirror"]["mbps"]), "MB/s",
            "(0.95x)", pr >= 0.95, pr, info=True)


def _paired(a, b):
    """Median over rounds of a_i / b_i (the rounds are interleaved); None if unpaired."""
    if not a or not b or len(a["samples"]) != len(b["samples"]):
        return None
    return statistics.median(x / y for x, y in zip(a["samples"], b["samples"]))


def report(R, w, fmt):
    G = R.get("mirror")
    if not G:
        return
    p = G["params"]
    mib = 1 / MiB
    n, size = p["concurrent"], p["layer"] // MiB
    w("## Pull-through mirror\n")
    w(f"Upstream: distribution 2.8.2 (`docker-registry`), filesystem driver, on loopback, its access log on: "
      "every upstream request below is counted from it. Mirror: a berth on Garage (a bucket of its own) with "
      f"`proxy: [{{prefix: {p['prefix']}, remoteurl: <upstream>, ttl: {p['ttl']}}}]`, `blob_serving: proxy`.\n")
    w(f"### {n} concurrent GETs of one uncached {size} MiB layer\n")
    w(f"Each of {p['reps']} repetitions pushes a fresh image (one {size} MiB layer of its own random bytes) to the "
      f"upstream, then starts {n} curls at once on that blob through the mirror (`cold`), then the same {n} "
      "again, now cached (`cached`). Every body is hashed (sha256) by the harness as it arrives, through a pipe "
      "from curl: the client costs more CPU than `curl -o /dev/null`. Aggregate = "
      f"{n} × size / wall. Peak RSS: berth's VmHWM, reset before.\n")
    w("| GETs | upstream blob GETs | bodies digest-correct | aggregate MB/s | wall s | berth peak RSS MiB | "
      "berth CPU s | Garage CPU s | S3 GETs | other S3 requests |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, s in G["cold"].items():
        w(f"| {kind} | {fmt(s['upstream_blob_gets'])} | {fmt(s['bodies_ok'])} of {n} | {fmt(s['mbps'])} | "
          f"{fmt(s['seconds'], 2)} | {fmt(s['hwm'], 1, mib)} | {fmt(s['cpu_s'], 2)} | {fmt(s['garage_cpu_s'], 2)} | "
          f"{fmt(s['s3_gets'])} | {fmt(s['s3_writes'])} |")
    m = G["cold"]["cold"]["metrics"][0]
    w("\nberth's mirror counters during the first cold repetition: "
      + (", ".join(f"`{k}` +{v:,.0f}" for k, v in m.items()) or "none") + ".\n")
    cp, u = G["cold_pull"], G["warm_upstream"]
    w("### Pull from a warm mirror vs an ordinary repository (skopeo)\n")
    w(f"An image of {len(p['pull_layers'])} × {p['pull_layers'][0] // MiB} MiB pushed to the upstream, pulled once "
      f"through the mirror to fill it ({cp['seconds']:.2f} s, {cp['mbps']:,.0f} MB/s; {cp['upstream_blob_gets']} "
      f"upstream blob GETs for its {cp['blobs']} blobs), then pushed to an ordinary repository of the same berth "
      "(the same digests: the same objects in the bucket). Then `skopeo copy` to `oci:` through the mirror and "
      f"from the ordinary repository, {p['pull_rounds']} rounds interleaved with the order alternating, "
      f"after one untimed round. During those {u['pulls']} pulls the upstream logged {u['blob_gets']} blob GETs and "
      f"{u['manifest_requests']} manifest requests ({u['requests']} requests in all).\n")
    w("| pull | MB/s | wall s | berth peak RSS MiB | berth CPU s | S3 GETs | upstream blob GETs |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, s in G["warm"].items():
        label = "warm mirror" if kind == "mirror" else "ordinary repository"
        w(f"| {label} | {fmt(s['mbps'])} | {fmt(s['seconds'], 2)} | {fmt(s['hwm'], 1, mib)} | {fmt(s['cpu_s'], 2)} | "
          f"{fmt(s['s3_gets'])} | {fmt(s['upstream_blob_gets'])} |")
    w("")
