"""The embedded default against distribution's filesystem driver: rows of bench/run.py (issue 12).

- berth as a newcomer runs it: no `storage.endpoint`, so blobs live in the local object store
  under `data_dir/objects` (files read and written directly), metadata in redb, the bucket
  journal on; `threads: 2`, access log off. distribution 2.8.2 (`docker-registry`) with
  `storage.filesystem`, access log off. Both on loopback, on the same 2 cores, same images.
- push: skopeo copies an OCI layout of 3 x 64 MiB (`--preserve-digests`, so no gzip in the
  client) to each; a fresh image every round (the same one to both registries), `sync` before
  each push so that no push pays for the writeback of another.
- pull: skopeo copies the first pushed image back to an `oci:` directory, rounds interleaved,
  the order alternating.
- blob GET: one curl (`-o /dev/null`) of a 64 MiB layer and of a big one (1 GiB; 256 MiB with
  --quick), rounds interleaved after one untimed round; the registry's peak RSS (VmHWM, reset
  before every GET) beside it: flat in blob size is the target.
- manifest GET: wrk on CPU 1, the registry pinned to CPU 0, as the core manifest rows.

`section()` takes the run module (`B`) for its helpers, so that every process it starts is
stopped by the run's cleanup.
"""
import os
import shutil
import signal

MiB = 1 << 20
ROUNDS = {True: 3, False: 5}  # push and pull rounds
GET_ROUNDS = {True: 5, False: 9}  # 64 MiB GET rounds
BIG_ROUNDS = {True: 3, False: 5}
BIG = {True: 256 * MiB, False: 1024 * MiB}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _berth(B, berth_bin, work, name):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    port, metrics_port = B.free_port(), B.free_port()
    # No storage section beyond the defaults: the embedded (local) object store.
    conf = f"""listen: 127.0.0.1:{port}
data_dir: {os.path.join(d, 'data')}
threads: 2
log_level: warn
shutdown_grace: 1s
access_log: false
metrics:
  listen: 127.0.0.1:{metrics_port}
"""
    path = os.path.join(d, "berth.yaml")
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    reg = B.Registry(name, "berth", port, [berth_bin, "serve", "--config", path], conf, path,
                     os.path.join(d, "berth.log"), env=env, stop_sig=signal.SIGINT)
    B.run([berth_bin, "check-config", "--config", path], timeout=30)
    return reg


def section(B, P, work, berth_bin, quick):
    """Runs the embedded-default rows; returns their results (R["local"])."""
    quick = bool(quick)
    rounds, get_rounds, big_rounds, big = ROUNDS[quick], GET_ROUNDS[quick], BIG_ROUNDS[quick], BIG[quick]
    d = os.path.join(work, "local")
    imgdir = os.path.join(d, "images")
    os.makedirs(imgdir, exist_ok=True)
    G = {"params": {"rounds": rounds, "get_rounds": get_rounds, "big_rounds": big_rounds, "big": big,
                    "layers": list(P["layers"])}}
    berth = _berth(B, berth_bin, work, "berth-local")
    dist = B.dist_registry("dist-fs-local", work, B.free_port(),
                           f"  filesystem:\n    rootdirectory: {os.path.join(d, 'dist-root')}")
    regs = [berth, dist]
    for r in regs:
        r.start()
    B.log(f"local: berth (embedded store) on {berth.port}, distribution (filesystem) on {dist.port}")
    try:
        imgs = [B.make_image(os.path.join(imgdir, f"push{i}"), P["layers"]) for i in range(rounds)]
        _push(B, G, regs, imgs)
        _pull(B, G, regs, imgs[0], d)
        big_img = B.make_image(os.path.join(imgdir, "big"), [big])
        for r in regs:
            B.skopeo_push(big_img, r, "bench/big")
        _gets(B, G, regs, "64MiB", "bench/push0", imgs[0]["layers"][0], get_rounds)
        _gets(B, G, regs, "big", "bench/big", big_img["layers"][0], big_rounds)
        small = B.make_image(os.path.join(imgdir, "small"), [16 * 1024])
        for r in regs:
            B.skopeo_push(small, r, "bench/small")
        _manifests(B, P, G, regs)
    finally:
        for r in regs:
            r.stop()
        shutil.rmtree(imgdir, ignore_errors=True)
    return G


