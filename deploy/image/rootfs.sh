#!/usr/bin/env bash
# Assembles the root filesystem of kvgate's image from a built binary and nothing else:
# the binary (debug info stripped, symbols kept so backtraces still name functions), the
# shared libraries and loader it links as `ldd` resolves them, CA certificates, name-service
# files, /tmp, and the passwd/group entries of the non-root user 65532. No shell, no package
# manager. The tokenizer is not included: it is mounted (deploy/kvgate/deployment.yaml).
#
# Usage: deploy/image/rootfs.sh BINARY OUT    (writes OUT/rootfs; OUT is the build context of
# `podman build -f deploy/Containerfile --build-arg BINARY=prebuilt OUT`)
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 BINARY OUT" >&2
  exit 2
fi
binary=$1
root=$2/rootfs

rm -rf "$root"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp"
chmod 1777 "$root/tmp"
objcopy --strip-debug "$binary" "$root/usr/local/bin/kvgate"
chmod 0755 "$root/usr/local/bin/kvgate"

# Each library at the path the binary asks for, with symlinks resolved: `name => /path (addr)`
# lines, and the loader's `/path (addr)` line. A static binary has none.
libraries=$(ldd "$binary" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' || true)
for lib in $libraries; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

# kvgate trusts the cluster's CA for the Kubernetes API; a kubeconfig without one falls back
# to the system roots.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi

cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
# glibc resolves pod and API server names through these (Kubernetes mounts resolv.conf and hosts).
echo "hosts: files dns" > "$root/etc/nsswitch.conf"
