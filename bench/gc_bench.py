"""The garbage-collection rows of bench/run.py (issue 11): berth's collector on a registry of
many small images, and distribution's offline `garbage-collect` on the same layout.

- A synthetic distribution filesystem layout (bench/import_layout.py's `write_layout`: N
  images of 4 small layers + a config, one manifest and tag each, no blob shared) is adopted by
  `berth import --from-dir` into berth's embedded object store (hard links; the layout and the
  objects on /dev/shm, meta.redb on the run's disk) and redb; a first `berth gc` pass drains
  what the import queued (every adopted blob and manifest is a candidate), a second one, after
  a restart, what the journal replay queued again; then berth is stopped and its data dir
  snapshotted (meta.redb copied, objects hard-linked), so that every repetition starts from the
  same registry.
- Each repetition: berth restored from the snapshot and started (`gc.blob_grace: 0s`, so what
  the deletes free is due at once), `DELETE` of D manifests by digest over HTTP (8 at a time),
  then one timed `berth gc --json` (the pass runs inside `berth serve`: the command asks it
  through `metrics.listen`), berth's peak RSS being the serving process's VmHWM, reset
  (`5` > /proc/PID/clear_refs) just before. Then the same with `berth gc --full`. Every pass is
  checked: the report's counts, the deleted images' blob files gone from the embedded store,
  a sample of the others still there and served.
- Pushes while collection runs: fresh images (own bytes) pushed with skopeo, rounds
  interleaved (the order alternating), each once with `--full` passes running back to back for
  the whole push (`POST /gc?full=true`, what `berth gc --full` sends) and once with none (`gc.blob_grace: 1h` there: a pass must never
  take the blobs of a push still under way).
- distribution 2.8.2 (`docker-registry`), filesystem driver, on a hard-linked copy of the same
  layout: the same D manifests deleted through its API, then `docker-registry garbage-collect`
  (offline: it needs the registry stopped or read-only) timed, with its peak RSS (wait4).

`section()` takes the run module (`B`) for its helpers, so that every process it starts is
stopped by the run's cleanup.
"""
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import import_layout

MiB = 1 << 20
V2 = "docker/registry/v2"
BUCKET = "registry"
BLOBS_PER_IMAGE = 5  # 4 layers + a config (write_layout's B)
SIZES = {False: {"images": 20000, "deletes": 1000}, True: {"images": 2000, "deletes": 100}}
DELETE_THREADS = 8
CATCH_UP_MARGIN = 60  # seconds: src/meta/journal.rs CATCH_UP_MARGIN


# ------------------------------------------------------------------------------------------
# processes

def _measured(B, name, argv, out_path, timeout, env=None):
    """Runs argv to completion (stdout and stderr to out_path, registered for the run's
    cleanup); returns (exit code, wall seconds, peak RSS bytes of that process from wait4)."""
    t = time.monotonic()
    p = B.start(name, argv, out_path, env=env)
    try:
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - t > timeout:
                raise RuntimeError(f"{name} took more than {timeout} s: see {out_path}")
            time.sleep(0.02)
    finally:
        B.stop_named(p)
    return p.returncode, time.monotonic() - t, ru.ru_maxrss * 1024


def _reg_conf(listen, data_dir, metrics_port, grace, log_level="info"):
    # The embedded object store (no storage.endpoint), redb, the bucket journal on (defaults).
    return f"""listen: 127.0.0.1:{listen}
data_dir: {data_dir}
threads: 2
log_level: {log_level}
shutdown_grace: 1s
access_log: false
metrics:
  listen: 127.0.0.1:{metrics_port}
storage:
  bucket: {BUCKET}
gc:
  blob_grace: {grace}
  untagged_manifests: keep
"""