def _order(regs, i):
    return regs if i % 2 == 0 else regs[::-1]


def _push(B, G, regs, imgs):
    rows = {r.name: [] for r in regs}
    for i, img in enumerate(imgs):
        for r in _order(regs, i):
            os.sync()
            r.reset_hwm()
            cpu0 = B.cpu_seconds(r.pid)
            secs = B.skopeo_push(img, r, f"bench/push{i}")
            rows[r.name].append({"seconds": secs, "mbps": img["bytes"] / secs / 1e6, "hwm": r.hwm(),
                                 "cpu_s": B.cpu_seconds(r.pid) - cpu0})
    G["push"] = {name: B._agg(rs) for name, rs in rows.items()}
    for name, s in G["push"].items():
        B.log(f"local push {name}: {B.fmt(s['seconds'], 2)} s, peak RSS {B.fmt(s['hwm'], 1, 1 / MiB)} MiB")


def _pull(B, G, regs, img, d):
    rows = {r.name: [] for r in regs}
    dest = os.path.join(d, "pulled")
    for i in range(G["params"]["rounds"] + 1):
        for r in _order(regs, i):
            secs = B.skopeo_pull(r, "bench/push0", img["tag"], dest)
            if i:  # the first round is untimed
                rows[r.name].append({"seconds": secs, "mbps": img["bytes"] / secs / 1e6})
    shutil.rmtree(dest, ignore_errors=True)
    G["pull"] = {name: B._agg(rs) for name, rs in rows.items()}
    for name, s in G["pull"].items():
        B.log(f"local pull {name}: {B.fmt(s['seconds'], 2)} s ({B.fmt(s['mbps'])} MB/s)")


def _gets(B, G, regs, label, repo, layer, rounds):
    rows = {r.name: [] for r in regs}
    for i in range(rounds + 1):
        for r in _order(regs, i):
            r.reset_hwm()
            cpu0 = B.cpu_seconds(r.pid)
            n, secs = B.curl_get(f"{r.base}/v2/{repo}/blobs/{layer['digest']}")
            if n != layer["size"]:
                raise RuntimeError(f"GET of {label} from {r.name}: {n} bytes, expected {layer['size']}")
            if i:
                rows[r.name].append({"mbps": n / secs / 1e6, "hwm": r.hwm(), "cpu_s": B.cpu_seconds(r.pid) - cpu0})
    G.setdefault("blob_get", {})[label] = {"bytes": layer["size"],
                                           **{name: B._agg(rs) for name, rs in rows.items()}}
    for name in rows:
        s = G["blob_get"][label][name]
        B.log(f"local GET {label} {name}: {B.fmt(s['mbps'])} MB/s, peak RSS {B.fmt(s['hwm'], 1, 1 / MiB)} MiB")


def _manifests(B, P, G, regs):
    ncpu = os.cpu_count() or 1
    pin = ncpu >= 2 and shutil.which("taskset")
    ccpu, rest, every = str(ncpu - 1), "0" if ncpu == 2 else f"0-{ncpu - 2}", f"0-{ncpu - 1}"
    headers = [f"Accept: {OCI_MANIFEST}"]
    rows = {r.name: [] for r in regs}
    try:
        for r in regs:
            if pin:
                B.run(["taskset", "-a", "-p", "-c", rest, str(r.pid)])
            if P["warmup_seconds"]:
                B.wrk(f"{r.base}/v2/bench/small/manifests/latest", P["warmup_seconds"], headers,
                      cpus=ccpu if pin else None)
        for _ in range(P["reps"]):
            for r in regs:
                cpu0 = B.cpu_seconds(r.pid)
                row = B.wrk(f"{r.base}/v2/bench/small/manifests/latest", P["load_seconds"], headers,
                            cpus=ccpu if pin else None)
                row["cpu_us_per_req"] = (B.cpu_seconds(r.pid) - cpu0) * 1e6 / max(1, row["requests"])
                rows[r.name].append(row)
    finally:
        if pin:
            for r in regs:
                B.run(["taskset", "-a", "-p", "-c", every, str(r.pid)], check=False)
    G["manifest_get"] = {name: B._agg(rs) for name, rs in rows.items()}
    G["manifest_get"]["pinned"] = bool(pin)
    for r in regs:
        s = G["manifest_get"][r.name]
        B.log(f"local manifest GET {r.name}: {B.fmt(s['rps'])} req/s, p99 {B.fmt(s['p99_ms'], 2)} ms")


