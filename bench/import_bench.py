"""The import and rebuild rows of bench/run.py (issues 13 and 15), all on run.py's Garage.

- import (issue 13): distribution's S3 layout of IMAGES images (BLOBS blobs each: 9 small
  layers and a config; a manifest and the tag `latest` per repository), written by
  bench/import_layout.py and uploaded to a bucket of its own under distribution's rootdirectory
  ROOT (the S3 driver's keys are the filesystem paths below it), then `berth import
  --from-bucket --root-directory /ROOT` timed, berth not serving. Garage's request counters
  before/after: every write (PutObject, CopyObject, multipart) less the journal records the
  import wrote (counted by listing `journal/`) is a write of blob objects, which must be 0; a
  listing of the whole bucket before/after shows that no object outside `journal/` appeared or
  changed (ETag, size, LastModified). A re-run must add nothing and write nothing. Then a berth
  serves that data dir and every image is pulled: manifest by tag (byte-equal to the layout's
  file, digest checked), every blob (sha256 = digest, size).
- rebuild (issue 15): the berth stopped, `berth recover --config CONF --data-dir EMPTY` timed
  (from the bucket's verified blobs and journal: here the import's journal records), a berth
  serving the rebuilt data dir, every image pulled again byte-identical, catalog and every
  repository's tags compared with the imported berth's. Then the same for the same images
  pushed through a berth (journal on) into a bucket of their own: half of them blob by blob as
  docker sends them (POST, PATCH, PUT ?digest=: small blobs land at their verified keys, no
  record), half as monolithic POST ?digest= (streamed to an upload key: a link record each), so
  the rebuild replays verified blobs, link records and manifest records.
- push (issue 15): 3 x 64 MiB through a berth with the bucket journal on and one with
  `journal.enabled: false`, each on a bucket of its own, fresh random bytes for every push
  (Garage stores equal 1 MiB blocks once), rounds interleaved; S3 requests per push from
  Garage's counters (HeadBucket left out, as run.py's counter_delta does).

With `quick`, IMAGES is 100 (1,000 blobs): the rows say so. `section()` takes the run module
(`B`) for its helpers, so that every process it starts is stopped by the run's cleanup.
"""
import concurrent.futures
import datetime
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET

import import_layout

MiB = 1 << 20
BLOBS = 10  # per image: 9 layers and the config (the manifest is stored as a blob too)
ROOT = "registry"  # distribution's S3 rootdirectory ("/registry" in its config)
V2 = "docker/registry/v2/"
JOURNAL = "journal/"  # src/meta/journal.rs: records under <prefix>journal/ (prefix "" here)
VERIFIED = "blobs/"  # src/storage/mod.rs: berth's own blob objects, <prefix>blobs/...
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WRITES = ("PutObject", "CopyObject", "UploadPart", "UploadPartCopy", "CreateMultipartUpload",
          "CompleteMultipartUpload")
WORKERS = 24  # concurrent requests for uploads and pulls


# ------------------------------------------------------------------------------------------
# S3 and HTTP, standard library only