class Berth:
    """`berth serve` on the embedded object store, with its config file for `berth gc`."""

    def __init__(self, B, berth_bin, d, name, data_dir, grace):
        self.B, self.bin, self.name, self.data_dir = B, berth_bin, name, data_dir
        self.port, self.metrics_port = B.free_port(), B.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.conf = os.path.join(d, f"{name}.yaml")
        self.log = os.path.join(d, f"{name}.log")
        with open(self.conf, "w") as f:
            f.write(_reg_conf(self.port, data_dir, self.metrics_port, grace))
        B.run([berth_bin, "check-config", "--config", self.conf], timeout=30)
        self.proc = None

    def start(self):
        t = time.monotonic()
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        # SIGINT: pingora exits at once (SIGTERM would wait for the grace period).
        self.proc = self.B.start(self.name, [self.bin, "serve", "--config", self.conf], self.log,
                                 signal.SIGINT, env)
        self.B.wait_http(self.base + "/v2/", self.proc, seconds=1800)
        self.B.wait_http(f"http://127.0.0.1:{self.metrics_port}/healthz", self.proc, seconds=60)
        return time.monotonic() - t

    def stop(self):
        if self.proc:
            self.B.stop_named(self.proc)
            self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def status(self):
        return self.B.proc_memory(self.pid)

    def queue_length(self):
        """Candidates queued now (a dry-run pass reports it and changes nothing)."""
        r = self.B.run([self.bin, "gc", "--config", self.conf, "--json", "--dry-run"], timeout=600)
        return json.loads(r.stdout.strip().splitlines()[-1])["queue_length"]

    def gc(self, full=False, timeout=1800):
        """One timed `berth gc --json` [--full]; returns the row (report, wall, server RSS)."""
        argv = [self.bin, "gc", "--config", self.conf, "--json"] + (["--full"] if full else [])
        out = os.path.join(os.path.dirname(self.conf), f"gc-{time.monotonic_ns()}.json")
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        before = self.status()["VmRSS"]
        cpu0 = self.B.cpu_seconds(self.pid)
        code, wall, client_rss = _measured(self.B, "berth gc", argv, out, timeout)
        cpu = self.B.cpu_seconds(self.pid) - cpu0
        hwm = self.status()["VmHWM"]
        with open(out) as f:
            text = f.read()
        os.unlink(out)
        if code != 0:
            raise RuntimeError(f"berth gc{' --full' if full else ''} failed ({code}): {text}")
        report = json.loads(text.strip().splitlines()[-1])
        return {"seconds": wall, "pass_s": report["seconds"], "hwm": hwm, "rss_before": before,
                "cpu_s": cpu, "client_hwm": client_rss, "blobs": report["blobs"]["count"],
                "blob_bytes": report["blobs"]["bytes"], "repositories": report["repositories"],
                "manifests": report["manifests"]["count"], "links": report["links"],
                "queued": report["queued"], "queue_length": report["queue_length"],
                "notes": report["notes"]}


# ------------------------------------------------------------------------------------------
# the layout and the checks

def _image(root, i):
    """(repo, manifest digest, [blob digests]) of image i of write_layout, read from the layout."""
    repo = f"bench/img{i:05d}"
    d = os.path.join(root, V2, "repositories", repo)
    (manifest,) = os.listdir(os.path.join(d, "_manifests/revisions/sha256"))
    blobs = ["sha256:" + h for h in sorted(os.listdir(os.path.join(d, "_layers/sha256")))]
    if len(blobs) != BLOBS_PER_IMAGE:
        raise RuntimeError(f"{repo}: {len(blobs)} blobs in the layout, expected {BLOBS_PER_IMAGE}")
    return repo, "sha256:" + manifest, blobs


def _blob_file(root, digest):
    h = digest.split(":", 1)[1]
    return os.path.join(root, V2, "blobs/sha256", h[:2], h, "data")


def _delete(B, base, images, who):
    """DELETE /v2/<repo>/manifests/<digest> of every image, DELETE_THREADS at a time."""
    def one(img):
        repo, digest, _ = img
        req = urllib.request.Request(f"{base}/v2/{repo}/manifests/{digest}", method="DELETE")
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    t = time.monotonic()
    with ThreadPoolExecutor(DELETE_THREADS) as ex:
        codes = list(ex.map(one, images))
    bad = [c for c in codes if c != 202]
    if bad:
        raise RuntimeError(f"{who}: {len(bad)} manifest DELETEs answered {sorted(set(bad))}, not 202")
    return time.monotonic() - t


