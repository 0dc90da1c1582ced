#!/usr/bin/env bash
# Assembles berth's container image from a locally built release binary, without pulling any
# base image: an OCI image on `scratch` holding the binary, the shared libraries `ldd` lists,
# the CA certificates, /etc/passwd and /etc/group naming the non-root user, and the config
# the Containerfile bakes in. Same paths, user, ports, volume, labels and entrypoint as
# deploy/Containerfile.
#
#   cargo build --release
#   deploy/build-image.sh OUT_DIR [TAG]      # writes an OCI layout: OUT_DIR, ref TAG
#   skopeo copy oci:OUT_DIR:TAG docker://registry.example.com/berth:TAG
#
# Environment: BERTH_BIN (default target/release/berth), BUILDAH_ROOT (buildah's storage,
# default a temporary directory removed at the end; vfs driver, so no overlay mount is needed).
set -euo pipefail

out=${1:?usage: build-image.sh OUT_DIR [TAG]}
tag=${2:-latest}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bin=${BERTH_BIN:-$repo/target/release/berth}
uid=65532

[ -x "$bin" ] || { echo "build-image.sh: no executable at $bin (cargo build --release)" >&2; exit 1; }
command -v buildah >/dev/null || { echo "build-image.sh: buildah is not installed" >&2; exit 1; }
ca=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca" ] || { echo "build-image.sh: no CA bundle at $ca (apt-get install ca-certificates)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
storage_root=${BUILDAH_ROOT:-$work/storage}
b() { buildah --root "$storage_root/root" --runroot "$storage_root/run" --storage-driver vfs "$@"; }

# ---- the root filesystem ----------------------------------------------------------------
rootfs=$work/rootfs
install -D -m 0755 "$bin" "$rootfs/usr/local/bin/berth"
# Every library the dynamic loader resolves, and the loader itself, at the path ldd names
# (symlinks resolved: the image holds the files under the names the binary asks for).
ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\/[^ ]+ \(/{print $1}' | while read -r lib; do
    install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
done
install -D -m 0644 "$ca" "$rootfs$ca"
install -D -m 0644 "$here/image/berth.yaml" "$rootfs/etc/berth/berth.yaml"
install -d -m 0755 "$rootfs/var/lib"
install -d -m 0750 "$work/data/berth"
install -d -m 1777 "$rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nberth:x:%s:%s:berth:/var/lib/berth:/sbin/nologin\n' "$uid" "$uid" >"$rootfs/etc/passwd"
printf 'root:x:0:\nberth:x:%s:\n' "$uid" >"$rootfs/etc/group"

# ---- the image --------------------------------------------------------------------------
version=$("$bin" --version | awk 'NR == 1 {print $2}')
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
ctr=$(b from scratch)
b add "$ctr" "$rootfs" / >/dev/null
# The data volume belongs to the non-root user (the files above are root's, read-only to it).
b add --chown "$uid:$uid" "$ctr" "$work/data" /var/lib >/dev/null
b config \
    --entrypoint '["/usr/local/bin/berth", "serve"]' \
    --cmd '--config /etc/berth/berth.yaml' \
    --user "$uid:$uid" \
    --workingdir /var/lib/berth \
    --port 5000/tcp --port 9090/tcp \
    --volume /var/lib/berth \
    --env SSL_CERT_FILE="$ca" \
    --label org.opencontainers.image.title=berth \
    --label "org.opencontainers.image.description=OCI Distribution v1.1 registry gateway: metadata in an embedded store, blobs streamed to S3" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    "$ctr"
mkdir -p "$out"
b commit --quiet --format oci --rm "$ctr" "oci:$out:$tag" >/dev/null
echo "berth $version image written to oci:$out:$tag"
