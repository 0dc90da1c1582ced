#!/usr/bin/env python3
"""Times `berth import` on a synthetic distribution layout of many small images.

Writes distribution's filesystem layout (the keys its S3 driver writes too) for N images of
B blobs each (B-1 small layers and a config; one manifest and tag `latest` per repository),
then runs `berth import --from-dir` twice into a fresh data directory and prints the summaries
and wall times: the first run adopts everything, the second (the cut-over catch-up) adds nothing.

    python3 bench/import_layout.py [--images 1000] [--blobs 10] [--berth target/release/berth]
"""
import argparse
import hashlib
import json
import os
import subprocess
import tempfile
import time


def write_layout(root, images, blobs):
    v2 = os.path.join(root, "docker/registry/v2")

    def blob(data):
        h = hashlib.sha256(data).hexdigest()
        d = os.path.join(v2, "blobs/sha256", h[:2], h)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "data"), "wb") as f:
            f.write(data)
        return "sha256:" + h

    def link(path, digest):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "link"), "w") as f:
            f.write(digest)

    for i in range(images):
        repo = os.path.join(v2, "repositories", f"bench/img{i:05d}")
        layers = []
        for j in range(blobs - 1):
            data = f"layer {i} {j} ".encode() * 20
            d = blob(data)
            layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                           "digest": d, "size": len(data)})
            link(os.path.join(repo, "_layers/sha256", d[7:]), d)
        config = json.dumps({"architecture": "amd64", "os": "linux", "image": i}).encode()
        c = blob(config)
        link(os.path.join(repo, "_layers/sha256", c[7:]), c)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": c, "size": len(config)},
            "layers": layers,
        }).encode()
        m = blob(manifest)
        link(os.path.join(repo, "_manifests/revisions/sha256", m[7:]), m)
        link(os.path.join(repo, "_manifests/tags/latest/current"), m)
        link(os.path.join(repo, "_manifests/tags/latest/index/sha256", m[7:]), m)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--blobs", type=int, default=10)
    p.add_argument("--berth", default="target/release/berth")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dist = os.path.join(tmp, "dist")
        write_layout(dist, a.images, a.blobs)
        config = os.path.join(tmp, "berth.yaml")
        with open(config, "w") as f:
            f.write("log_level: warn\nstorage:\n  bucket: registry\n")
        for run in ("first", "again"):
            start = time.monotonic()
            out = subprocess.run(
                [a.berth, "import", "--config", config, "--data-dir", os.path.join(tmp, "data"),
                 "--from-dir", dist],
                check=True, capture_output=True, text=True).stdout
            print(f"{run} run: {time.monotonic() - start:.2f} s\n{out}")


if __name__ == "__main__":
    main()