# ------------------------------------------------------------------------------------------
# targets and report

BERTH, DIST = "berth-local", "dist-fs-local"


def targets(R, add, med):
    G = R.get("local")
    if not G:
        return
    big = G["params"]["big"] // MiB
    for label, name in (("64MiB", "64 MiB"), ("big", f"{big} MiB")):
        g = G["blob_get"][label]
        r = med(g[BERTH]["mbps"]) / med(g[DIST]["mbps"])
        add(f"embedded default: blob GET {name} (one curl) >= 1.0x distribution (filesystem)",
            med(g[BERTH]["mbps"]), "MB/s", ">= 1.0x", r >= 1.0, r)
    p = G["pull"]
    r = med(p[DIST]["seconds"]) / med(p[BERTH]["seconds"])
    add("embedded default: skopeo pull of 3x64 MiB >= 1.0x distribution (filesystem)", med(p[BERTH]["seconds"]),
        "s", ">= 1.0x", r >= 1.0, r)
    p = G["push"]
    r = med(p[DIST]["seconds"]) / med(p[BERTH]["seconds"])
    add("embedded default: skopeo push of 3x64 MiB >= 1.0x distribution (filesystem)", med(p[BERTH]["seconds"]),
        "s", ">= 1.0x", r >= 1.0, r)
    small, large = med(G["blob_get"]["64MiB"][BERTH]["hwm"]), med(G["blob_get"]["big"][BERTH]["hwm"])
    grow = (large - small) / MiB
    add(f"embedded default: peak RSS flat in blob size (GET of {big} MiB minus GET of 64 MiB)", grow, "MiB",
        "<= 16 MiB", grow <= 16)
    m = G["manifest_get"]
    r = med(m[BERTH]["rps"]) / med(m[DIST]["rps"])
    add("embedded default: manifest GET req/s >= 25x distribution (filesystem)"
        + (", wrk on a core of its own" if m.get("pinned") else ""), med(m[BERTH]["rps"]), "req/s", ">= 25x",
        r >= 25, r)


def report(R, w, fmt):
    G = R.get("local")
    if not G:
        return
    p = G["params"]
    mib = 1 / MiB
    w("## The embedded default vs distribution's filesystem driver\n")
    w("berth with no `storage.endpoint` (the local object store under `data_dir/objects`, redb, the journal on) "
      "against distribution 2.8.2 with `storage.filesystem`, same machine, same images, rounds interleaved "
      "with the order alternating.\n")
    w("| row | registry | seconds | MB/s | peak RSS MiB | registry CPU s |")
    w("| --- | --- | ---: | ---: | ---: | ---: |")
    for what, key in ((f"skopeo push 3 × 64 MiB ({p['rounds']} rounds, a fresh image each)", "push"),
                      (f"skopeo pull 3 × 64 MiB ({p['rounds']} rounds)", "pull")):
        for name in (BERTH, DIST):
            s = G[key][name]
            w(f"| {what} | {name} | {fmt(s['seconds'], 2)} | {fmt(s['mbps'])} | {fmt(s.get('hwm'), 1, mib)} | "
              f"{fmt(s.get('cpu_s'), 2)} |")
    for label, rounds in (("64MiB", p["get_rounds"]), ("big", p["big_rounds"])):
        g = G["blob_get"][label]
        for name in (BERTH, DIST):
            s = g[name]
            w(f"| blob GET {g['bytes'] // MiB} MiB, one curl ({rounds} rounds) | {name} | | {fmt(s['mbps'])} | "
              f"{fmt(s['hwm'], 1, mib)} | {fmt(s['cpu_s'], 2)} |")
    m = G["manifest_get"]
    w("")
    w("| manifest GET" + (" (wrk on CPU 1, registry on CPU 0)" if m.get("pinned") else "")
      + " | req/s | p50 ms | p99 ms | registry CPU µs/request |")
    w("| --- | ---: | ---: | ---: | ---: |")
    for name in (BERTH, DIST):
        s = m[name]
        w(f"| {name} | {fmt(s['rps'])} | {fmt(s['p50_ms'], 2)} | {fmt(s['p99_ms'], 2)} | "
          f"{fmt(s['cpu_us_per_req'], 1)} |")
    w("")