def _signed(B, garage, method, bucket, key="", query=None, expires=3600):
    """A presigned path+query (SigV4, UNSIGNED-PAYLOAD) with extra query parameters (B.presign
    signs none); `key` "" is the bucket itself."""
    host = urllib.parse.urlsplit(garage.endpoint).netloc
    amzdate = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amzdate[:8]}/{B.REGION}/s3/aws4_request"
    path = "/" + urllib.parse.quote(bucket, safe="")
    if key:
        path += "/" + urllib.parse.quote(key, safe="/-_.~")
    q = dict(query or {})
    q.update({"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{garage.key_id}/{scope}",
              "X-Amz-Date": amzdate, "X-Amz-Expires": str(expires), "X-Amz-SignedHeaders": "host"})

    def enc(s):
        return urllib.parse.quote(s, safe="-_.~")
    cq = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(q.items()))
    creq = "\n".join([method, path, cq, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"])
    sts = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope, hashlib.sha256(creq.encode()).hexdigest()])
    k = ("AWS4" + garage.secret).encode()
    for part in (amzdate[:8], B.REGION, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    return f"{path}?{cq}&X-Amz-Signature={sig}"


class _Conns:
    """One keep-alive HTTP connection per thread to 127.0.0.1:port."""

    def __init__(self, port):
        self.port, self.local = port, threading.local()

    def request(self, method, path, body=None, headers=None):
        """(status, headers, body); one retry on a fresh connection if the kept one failed."""
        for attempt in (0, 1):
            c = getattr(self.local, "c", None)
            if c is None:
                c = self.local.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                c.request(method, path, body=body, headers=headers or {})
                r = c.getresponse()
                data = r.read()
                return r.status, r.headers, data
            except (http.client.HTTPException, OSError):
                c.close()
                self.local.c = None
                if attempt:
                    raise


def _port(url):
    return urllib.parse.urlsplit(url).port


def list_objects(B, garage, bucket, prefix=""):
    """{key: (size, etag, last_modified)} of every object below `prefix` (ListObjectsV2)."""
    conns = _Conns(_port(garage.endpoint))
    out, token = {}, None
    while True:
        q = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
        if token:
            q["continuation-token"] = token
        status, _, body = conns.request("GET", _signed(B, garage, "GET", bucket, query=q))
        if status != 200:
            raise RuntimeError(f"ListObjectsV2 {bucket}/{prefix}: HTTP {status}: {body[:300]!r}")
        root = ET.fromstring(body)
        for el in root:
            if el.tag.endswith("Contents"):
                f = {c.tag.split("}")[-1]: c.text for c in el}
                out[f["Key"]] = (int(f["Size"]), f.get("ETag"), f.get("LastModified"))
        token = next((el.text for el in root if el.tag.endswith("NextContinuationToken")), None)
        truncated = next((el.text for el in root if el.tag.endswith("IsTruncated")), "false")
        if truncated != "true" or not token:
            return out


def upload_tree(B, garage, bucket, root, prefix):
    """PUTs every file below `root` to `prefix` + its relative path, WORKERS at once."""
    files = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            files.append((p, prefix + os.path.relpath(p, root)))
    conns = _Conns(_port(garage.endpoint))

    def put(item):
        path, key = item
        with open(path, "rb") as f:
            data = f.read()
        status, _, body = conns.request("PUT", _signed(B, garage, "PUT", bucket, key), body=data)
        if status != 200:
            raise RuntimeError(f"PUT {key}: HTTP {status}: {body[:300]!r}")
        return len(data)

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
        total = sum(ex.map(put, files, chunksize=64))
    return len(files), total


def _write_delta(delta):
    return sum(v for k, v in delta.items() if k in WRITES or k.startswith("Put"))


# ------------------------------------------------------------------------------------------
# the images of the layout, and pulling them

def layout_images(root):
    """[(repo, tag, manifest digest, manifest bytes, [(digest, size, data path)])] of the layout
    import_layout.write_layout wrote at `root` (the expected bytes of every pull)."""
    v2 = os.path.join(root, V2)

    def data_path(digest):
        h = digest.split(":", 1)[1]
        return os.path.join(v2, "blobs/sha256", h[:2], h, "data")

    out = []
    repos = os.path.join(v2, "repositories")
    for ns in sorted(os.listdir(repos)):
        for name in sorted(os.listdir(os.path.join(repos, ns))):
            repo = f"{ns}/{name}"
            with open(os.path.join(repos, repo, "_manifests/tags/latest/current/link")) as f:
                md = f.read().strip()
            with open(data_path(md), "rb") as f:
                body = f.read()
            m = json.loads(body)
            blobs = [(d["digest"], d["size"], data_path(d["digest"])) for d in [m["config"], *m["layers"]]]
            out.append((repo, "latest", md, body, blobs))
    return out


def pull_all(reg, images):
    """Pulls every image through `reg` (manifest by tag, then every blob) and checks the bytes;
    returns counts, the mismatches (first few described) and the wall time."""
    conns = _Conns(reg.port)
    lock = threading.Lock()
    bad = []

    def fail(what):
        with lock:
            bad.append(what)

    def one(img):
        repo, tag, md, body, blobs = img
        status, hdrs, got = conns.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
        if status != 200 or got != body or hdrs.get("Docker-Content-Digest") not in (None, md):
            fail(f"{repo}:{tag}: manifest HTTP {status}, {len(got)} bytes, "
                 f"{'equal' if got == body else 'different'}")
            return 0, 0
        n = 0
        for d, size, _ in blobs:
            status, _, data = conns.request("GET", f"/v2/{repo}/blobs/{d}")
            if status != 200 or len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != d:
                fail(f"{repo}@{d}: blob HTTP {status}, {len(data)} of {size} bytes")
                continue
            n += len(data)
        return 1, n

    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
        rows = list(ex.map(one, images))
    wall = time.monotonic() - t
    return {"images": len(images), "manifests_ok": sum(r[0] for r in rows),
            "blobs": sum(len(i[4]) for i in images), "bytes": sum(r[1] for r in rows),
            "mismatches": len(bad), "examples": bad[:5], "seconds": wall}


def catalog_and_tags(reg):
    """{repo: sorted tags} from /v2/_catalog (following its Link pages) and each tags/list."""
    conns = _Conns(reg.port)
    repos, path = [], "/v2/_catalog?n=1000"
    while path:
        status, hdrs, body = conns.request("GET", path)
        if status != 200:
            raise RuntimeError(f"{reg.name} GET {path}: HTTP {status}")
        repos += json.loads(body).get("repositories") or []
        m = re.match(r'<([^>]+)>', hdrs.get("Link") or "")
        path = m.group(1) if m else None

    def tags(repo):
        status, _, body = conns.request("GET", f"/v2/{repo}/tags/list")
        return repo, sorted(json.loads(body).get("tags") or []) if status == 200 else [f"HTTP {status}"]

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        return dict(ex.map(tags, repos))


def parse_summary(out):
    """berth import's summary (src/import/mod.rs Display) as numbers."""
    def num(pattern):
        m = re.search(pattern, out, re.M)
        return int(m.group(1)) if m else None
    return {"repositories": num(r"^repositories: (\d+)"), "repositories_new": num(r"^repositories: \d+ \((\d+) new"),
            "tags_added": num(r"^tags: (\d+) added"), "tags_moved": num(r"^tags: \d+ added, (\d+) moved"),
            "tags_present": num(r"^tags: \d+ added, \d+ moved, (\d+) already present"),
            "manifests_added": num(r"^manifests: (\d+) added"),
            "manifests_present": num(r"^manifests: \d+ added, (\d+) already present"),
            "blobs_linked": num(r"^blobs: (\d+) links added"), "blobs_new": num(r"links added, (\d+) new blobs"),
            "bytes_adopted": num(r"\((\d+) bytes adopted"), "blobs_present": num(r"adopted in place\), (\d+) already"),
            "bytes_copied": num(r"^bytes copied: (\d+)"), "skipped": num(r"^skipped: (\d+)")}


def _bucket(garage, name):
    garage.cli("bucket", "create", name)
    garage.cli("bucket", "allow", "--read", "--write", "--owner", name, "--key", garage.key_id)


def push_all(reg, images):
    """Pushes every image through `reg`, WORKERS images at once, then its manifest by tag. The
    blobs of even-numbered images as docker and containerd send them (POST, one PATCH with the
    bytes, PUT ?digest=: berth holds the small blob in memory and writes it to its verified key,
    no journal record), of odd-numbered ones as one monolithic POST ?digest= with a
    Content-Length (streamed to an upload key: a journal link record each)."""
    conns = _Conns(reg.port)
    bad = []

    def where(loc):
        return urllib.parse.urlsplit(loc)._replace(scheme="", netloc="").geturl() if loc else None

    def chunked(repo, d, data):
        status, h, _ = conns.request("POST", f"/v2/{repo}/blobs/uploads/")
        loc = where(h.get("Location")) if status == 202 else None
        if loc:
            status, h, _ = conns.request("PATCH", loc, body=data, headers={"Content-Type": "application/octet-stream"})
            loc = where(h.get("Location")) if status == 202 else None
        if loc:
            sep = "&" if "?" in loc else "?"
            status, _, _ = conns.request("PUT", f"{loc}{sep}digest={d}", body=b"")
        return status

    def one(item):
        i, (repo, tag, md, body, blobs) = item
        for d, _, path in blobs:
            with open(path, "rb") as f:
                data = f.read()
            if i % 2 == 0:
                status = chunked(repo, d, data)
            else:
                status, _, _ = conns.request("POST", f"/v2/{repo}/blobs/uploads/?digest={d}", body=data,
                                             headers={"Content-Type": "application/octet-stream"})
            if status != 201:
                bad.append(f"{repo}@{d}: HTTP {status}")
                return 0
        status, _, _ = conns.request("PUT", f"/v2/{repo}/manifests/{tag}", body=body,
                                     headers={"Content-Type": OCI_MANIFEST})
        if status != 201:
            bad.append(f"{repo}:{tag}: PUT manifest HTTP {status}")
            return 0
        return 1

    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
        ok = sum(ex.map(one, enumerate(images)))
    return {"ok": ok, "failed": len(images) - ok, "examples": bad[:5], "seconds": time.monotonic() - t}


def rebuild(B, work, garage, berth_bin, conf, bucket, name, expect, tags_before):
    """`berth recover --config conf --data-dir EMPTY` timed, then a berth serving EMPTY: every
    image pulled and checked, catalog and tags compared with `tags_before`."""
    rebuilt = os.path.join(work, name, "data")
    shutil.rmtree(rebuilt, ignore_errors=True)
    os.makedirs(rebuilt)
    c0 = garage.counters()
    t = time.monotonic()
    r = B.run([berth_bin, "recover", "--config", conf, "--data-dir", rebuilt], timeout=900)
    secs = time.monotonic() - t
    m = re.search(r"recovered in [^:]+: (\d+) repositories; (\d+) verified blobs, (\d+) journal records(.*)$",
                  r.stdout, re.M)
    rb = {"seconds": secs, "s3": B.counter_delta(c0, garage.counters()),
          "repositories": int(m.group(1)) if m else None,
          "verified_blobs": int(m.group(2)) if m else None,
          "journal_records": int(m.group(3)) if m else None,
          "records_by_op": m.group(4).strip(" ()") if m else None,
          "stdout_tail": r.stdout.strip().splitlines()[-3:]}
    B.log(f"rebuild of {bucket}: {secs:.1f} s, {rb['repositories']} repositories, {rb['verified_blobs']} "
          f"verified blobs, {rb['journal_records']} journal records")
    reg = B.berth_registry(name, berth_bin, work, garage, bucket, B.free_port(), "proxy", rebuilt)
    reg.start()
    rb["pull"] = pull = pull_all(reg, expect)
    tags_after = catalog_and_tags(reg)
    reg.stop()
    diff = sorted(k for k in set(tags_before) | set(tags_after) if tags_before.get(k) != tags_after.get(k))
    rb.update({"repos_before": len(tags_before), "repos_after": len(tags_after),
               "tags_before": sum(len(v) for v in tags_before.values()),
               "tags_after": sum(len(v) for v in tags_after.values()),
               "tag_differences": len(diff), "tag_difference_examples": diff[:5]})
    B.log(f"rebuilt {bucket}: pulled {pull['manifests_ok']}/{len(expect)} images, {pull['mismatches']} "
          f"mismatches; {len(diff)} repositories with other tags than before")
    return rb


# ------------------------------------------------------------------------------------------
# the section

def section(B, P, work, garage, berth_bin, quick):
    """Runs the import, rebuild and journal push rows; returns their results (R["import"])."""
    images = 100 if quick else 1000
    base = os.path.join(work, "import-bench")
    os.makedirs(base, exist_ok=True)
    G = {"params": {"images": images, "blobs_per_image": BLOBS, "blobs": images * BLOBS, "quick": quick,
                    "root_directory": "/" + ROOT, "workers": WORKERS}}

    # ---- the layout, into a bucket of its own
    bucket = "berth-import"
    _bucket(garage, bucket)
    layout = os.path.join(base, "dist")
    t = time.monotonic()
    import_layout.write_layout(layout, images, BLOBS)
    expect = layout_images(layout)
    G["layout"] = {"write_s": time.monotonic() - t}
    t = time.monotonic()
    n, nbytes = upload_tree(B, garage, bucket, layout, ROOT + "/")
    G["layout"].update({"objects": n, "bytes": nbytes, "upload_s": time.monotonic() - t})
    B.log(f"import: layout of {images} images ({n} objects, {nbytes / 1e6:.1f} MB) uploaded to "
          f"{bucket} in {G['layout']['upload_s']:.1f} s")

    reg = B.berth_registry("berth-import", berth_bin, work, garage, bucket, B.free_port(), "proxy",
                           os.path.join(work, "berth-import", "data"))
    conf = os.path.join(work, "berth-import", "berth.yaml")
    argv = [berth_bin, "import", "--config", conf, "--from-bucket", "--root-directory", "/" + ROOT]

    def import_run():
        before = list_objects(B, garage, bucket)
        c0 = garage.counters()
        t = time.monotonic()
        r = B.run(argv, timeout=900)
        secs = time.monotonic() - t
        time.sleep(0.3)
        delta = B.counter_delta(c0, garage.counters())
        after = list_objects(B, garage, bucket)
        new = sorted(set(after) - set(before))
        journal = [k for k in new if k.startswith(JOURNAL)]
        outside = [k for k in new if not k.startswith(JOURNAL)]
        changed = [k for k in before if after.get(k) != before[k]]
        writes = _write_delta(delta)
        return {"seconds": secs, "s3": delta, "s3_writes": writes, "journal_objects": len(journal),
                "blob_writes": writes - len(journal), "new_outside_journal": len(outside),
                "new_under_blob_prefixes": sum(1 for k in outside if k.startswith((VERIFIED, ROOT + "/" + V2 + "blobs/"))),
                "changed_objects": len(changed), "examples": (outside + changed)[:5],
                "summary": parse_summary(r.stdout), "stdout": r.stdout}

    G["first"] = first = import_run()
    B.log(f"import: {first['seconds']:.1f} s; S3 writes {first['s3_writes']} = {first['journal_objects']} journal "
          f"records + {first['blob_writes']} blob; new objects outside journal/: {first['new_outside_journal']}, "
          f"changed: {first['changed_objects']}")
    G["again"] = again = import_run()
    B.log(f"import again: {again['seconds']:.1f} s, S3 writes {again['s3_writes']}, "
          f"{again['summary']}")

    reg.start()
    G["pull"] = pull = pull_all(reg, expect)
    B.log(f"import: pulled {pull['manifests_ok']}/{images} images, {pull['blobs']} blobs, "
          f"{pull['mismatches']} mismatches, in {pull['seconds']:.1f} s")
    tags_before = catalog_and_tags(reg)
    reg.stop()

    # ---- rebuild from the bucket into an empty data dir (the import's journal records)
    G["rebuild"] = rebuild(B, work, garage, berth_bin, conf, bucket, "berth-import-rebuilt", expect, tags_before)

    # ---- the same images pushed through a berth (journal on) into a bucket of their own, then
    # rebuilt: blobs at their verified keys (no record each) and a journal record per manifest
    pbucket = "berth-pushed"
    _bucket(garage, pbucket)
    src = B.berth_registry("berth-pushed", berth_bin, work, garage, pbucket, B.free_port(), "proxy",
                           os.path.join(work, "berth-pushed", "data"))
    src.start()
    G["pushed"] = push_all(src, expect)
    B.log(f"pushed {G['pushed']['ok']}/{images} images ({G['pushed']['failed']} failed) in "
          f"{G['pushed']['seconds']:.1f} s")
    tags_pushed = catalog_and_tags(src)
    src.stop()
    G["rebuild_pushed"] = rebuild(B, work, garage, berth_bin, os.path.join(work, "berth-pushed", "berth.yaml"),
                                  pbucket, "berth-pushed-rebuilt", expect, tags_pushed)

    # ---- push 3 x 64 MiB, journal on vs off, own buckets and own bytes, rounds interleaved
    pushers = {}
    for name, extra in (("berth-journal-on", ""), ("berth-journal-off", "journal:\n  enabled: false\n")):
        _bucket(garage, name)
        pushers[name] = B.berth_registry(name, berth_bin, work, garage, name, B.free_port(), "proxy",
                                         os.path.join(work, name, "data"), extra=extra)
        pushers[name].start()
    imgdir = os.path.join(base, "images")
    rows = {name: [] for name in pushers}
    for i in range(P["reps"]):
        for name, preg in pushers.items():
            img = B.make_image(os.path.join(imgdir, f"{name}-{i}"), P["layers"])
            os.sync()
            j0 = set(list_objects(B, garage, name, JOURNAL))
            c0 = garage.counters()
            secs = B.skopeo_push(img, preg, f"bench/journal{i}")
            time.sleep(0.3)
            s3 = B.counter_delta(c0, garage.counters())
            new = sorted(set(list_objects(B, garage, name, JOURNAL)) - j0)
            kinds = {}
            for k in new:  # journal/<time>-<node>-<seq>/<what>/...
                kind = k.split("/")[2] if k.count("/") >= 2 else "?"
                kinds[kind] = kinds.get(kind, 0) + 1
            rows[name].append({"seconds": secs, "s3": s3, "s3_total": sum(s3.values()),
                               "journal_records": len(new),
                               "journal_kinds": ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))})
            shutil.rmtree(img["path"], ignore_errors=True)
    for preg in pushers.values():
        preg.stop()
    G["push"] = {name: B._agg(r) for name, r in rows.items()}
    on, off = (G["push"][n] for n in pushers)
    G["push_extra"] = B.summary([a["s3_total"] - b["s3_total"] for a, b in zip(*rows.values())])
    B.log(f"push 3x64 MiB: journal on {B.fmt(on['s3_total'])} S3 requests, {B.fmt(on['seconds'], 2)} s; "
          f"off {B.fmt(off['s3_total'])}, {B.fmt(off['seconds'], 2)} s")
    return G