def _status(url, headers=None, method="GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _check_berth(B, reg, row, deleted, kept, full):
    """Fails loudly unless the pass deleted exactly the deleted images' blobs."""
    what = f"berth gc{' --full' if full else ''}"
    want = len(deleted) * BLOBS_PER_IMAGE
    if row["notes"]:
        raise RuntimeError(f"{what}: {row['notes']}")
    if row["blobs"] != want or row["repositories"] != len(deleted) or row["queue_length"] != 0:
        raise RuntimeError(f"{what}: deleted {row['blobs']} blobs and {row['repositories']} repositories "
                           f"({row['queue_length']} still queued); expected {want} and {len(deleted)}, 0 queued")
    bucket = os.path.join(reg.data_dir, "objects", BUCKET)
    left = [d for _, _, blobs in deleted for d in blobs if os.path.exists(_blob_file(bucket, d))]
    if left:
        raise RuntimeError(f"{what}: {len(left)} blob files of deleted images still in the embedded store, "
                           f"e.g. {_blob_file(bucket, left[0])}")
    gone = [d for _, _, blobs in kept for d in blobs if not os.path.exists(_blob_file(bucket, d))]
    if gone:
        raise RuntimeError(f"{what}: {len(gone)} blob files of kept images are gone, e.g. {gone[0]}")
    accept = {"Accept": B.OCI_MANIFEST}
    for repo, digest, blobs in kept[:10]:
        for url, h in ((f"{reg.base}/v2/{repo}/manifests/latest", accept),
                       (f"{reg.base}/v2/{repo}/blobs/{blobs[0]}", None)):
            if _status(url, h) != 200:
                raise RuntimeError(f"{what}: GET {url} of a kept image does not answer 200")
    for repo, digest, _ in deleted[:10]:
        code = _status(f"{reg.base}/v2/{repo}/manifests/{digest}", accept)
        if code != 404:
            raise RuntimeError(f"{what}: GET {repo}@{digest} of a deleted image answered {code}, not 404")


class Store:
    """berth's data dir (meta.redb, on the run's disk: its fsyncs are real) with its `objects`
    (the embedded object store) a symlink into `scratch`, where the layout is too (hard links
    need one filesystem). The root filesystem here is mounted with `discard`: every block freed
    there costs a synchronous discard (~2 ms per removed directory measured), which would make
    each restore of 100,000+ hard-linked blob directories take minutes; /dev/shm (tmpfs) has
    none. s3s-fs never fsyncs, so its files cost the same on either (page cache)."""

    def __init__(self, B, data, scratch):
        self.B, self.data, self.scratch = B, data, scratch
        self.snap_meta = data + ".snapshot"
        self.snap_objects = os.path.join(scratch, "objects-snapshot")
        self.objects = os.path.join(scratch, "objects")
        self.n = 0

    def fresh(self):
        os.makedirs(self.data)
        os.makedirs(self.objects)
        os.symlink(self.objects, os.path.join(self.data, "objects"))

    def _clear(self):
        shutil.rmtree(self.data, ignore_errors=True)
        shutil.rmtree(self.objects, ignore_errors=True)

    def snapshot(self):
        """Keeps the stopped berth's state for restore(): its objects as they are (moved aside),
        everything else in data_dir copied."""
        shutil.rmtree(self.snap_meta, ignore_errors=True)
        shutil.rmtree(self.snap_objects, ignore_errors=True)
        os.rename(self.objects, self.snap_objects)
        os.unlink(os.path.join(self.data, "objects"))
        self.B.run(["cp", "-a", self.data, self.snap_meta], timeout=1800)
        shutil.rmtree(self.data)
        self.restore()

    def restore(self):
        """The snapshot again: data_dir copied, objects hard-linked (blob files and journal
        records are written once, never in place; the store's own top-level files copied)."""
        t = time.monotonic()
        self._clear()
        self.B.run(["cp", "-a", self.snap_meta, self.data], timeout=1800)
        self.B.run(["cp", "-al", self.snap_objects, self.objects], timeout=1800)
        for name in os.listdir(self.objects):
            p = os.path.join(self.objects, name)
            if os.path.isfile(p):
                shutil.copy2(p, p + ".copy")
                os.replace(p + ".copy", p)
        os.symlink(self.objects, os.path.join(self.data, "objects"))
        return time.monotonic() - t

    def remove(self):
        self._clear()
        shutil.rmtree(self.snap_meta, ignore_errors=True)
        shutil.rmtree(self.snap_objects, ignore_errors=True)


def _scratch(work):
    """A directory on tmpfs (/dev/shm) when it has room, else in the work dir."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 8 * 1024 * MiB:
            return tempfile.mkdtemp(prefix="berth-gc-bench-", dir="/dev/shm"), True
    except OSError:
        pass
    d = os.path.join(work, "gc-scratch")
    os.makedirs(d, exist_ok=True)
    return d, False


# ------------------------------------------------------------------------------------------
# pushes while passes run

class GcLoop:
    """`--full` passes back to back until stop(), each asked of the server as `berth gc` does
    (`POST /gc?full=true` on its metrics.listen; from a thread here, so that no process start
    per pass competes with the push); records each pass's interval."""

    def __init__(self, reg):
        self.url = f"http://127.0.0.1:{reg.metrics_port}/gc?dry_run=false&full=true&orphans=false"
        self.passes, self.errors = [], []
        self._stop = threading.Event()
        self._started = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            self._started.set()
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, method="POST"), timeout=1800) as r:
                    report = json.loads(r.read())
            except (OSError, ValueError) as e:
                self.errors.append(str(e))
                break
            if report.get("notes"):
                self.errors.append(f"notes: {report['notes']}")
                break
            self.passes.append((t0, time.monotonic()))

    def start(self):
        self._t.start()
        self._started.wait(30)
        time.sleep(0.1)  # the first pass under way in the server

    def stop(self):
        self._stop.set()
        self._t.join(1900)
        if self.errors:
            raise RuntimeError(f"gc --full passes during pushes failed: {self.errors[0]}")

    def covered(self, t0, t1):
        """Fraction of [t0, t1] during which a pass ran."""
        busy = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self.passes)
        return busy / (t1 - t0)


