"""The PostgreSQL rows of bench/run.py (issue 10): berth on the PostgreSQL metadata backend.

- manifest GET by tag and HEAD blob through a PostgreSQL-backed berth vs distribution's
  filesystem driver, the client on a core of its own (as the main section's pinned rows);
- push of 3 x 64 MiB through it vs distribution on the same Garage, rounds interleaved;
- two berth nodes on one database and one bucket, each pinned to a core of its own, serving
  manifest GETs together (a wrk per node, the load split evenly as a round-robin balancer
  would) vs one node on one core.

PostgreSQL 15 from Debian runs in the run's work dir (as user `postgres` when run as root: it
refuses root), fsync on, defaults otherwise. `section()` takes the run module (`B`) for its
helpers, so that every process it starts is stopped by the run's cleanup.
"""
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

MiB = 1 << 20


class Postgres:
    def __init__(self, B, work):
        self.B = B
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        if not bins:
            B.ensure_apt({"/usr/lib/postgresql/15/bin/postgres": "postgresql"})
            bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        self.bin = os.path.dirname(bins[-1])
        self.port = B.free_port()
        # Its directory's parents must be reachable by user postgres: a dir of its own in /tmp.
        self.dir = tempfile.mkdtemp(prefix="berth-bench-pg-")
        os.chmod(self.dir, 0o755)
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(work, "postgres.log")
        self.proc = None

    def _run(self, argv):
        return self.B.run(argv, user=self.user)

    def start(self):
        self._run([f"{self.bin}/initdb", "-D", self.data, "-U", "berth", "-A", "trust", "-E", "UTF8"])
        out = open(self.log, "ab")
        # Started directly (not through pg_ctl) so that cleanup() stops it; SIGINT: fast shutdown.
        self.proc = subprocess.Popen(
            [f"{self.bin}/postgres", "-D", self.data, "-p", str(self.port), "-k", self.dir,
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, user=self.user,
            start_new_session=True)
        out.close()
        self.B.PROCS.append(("postgres", self.proc, signal.SIGINT))
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run([f"{self.bin}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True)
            if r.returncode == 0:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: see {self.log}")
            time.sleep(0.2)

    def create_database(self, name):
        self.B.run([f"{self.bin}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "berth",
                    "-d", "postgres", "-c", f"CREATE DATABASE {name}"])
        return f"postgres://berth@127.0.0.1:{self.port}/{name}"

    def version(self):
        return self.B.version_of([f"{self.bin}/postgres", "--version"])

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def metadata_yaml(url, max_connections=16):
    return (f"metadata:\n  backend: postgres\n  postgres:\n    url: {url}\n"
            f"    max_connections: {max_connections}\n")


def _pinned(B, reg, cpus):
    B.run(["taskset", "-a", "-p", "-c", cpus, str(reg.pid)])


def section(B, P, work, garage, berth_bin, dist_s3, dist_fs, small_img, imgdir):
    """Runs the PostgreSQL rows; returns their results (R["postgres"])."""
    ncpu = os.cpu_count() or 1
    every = f"0-{ncpu - 1}"
    G = {"params": {}}
    pg = Postgres(B, work)
    pg.start()
    G["version"] = pg.version()
    url = pg.create_database("berth")
    B.log(f"postgres on 127.0.0.1:{pg.port} ({G['version']})")
    # The bench's own bucket: no Garage block that another path stored (Garage stores equal
    # blocks once).
    garage.cli("bucket", "create", "berth-pg")
    garage.cli("bucket", "allow", "--read", "--write", "--owner", "berth-pg", "--key", garage.key_id)

    def node(name):
        return B.berth_registry(name, berth_bin, work, garage, "berth-pg", B.free_port(), "proxy",
                                os.path.join(work, name, "data"), extra=metadata_yaml(url))

    a, b = node("berth-pg"), node("berth-pg-b")
    a.start()
    b.start()

    # ---- push 3 x 64 MiB, own bytes, interleaved with distribution (S3) on the same Garage
    imgs = [B.make_image(os.path.join(imgdir, f"pg-push{i}"), P["layers"]) for i in range(P["reps"])]
    dimgs = [B.make_image(os.path.join(imgdir, f"pg-dist-push{i}"), P["layers"]) for i in range(P["reps"])]
    rows = {a.name: [], dist_s3.name: []}
    for i in range(P["reps"]):
        for reg, img in ((a, imgs[i]), (dist_s3, dimgs[i])):
            os.sync()
            reg.reset_hwm()
            cpu0 = B.cpu_seconds(reg.pid)
            secs = B.skopeo_push(img, reg, f"bench/pgpush{i}")
            rows[reg.name].append({"seconds": secs, "hwm": reg.hwm(), "cpu_s": B.cpu_seconds(reg.pid) - cpu0})
    G["push"] = {name: B._agg(r) for name, r in rows.items()}
    B.log(f"push via PostgreSQL-backed berth: {B.fmt(G['push'][a.name]['seconds'], 2)} s, "
          f"distribution (S3) {B.fmt(G['push'][dist_s3.name]['seconds'], 2)} s")

    # ---- small requests, the client on a core of its own (the registry and PostgreSQL on the
    # others), as the main section's pinned rows
    B.skopeo_push(small_img, a, "bench/small")
    layer = small_img["layers"][0]["digest"]
    pinning = ncpu >= 2 and shutil.which("taskset")
    ccpu = str(ncpu - 1) if pinning else None
    rest = ("0" if ncpu == 2 else f"0-{ncpu - 2}") if pinning else None
    G["params"].update({"client_cpus": ccpu, "registry_cpus": rest})
    headers = [f"Accept: {B.OCI_MANIFEST}"]
    cases = {"manifest_get": ("wrk", "/v2/bench/small/manifests/latest", headers),
             "blob_head": ("hey", f"/v2/bench/small/blobs/{layer}", None)}
    regs = (a, dist_fs)
    G["small"] = {reg.name: {} for reg in regs}
    try:
        if pinning:
            for reg in regs:
                _pinned(B, reg, rest)
        for case, (tool, path, hdrs) in cases.items():
            def load(reg, seconds):
                u = reg.base + path
                if tool == "wrk":
                    return B.wrk(u, seconds, hdrs, cpus=ccpu)
                return B.hey(u, seconds, cpus=ccpu)
            for reg in regs:
                B._check_status(reg.base + path, "HEAD" if tool == "hey" else "GET", 200, hdrs or [])
                if P["warmup_seconds"]:
                    load(reg, P["warmup_seconds"])
            rows = {reg.name: [] for reg in regs}
            for _ in range(P["reps"]):
                for reg in regs:
                    cpu0 = B.cpu_seconds(reg.pid)
                    row = load(reg, P["load_seconds"])
                    row["cpu_us_per_req"] = (B.cpu_seconds(reg.pid) - cpu0) * 1e6 / max(1, row["requests"])
                    rows[reg.name].append(row)
            for reg in regs:
                G["small"][reg.name][case] = s = B._agg(rows[reg.name])
                B.log(f"{case} {reg.name}, client on CPU {ccpu}: {B.fmt(s['rps'])} req/s, "
                      f"p99 {B.fmt(s['p99_ms'], 2)} ms")
    finally:
        for reg in regs:
            B.run(["taskset", "-a", "-p", "-c", every, str(reg.pid)], check=False)

    # ---- one node vs two. Each node gets a CPU of its own that nothing else uses; a 2-core
    # machine has no cores to spare for that beside PostgreSQL and wrk, so the "core" is a
    # cgroup CPU quota (NODE_CPU of a CPU per node, 10 ms periods), which leaves the rest to
    # PostgreSQL and wrk. The load of the two-node rounds is split evenly (two wrk, half the
    # connections each), as a round-robin balancer would. Rounds interleaved. Without cgroup
    # v1's cpu controller the nodes are pinned to CPU 0 and CPU 1 instead (wrk and PostgreSQL
    # then share their cores).
    mpath = "/v2/bench/small/manifests/latest"
    B._check_status(b.base + mpath, "GET", 200, headers)  # pushed through A, served by B
    quota = CpuQuota.available()
    if quota or pinning:
        G["nodes"] = {"one": [], "two": [], "how": (f"cgroup cpu quota {NODE_CPU:g} CPU per node" if quota
                                                    else "pinned to CPU 0 and CPU 1")}
        limits = []
        try:
            if quota:
                limits = [CpuQuota(f"berth-bench-{reg.name}", NODE_CPU, reg.pid) for reg in (a, b)]
            else:
                _pinned(B, a, "0")
                _pinned(B, b, "1")
            if P["warmup_seconds"]:
                B.wrk(a.base + mpath, P["warmup_seconds"], headers)
                B.wrk(b.base + mpath, P["warmup_seconds"], headers)
            for _ in range(P["reps"]):
                cpu0 = B.cpu_seconds(a.pid)
                row = B.wrk(a.base + mpath, P["load_seconds"], headers)
                row["node_cpu_us_per_req"] = (B.cpu_seconds(a.pid) - cpu0) * 1e6 / max(1, row["requests"])
                G["nodes"]["one"].append(row)
                cpu0 = B.cpu_seconds(a.pid) + B.cpu_seconds(b.pid)
                row = _wrk_together(B, [a.base + mpath, b.base + mpath], P["load_seconds"], headers)
                row["node_cpu_us_per_req"] = ((B.cpu_seconds(a.pid) + B.cpu_seconds(b.pid) - cpu0) * 1e6
                                              / max(1, row["requests"]))
                G["nodes"]["two"].append(row)
        finally:
            for q in limits:
                q.remove()
            for reg in (a, b):
                B.run(["taskset", "-a", "-p", "-c", every, str(reg.pid)], check=False)
        G["nodes"].update({k: B._agg(G["nodes"][k]) for k in ("one", "two")})
        B.log(f"manifest GET ({G['nodes']['how']}): one node {B.fmt(G['nodes']['one']['rps'])} req/s, "
              f"two nodes {B.fmt(G['nodes']['two']['rps'])} req/s")
    a.stop()
    b.stop()
    return G


NODE_CPU = 0.4  # of a CPU, per node, in the one-node vs two-node rows


class CpuQuota:
    """A cgroup (v1 cpu controller) limiting a process to `cpus` of a CPU."""
    ROOT = "/sys/fs/cgroup/cpu"
    PERIOD_US = 10_000

    @classmethod
    def available(cls):
        return os.geteuid() == 0 and os.access(os.path.join(cls.ROOT, "cgroup.procs"), os.W_OK)

    def __init__(self, name, cpus, pid):
        self.dir = os.path.join(self.ROOT, name)
        os.makedirs(self.dir, exist_ok=True)
        self._write("cpu.cfs_period_us", self.PERIOD_US)
        self._write("cpu.cfs_quota_us", int(self.PERIOD_US * cpus))
        self._write("cgroup.procs", pid)  # every thread of the process

    def _write(self, name, value):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(str(value))

    def remove(self):
        with open(os.path.join(self.dir, "cgroup.procs")) as f:
            pids = f.read().split()
        for pid in pids:
            try:
                with open(os.path.join(self.ROOT, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError:
                pass  # exited
        os.rmdir(self.dir)


def _wrk_together(B, urls, seconds, headers):
    """One wrk per URL at once, CONN/len(urls) connections each; summed req/s, worst p99."""
    n = len(urls)
    procs = []
    for u in urls:
        argv = ["wrk", "-t1", f"-c{B.CONN // n}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
        for h in headers:
            argv += ["-H", h]
        procs.append(subprocess.Popen([*argv, u], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows = [B.parse_wrk(p.communicate(timeout=seconds + 60)[0]) for p in procs]
    return {"rps": sum(r["rps"] for r in rows), "p50_ms": max(r["p50_ms"] or 0 for r in rows),
            "p99_ms": max(r["p99_ms"] or 0 for r in rows), "requests": sum(r["requests"] for r in rows),
            "non2xx3xx": sum(r["non2xx3xx"] for r in rows), "per_node_rps": [r["rps"] for r in rows]}


def targets(R, add, med):
    G = R.get("postgres")
    if not G:
        return
    pgb, dfs, ds3 = "berth-pg", "dist-fs", "dist-s3"
    where = ", client on a core of its own" if G["params"].get("client_cpus") else ""
    for case, label in (("manifest_get", "manifest GET by tag"), ("blob_head", "HEAD blob")):
        s, d = G["small"][pgb][case], G["small"][dfs][case]
        r = med(s["rps"]) / med(d["rps"])
        add(f"PostgreSQL-backed berth: {label} req/s >= 10x distribution (filesystem){where}",
            med(s["rps"]), "req/s", ">= 10x", r >= 10, r)
        p99 = med(s["p99_ms"])
        add(f"PostgreSQL-backed berth: {label} p99 < 10 ms at 32 connections{where}", p99, "ms",
            "< 10 ms", p99 < 10)
    p = G["push"]
    r = med(p[ds3]["seconds"]) / med(p[pgb]["seconds"])
    add("PostgreSQL-backed berth: push 3x64 MiB >= 2x faster than distribution (same Garage)",
        med(p[pgb]["seconds"]), "s", ">= 2x", r >= 2, r)
    nodes = G.get("nodes")
    if nodes:
        r = med(nodes["two"]["rps"]) / med(nodes["one"]["rps"])
        how = nodes.get("how", "pinned to CPU 0 and CPU 1")
        add(f"two PostgreSQL-backed nodes, a CPU each ({how}), manifest GET req/s >= 1.5x one node",
            med(nodes["two"]["rps"]), "req/s", ">= 1.5x", r >= 1.5, r,
            note="wrk and PostgreSQL share the nodes' cores" if how.startswith("pinned") else "")


def report(R, w, fmt):
    G = R.get("postgres")
    if not G:
        return
    w(f"## PostgreSQL metadata backend ({G['version']})\n")
    w("berth-pg: berth with `metadata.backend: postgres` on a PostgreSQL started by the harness (fsync on), "
      "its own Garage bucket. Small requests with the client pinned to CPU "
      f"{G['params'].get('client_cpus')} and the registry to CPU {G['params'].get('registry_cpus')} "
      "(PostgreSQL unpinned).\n")
    w("| request | registry | req/s | p50 ms | p99 ms | registry CPU µs/request |")
    w("| --- | --- | ---: | ---: | ---: | ---: |")
    for case in ("manifest_get", "blob_head"):
        for reg, cases in G["small"].items():
            s = cases[case]
            w(f"| {case} | {reg} | {fmt(s['rps'])} | {fmt(s['p50_ms'], 2)} | {fmt(s['p99_ms'], 2)} | "
              f"{fmt(s.get('cpu_us_per_req'), 1)} |")
    w("\n| push 3 × 64 MiB (skopeo) | wall s | peak RSS MiB | registry CPU s |")
    w("| --- | ---: | ---: | ---: |")
    for name, s in G["push"].items():
        w(f"| {name} | {fmt(s['seconds'], 2)} | {fmt(s['hwm'], 1, 1 / MiB)} | {fmt(s['cpu_s'], 2)} |")
    if G.get("nodes"):
        n = G["nodes"]
        w(f"\nmanifest GET by tag, wrk 32 connections in all, each node {n.get('how')}: one node, then "
          "two nodes with a wrk of 16 connections each (wrk and PostgreSQL on what is left):\n")
        w("| nodes | req/s | p50 ms | p99 ms | node CPU µs/request |")
        w("| --- | ---: | ---: | ---: | ---: |")
        for k in ("one", "two"):
            s = n[k]
            w(f"| {k} | {fmt(s['rps'])} | {fmt(s['p50_ms'], 2)} | {fmt(s['p99_ms'], 2)} | "
              f"{fmt(s.get('node_cpu_us_per_req'), 1)} |")
    w("")