# ------------------------------------------------------------------------------------------
# targets and report

def targets(R, add, med):
    G = R.get("import")
    if not G:
        return
    p = G["params"]
    size = f"{p['images']:,} images / {p['blobs']:,} blobs" + (" (--quick: the target is for 1,000 / 10,000)"
                                                               if p["quick"] else "")
    note = "quick size" if p["quick"] else ""
    f, s = G["first"], G["first"]["summary"]
    complete = (s["tags_added"] == p["images"] and s["manifests_added"] == p["images"]
                and s["blobs_linked"] == p["blobs"] and s["skipped"] == 0)
    add(f"berth import --from-bucket of {size} from Garage < 2 min, everything adopted", f["seconds"], "s",
        "< 120 s", f["seconds"] < 120 and complete,
        note=note if complete else f"summary: {s['tags_added']} tags, {s['manifests_added']} manifests, "
                                   f"{s['blobs_linked']} blob links, {s['skipped']} skipped")
    clean = f["new_outside_journal"] == 0 and f["changed_objects"] == 0
    add("import: PUT/Copy requests for blob objects (S3 writes less journal records) = 0", f["blob_writes"],
        "requests", "= 0", f["blob_writes"] == 0 and clean,
        note=f"{f['s3_writes']} writes, {f['journal_objects']} journal records; {f['new_outside_journal']} new "
             f"objects outside journal/, {f['changed_objects']} changed")
    pl = G["pull"]
    add("import: every image pulls byte-identical through berth", pl["manifests_ok"], "images",
        f"= {p['images']}, 0 mismatches", pl["manifests_ok"] == p["images"] and pl["mismatches"] == 0,
        note=f"{pl['mismatches']} mismatches" if pl["mismatches"] else "")
    a, sa = G["again"], G["again"]["summary"]
    added = sum(sa[k] or 0 for k in ("tags_added", "tags_moved", "manifests_added", "blobs_linked"))
    add("(info) import re-run adds nothing and writes nothing to the bucket", added + a["s3_writes"], "changes",
        "= 0", added == 0 and a["s3_writes"] == 0 and sa["skipped"] == 0, info=True,
        note=f"{a['seconds']:.1f} s")
    for key, what in (("rebuild", "the imported bucket (its journal's adopt and manifest records)"),
                      ("rebuild_pushed", "the same images pushed through berth (verified blobs, link and manifest records)")):
        rb = G.get(key)
        if not rb:
            continue
        pushed = G["pushed"]["ok"] if key == "rebuild_pushed" else p["images"]
        whole = rb["repositories"] == p["images"] and pushed == p["images"]
        add(f"berth recover (rebuild) of {size} from Garage < 60 s: {what}", rb["seconds"], "s", "< 60 s",
            rb["seconds"] < 60 and whole,
            note=note if whole else f"{rb['repositories']} repositories rebuilt, {pushed} images pushed")
        pl = rb["pull"]
        ok = pl["manifests_ok"] == p["images"] and pl["mismatches"] == 0 and rb["tag_differences"] == 0
        add(f"rebuilt from {what.split(' (')[0]}: every image pulls byte-identical, catalog and tags as before",
            pl["manifests_ok"], "images", f"= {p['images']}, same tags", ok,
            note="" if ok else f"{pl['mismatches']} mismatches, {rb['tag_differences']} repositories' tags differ")
    on, off = G["push"]["berth-journal-on"], G["push"]["berth-journal-off"]
    extra = med(on["s3_total"]) - med(off["s3_total"])
    add("push 3x64 MiB with the bucket journal on: S3 requests added to the same push with it off <= 4", extra,
        "requests added", "<= 4", extra <= 4,
        note=f"journal on {med(on['s3_total']):g}, off {med(off['s3_total']):g} (medians)")
    r = med(on["seconds"]) / med(off["seconds"])
    add("(info) push 3x64 MiB wall time, journal on vs off", med(on["seconds"]), "s", "(1.1x)", r <= 1.1, r,
        info=True)