def _push_rows(B, P, work, reg, quick):
    rounds = P["reps"] if quick else max(5, P["reps"])
    imgdir = os.path.join(work, "gc-images")
    rows = {"idle": [], "collecting": []}
    for i in range(rounds):
        order = ("idle", "collecting") if i % 2 == 0 else ("collecting", "idle")
        for mode in order:
            img = B.make_image(os.path.join(imgdir, f"gc-{mode}{i}"), P["layers"])
            os.sync()
            loop = None
            if mode == "collecting":
                loop = GcLoop(reg)
                loop.start()
            t0 = time.monotonic()
            try:
                secs = B.skopeo_push(img, reg, f"bench/gcpush-{mode}{i}")
            finally:
                t1 = time.monotonic()
                if loop:
                    loop.stop()
            row = {"seconds": secs, "mbps": img["bytes"] / secs / 1e6}
            if loop:
                row["gc_passes"] = sum(1 for a, b in loop.passes if b > t0 and a < t1)
                row["gc_covered"] = loop.covered(t0, t1)
                if not loop.passes:
                    raise RuntimeError("no gc pass finished during a push")
            rows[mode].append(row)
            shutil.rmtree(img["path"], ignore_errors=True)
            # The pushed image is all there (a pass must not have taken any of its blobs).
            repo = f"{reg.base}/v2/bench/gcpush-{mode}{i}"
            urls = [f"{repo}/manifests/{img['tag']}"] + [f"{repo}/blobs/{b}" for b in
                                                          [img["config"]] + [x["digest"] for x in img["layers"]]]
            if any(_status(u, {"Accept": B.OCI_MANIFEST}, "HEAD") != 200 for u in urls):
                raise RuntimeError(f"push during gc: bench/gcpush-{mode}{i} is not all there")
    return {k: B._agg(v) for k, v in rows.items()}, rounds


# ------------------------------------------------------------------------------------------
# distribution

def _dist_pass(B, work, scratch, k, dist_root, deleted, kept):
    """distribution on a hard-linked copy of the layout: API deletes, then offline GC (timed)."""
    root = os.path.join(scratch, f"dist-root{k}")
    shutil.rmtree(root, ignore_errors=True)
    B.run(["cp", "-al", dist_root, root], timeout=1800)
    name = f"gc-dist{k}"
    reg = B.dist_registry(name, work, B.free_port(), f"  filesystem:\n    rootdirectory: {root}")
    reg.start()
    try:
        delete_s = _delete(B, reg.base, deleted, "distribution")
    finally:
        reg.stop()
    conf = os.path.join(work, name, "config.yml")
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    out = os.path.join(work, name, "garbage-collect.log")
    os.sync()
    code, wall, hwm = _measured(B, "docker-registry garbage-collect", ["docker-registry", "garbage-collect", conf],
                                out, 3600, env=env)
    if code != 0:
        with open(out, errors="replace") as f:
            raise RuntimeError(f"docker-registry garbage-collect failed ({code}): {f.read()[-2000:]}")
    with open(out, errors="replace") as f:
        eligible = sum(1 for line in f if "blob eligible for deletion" in line)
    left = [d for _, _, blobs in deleted for d in blobs if os.path.exists(_blob_file(root, d))]
    gone = [d for _, _, blobs in kept for d in blobs if not os.path.exists(_blob_file(root, d))]
    if left or gone or eligible < len(deleted) * (BLOBS_PER_IMAGE + 1):
        raise RuntimeError(f"distribution's garbage-collect: {eligible} blobs eligible, {len(left)} blob files "
                           f"of deleted images left, {len(gone)} of kept images gone: see {out}")
    shutil.rmtree(root, ignore_errors=True)
    return {"seconds": wall, "hwm": hwm, "blobs": eligible, "delete_s": delete_s}


# ------------------------------------------------------------------------------------------
# the section

def section(B, P, work, berth_bin, quick):
    """Runs the garbage-collection rows; returns their results (R["gc"])."""
    size = SIZES[bool(quick)]
    n_img, n_del = size["images"], size["deletes"]
    d = os.path.join(work, "gc")
    os.makedirs(d, exist_ok=True)
    scratch, on_tmpfs = _scratch(work)
    G = {"params": {"images": n_img, "blobs": n_img * BLOBS_PER_IMAGE, "manifests": n_img,
                    "deletes": n_del, "quick": bool(quick), "reps": P["reps"],
                    "delete_threads": DELETE_THREADS, "objects_on_tmpfs": on_tmpfs}}
    store = Store(B, os.path.join(d, "data"), scratch)
    try:
        _measure(B, P, work, berth_bin, quick, G, d, scratch, store)
    finally:
        store.remove()
        shutil.rmtree(scratch, ignore_errors=True)
    return G