def report(R, w, fmt):
    G = R.get("import")
    if not G:
        return
    p, L = G["params"], G["layout"]
    w("## Adopting distribution's S3 layout (issue 13) and rebuilding from the bucket (issue 15)\n")
    w(f"distribution's S3 layout (bench/import_layout.py) of {p['images']:,} images × {p['blobs_per_image']} "
      f"blobs ({p['blobs']:,} blobs: 9 small layers and a config each, plus a manifest and tag `latest` per "
      f"repository){' — `--quick` size; the targets are for 1,000 images' if p['quick'] else ''}: "
      f"{L['objects']:,} objects ({L['bytes'] / 1e6:,.1f} MB), uploaded in {L['upload_s']:.1f} s "
      f"({p['workers']} concurrent presigned PUTs) to a bucket of its own under rootdirectory "
      f"`{p['root_directory']}`. `berth import --from-bucket` with berth not serving; S3 requests from Garage's "
      "counters, journal records by listing `journal/` before and after, and the whole bucket listed before "
      "and after (keys, sizes, ETags, LastModified).\n")
    w("| run | wall s | S3 requests | S3 writes | journal records | blob writes | new objects outside journal/ | changed objects |")
    w("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for k in ("first", "again"):
        f = G[k]
        ops = ", ".join(f"{a} {b}" for a, b in f["s3"].items())
        w(f"| import ({k}) | {f['seconds']:.2f} | {ops} | {f['s3_writes']} | {f['journal_objects']} | "
          f"{f['blob_writes']} | {f['new_outside_journal']} | {f['changed_objects']} |")
    s = G["first"]["summary"]
    w(f"\nFirst run's summary: {s['repositories']} repositories, {s['tags_added']} tags, {s['manifests_added']} "
      f"manifests, {s['blobs_linked']} blob links ({s['blobs_new']} new blobs, {s['bytes_adopted']:,} bytes adopted "
      f"in place), {s['bytes_copied']} bytes copied, {s['skipped']} skipped.\n")
    rebuilds = [("the imported bucket", G["rebuild"])]
    if G.get("rebuild_pushed"):
        ps = G["pushed"]
        w(f"The same images pushed through a berth (journal on) into a bucket of their own, {p['workers']} at once, "
          "the blobs of even-numbered images as docker sends them (POST, PATCH, PUT `?digest=`: small blobs land at "
          "their verified keys, no journal record), of odd-numbered ones as one monolithic `POST ?digest=` (streamed "
          f"to an upload key, a journal link record each), then the manifest by tag: {ps['ok']}/{p['images']} pushed "
          f"in {ps['seconds']:.1f} s.\n")
        rebuilds.append(("the pushed images' bucket", G["rebuild_pushed"]))
    w("`berth recover --data-dir EMPTY`, then a berth serving the rebuilt store:\n")
    w("| rebuilt from | recover wall s | repositories | verified blobs | journal records | S3 requests |")
    w("| --- | ---: | ---: | ---: | --- | --- |")
    for label, rb in rebuilds:
        w(f"| {label} | {rb['seconds']:.2f} | {rb['repositories']} | {rb['verified_blobs']} | "
          f"{rb['journal_records']} ({rb['records_by_op']}) | {', '.join(f'{a} {b}' for a, b in rb['s3'].items())} |")
    w("\n| pull of every image (manifest by tag + every blob, sha256 checked) | images | blobs | MB | mismatches | wall s |")
    w("| --- | ---: | ---: | ---: | ---: | ---: |")
    pulls = [("after the import", G["pull"])] + [(f"rebuilt from {label}", rb["pull"]) for label, rb in rebuilds]
    for label, pl in pulls:
        w(f"| {label} | {pl['manifests_ok']}/{pl['images']} | {pl['blobs']} | {pl['bytes'] / 1e6:,.1f} | "
          f"{pl['mismatches']} | {pl['seconds']:.1f} |")
    w("")
    for label, rb in rebuilds:
        w(f"- catalog and tags, rebuilt from {label}: {rb['repos_before']} repositories / {rb['tags_before']} tags "
          f"before, {rb['repos_after']} / {rb['tags_after']} after, {rb['tag_differences']} repositories differ.")
    w("")
    w("Push of 3 × 64 MiB (skopeo, fresh random bytes each push, each berth on a bucket of its own, rounds "
      "interleaved); S3 requests from Garage's counters, HeadBucket left out:\n")
    w("| berth | wall s | S3 requests | journal records written (first round) | S3 by operation (first round) |")
    w("| --- | ---: | ---: | --- | --- |")
    for name, s in G["push"].items():
        ops = ", ".join(f"{a} {b}" for a, b in s["s3"][0].items())
        kinds = (s.get("journal_kinds") or [""])[0]
        w(f"| {name} | {fmt(s['seconds'], 2)} | {fmt(s['s3_total'])} | {fmt(s['journal_records'])}"
          f"{f' ({kinds})' if kinds else ''} | {ops} |")
    w(f"\nRequests the journal adds per push (per round, on − off): {fmt(G['push_extra'])}.\n")