def _measure(B, P, work, berth_bin, quick, G, d, scratch, store):
    n_img, n_del = G["params"]["images"], G["params"]["deletes"]
    dist_root = os.path.join(scratch, "dist-layout")

    # ---- the registry: the layout, imported, the import's candidates drained
    t = time.monotonic()
    import_layout.write_layout(dist_root, n_img, BLOBS_PER_IMAGE)
    G["layout_s"] = time.monotonic() - t
    B.log(f"gc: layout of {n_img:,} images x {BLOBS_PER_IMAGE} blobs written in {G['layout_s']:.1f} s")
    step = n_img // n_del
    deleted = [_image(dist_root, k * step) for k in range(n_del)]
    kept = [_image(dist_root, k * step + step // 2) for k in range(0, n_del, max(1, n_del // 100))]
    G["params"]["kept_sample"] = len(kept)

    store.fresh()
    reg = Berth(B, berth_bin, d, "berth-gc", store.data, "0s")
    t = time.monotonic()
    r = B.run([berth_bin, "import", "--config", reg.conf, "--from-dir", dist_root], timeout=7200)
    G["import_s"] = time.monotonic() - t
    G["import_summary"] = r.stdout.strip()
    if (f"manifests: {n_img} added" not in r.stdout or f"{n_img * BLOBS_PER_IMAGE} new blobs" not in r.stdout
            or "bytes copied: 0" not in r.stdout):
        raise RuntimeError(f"berth import did not adopt the whole layout by hard links:\n{r.stdout}\n{r.stderr}")
    B.log(f"gc: berth import in {G['import_s']:.1f} s")
    import_end = time.time()
    try:
        # The first pass drains what the import queued (every adopted blob, every manifest).
        G["start_s"] = reg.start()
        first = reg.gc(timeout=7200)
        if first["blobs"] != 0 or first["queue_length"] != 0:
            raise RuntimeError(f"gc: the first pass after the import deleted {first['blobs']} blobs, "
                               f"left {first['queue_length']} queued")
        G["first_pass"] = first
        B.log(f"gc: first pass after the import (drains its candidates): {first['seconds']:.1f} s, "
              f"RSS {first['hwm'] / MiB:.1f} MiB")
        reg.stop()
        # At start berth replays the journal records from its watermark less a minute
        # (journal::CATCH_UP_MARGIN), and a replayed write queues its candidates again: started
        # again once the import's records are older than that, berth sets a watermark that
        # leaves them out of every later start, and a second pass drains what that start queued.
        time.sleep(max(0.0, import_end + CATCH_UP_MARGIN + 1 - time.time()))
        reg.start()
        again = reg.gc(timeout=7200)
        G["replay_pass"] = again
        B.log(f"gc: pass after a restart: {again['seconds']:.1f} s")
    finally:
        reg.stop()
    store.snapshot()

    # ---- timed passes, each on the restored registry after the same deletes
    rows = {"pass": [], "full": []}
    try:
        for i in range(P["reps"]):
            for kind in ("pass", "full"):
                restore_s = store.restore() if rows["pass"] else 0.0
                start_s = reg.start()
                queued = reg.queue_length()
                if queued:
                    raise RuntimeError(f"gc: the restored registry has {queued} candidates queued before the deletes")
                delete_s = _delete(B, reg.base, deleted, "berth")
                row = reg.gc(full=kind == "full")
                _check_berth(B, reg, row, deleted, kept, kind == "full")
                row.update({"restore_s": restore_s, "start_s": start_s, "delete_s": delete_s})
                rows[kind].append(row)
                reg.stop()
                B.log(f"gc: {'--full ' if kind == 'full' else ''}pass after {n_del} deletes: "
                      f"{row['seconds']:.2f} s, berth peak RSS {row['hwm'] / MiB:.1f} MiB, "
                      f"{row['blobs']} blobs deleted (restore {restore_s:.1f} s, start {start_s:.1f} s, "
                      f"deletes {delete_s:.1f} s)")
    finally:
        reg.stop()
    for kind, v in rows.items():
        G[kind] = B._agg(v)

    # ---- pushes with and without passes running (grace 1h), on the restored registry
    store.restore()
    preg = Berth(B, berth_bin, d, "berth-gc-push", store.data, "1h")
    try:
        preg.start()
        G["push"], G["push_rounds"] = _push_rows(B, P, work, preg, quick)
    finally:
        preg.stop()
    B.log(f"gc: push {B.fmt(G['push']['idle']['mbps'])} MB/s idle, "
          f"{B.fmt(G['push']['collecting']['mbps'])} MB/s with --full passes running")
    store.remove()

    # ---- distribution's garbage-collect on (a hard-linked copy of) the same layout
    if shutil.which("docker-registry"):
        G["dist_version"] = B.version_of(["docker-registry", "--version"])
        rows = [_dist_pass(B, work, scratch, k, dist_root, deleted, kept) for k in range(P["reps"])]
        G["dist"] = B._agg(rows)
        B.log(f"gc: distribution garbage-collect {B.fmt(G['dist']['seconds'], 1)} s, "
              f"peak RSS {B.fmt(G['dist']['hwm'], 1, 1 / MiB)} MiB")


def _size(G):
    p = G["params"]
    return (f"{p['blobs']:,} blobs / {p['manifests']:,} manifests after {p['deletes']:,} manifest deletes"
            + (" (--quick size)" if p["quick"] else ""))


def targets(R, add, med):
    G = R.get("gc")
    if not G:
        return
    size = _size(G)
    note = "--quick: a tenth of the target's registry" if G["params"]["quick"] else ""
    s = med(G["pass"]["seconds"])
    add(f"GC pass over {size} < 10 s", s, "s", "< 10 s", s < 10, note=note)
    h = med(G["pass"]["hwm"]) / MiB
    add("berth peak RSS during that pass < 100 MiB", h, "MiB", "< 100 MiB", h < 100, note=note)
    f = med(G["full"]["seconds"])
    add(f"GC --full pass over {size} < 60 s", f, "s", "< 60 s", f < 60, note=note)
    fh = med(G["full"]["hwm"]) / MiB
    add("(info) berth peak RSS during the --full pass", fh, "MiB", "(< 100 MiB)", fh < 100, info=True)
    p = G["push"]
    r = med(p["collecting"]["mbps"]) / med(p["idle"]["mbps"])
    add("pushes (3x64 MiB, skopeo) while --full passes run back to back lose <= 10% throughput",
        med(p["collecting"]["mbps"]), "MB/s", ">= 0.9x", r >= 0.9, r,
        note="2 cores shared by berth, skopeo and the collector" if (R.get("meta", {}).get("cpus") or 0) <= 2 else "")
    dg = G.get("dist")
    if dg:
        ds = med(dg["seconds"])
        add("(info) GC pass: distribution garbage-collect (offline) time / berth's incremental pass", ds, "s",
            "(1x)", ds >= s, ds / s, info=True)
        add("(info) GC pass: distribution garbage-collect (offline) time / berth's --full pass", ds, "s",
            "(1x)", ds >= f, ds / f, info=True)
        dh = med(dg["hwm"]) / MiB
        add("(info) GC pass: distribution garbage-collect peak RSS / berth's (incremental pass)", dh, "MiB",
            "(1x)", dh >= h, dh / h, info=True)


def report(R, w, fmt):
    G = R.get("gc")
    if not G:
        return
    p = G["params"]
    mib = 1 / MiB
    where = ("in /dev/shm: the root filesystem here is mounted with `discard`, and each restore would "
             "otherwise free 100,000+ directories at ~2 ms each" if p["objects_on_tmpfs"] else "in the work dir")
    starts = G["pass"].get("start_s")
    w(f"## Garbage collection ({_size(G)})\n")
    w(f"A distribution filesystem layout of {p['images']:,} images (4 small layers + a config each, one manifest "
      "and tag, no blob shared; bench/import_layout.py) adopted by `berth import --from-dir` into berth's "
      f"embedded object store (hard links, {where}; s3s-fs never fsyncs) and redb (`meta.redb` on the "
      "run's disk: its fsyncs are real); the bucket journal on, `log_level: info` (a line per deleted object). "
      f"Import: {G['import_s']:.0f} s; berth's first start after it {G['start_s']:.0f} s (the journal catch-up "
      "lists the journal through the embedded store, whose ListObjectsV2 walks and sorts the whole prefix for "
      f"every page), later starts {fmt(starts, 1)} s. A first pass drains the candidates the import queued; "
      "berth is then restarted once the import's journal records are older than the catch-up margin (a "
      "replayed record queues its candidates again) and a second pass drains what that start queued. That "
      "registry is snapshotted; each repetition restores it (checking that no candidate is queued), starts "
      f"berth with `gc.blob_grace: 0s`, deletes the same {p['deletes']:,} manifests by digest over HTTP "
      f"({p['delete_threads']} at a time; every {p['images'] // p['deletes']}th image) and times one "
      "`berth gc --json` (the pass runs inside `berth serve`, which the command asks through "
      "`metrics.listen`). Peak RSS: VmHWM of the serving process, reset just before the pass. Each pass "
      f"is checked: {p['deletes'] * BLOBS_PER_IMAGE:,} blobs and {p['deletes']:,} repositories deleted, nothing "
      f"left queued, the deleted images' blob files gone from the embedded store, {p['kept_sample']} other "
      "images' files still there (10 of them served).\n")
    w("| pass | wall s | pass s (berth's report) | berth peak RSS MiB | RSS before MiB | berth CPU s | "
      "blobs deleted | repositories removed | strays queued |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    once = [("first_pass", f"first after the import (drains {p['blobs']:,} + {p['manifests']:,} candidates; once)"),
            ("replay_pass", "after the restart (drains what the journal replay queued; once)")]
    for key, label in once:
        x = G.get(key)
        if x:
            w(f"| {label} | {x['seconds']:.2f} | {x['pass_s']:.2f} | {x['hwm'] * mib:.1f} | "
              f"{x['rss_before'] * mib:.1f} | {x['cpu_s']:.2f} | {x['blobs']} | {x['repositories']} | {x['queued']} |")
    for kind, label in (("pass", "incremental"), ("full", "`--full`")):
        s = G[kind]
        w(f"| {label} | {fmt(s['seconds'], 2)} | {fmt(s['pass_s'], 2)} | {fmt(s['hwm'], 1, mib)} | "
          f"{fmt(s['rss_before'], 1, mib)} | {fmt(s['cpu_s'], 2)} | {fmt(s['blobs'])} | {fmt(s['repositories'])} | "
          f"{fmt(s['queued'])} |")
    dg = G.get("dist")
    if dg:
        w(f"| distribution `garbage-collect` (offline) | {fmt(dg['seconds'], 2)} | | {fmt(dg['hwm'], 1, mib)} | | | "
          f"{fmt(dg['blobs'])} (manifests included) | | |")
        w(f"\ndistribution: {G['dist_version']}, filesystem driver on a hard-linked copy of the same layout "
          "(same place), the same manifests deleted through its API (untimed), then `docker-registry "
          "garbage-collect CONFIG` timed with its peak RSS (wait4). It marks and sweeps everything every time, "
          "with the registry stopped or read-only; its blob store holds the manifests too "
          f"({p['blobs'] + p['manifests']:,} blobs).")
    pu = G["push"]
    w(f"\nPushes of 3 × 64 MiB fresh images (skopeo), {G['push_rounds']} rounds interleaved (order alternating), "
      "each once with no pass and once while `--full` passes run back to back in `berth serve` (`POST /gc?full=true` "
      f"on its metrics listener, what `berth gc --full` sends; `gc.blob_grace: 1h`; a full pass walks all "
      f"{p['blobs']:,} blobs), on the restored registry:\n")
    w("| pushes | MB/s | wall s | passes during the push | share of the push under a pass |")
    w("| --- | ---: | ---: | ---: | ---: |")
    for k, s in pu.items():
        cov = s.get("gc_covered")
        w(f"| {k} | {fmt(s['mbps'])} | {fmt(s['seconds'], 2)} | {fmt(s.get('gc_passes')) if cov else ''} | "
          f"{fmt(cov, 0, 100) + ' %' if cov else ''} |")
    w("")
