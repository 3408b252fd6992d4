#!/bin/bash
# usage: fetch-userland.sh ARCH SUITE CACHE_DIR -> prints the userland root on the last line
# The lab's tools for a foreign architecture (ARCH arm64), since the host's own
# binaries cannot run in that VM: Debian's busybox-static, bash, nftables,
# conntrack, tcpdump, iproute2 and kmod with every library they depend on
# (apt resolves them: `apt-get install --download-only` against an empty
# private dpkg status, see private-apt.sh), unpacked with `dpkg-deb -x` into
# CACHE_DIR/userland-ARCH-SUITE/root. Also, unpacked into .../build, what
# building the static udpwg needs: musl-dev (libc, crt objects, headers) and
# libgcc-12-dev (libgcc.a: the 128-bit long double arithmetic musl's printf
# calls). Nothing is installed; the host's apt and dpkg state stay untouched.
set -euo pipefail
ARCH=$1; SUITE=$2; CACHE=$3
U=$CACHE/userland-$ARCH-$SUITE
RUNTIME="busybox-static bash nftables conntrack tcpdump iproute2 kmod"
BUILD="musl-dev libgcc-12-dev"
if [ -f "$U/.complete" ] && [ "$(cat "$U/.complete")" = "$RUNTIME / $BUILD" ]; then
  echo "$U"; exit 0
fi
. "$(dirname "$0")/private-apt.sh"
private_apt "$SUITE" "$CACHE" "$ARCH"
rm -rf "$U"; mkdir -p "$U/debs/partial" "$U/build-debs" "$U/root" "$U/build"
# shellcheck disable=SC2086
apt-get -q -y --no-install-recommends -o Dir::Cache::archives="$U/debs" \
  install --download-only $RUNTIME >&2
# only these packages, without their dependencies
(cd "$U/build-debs" && apt-get -q download $BUILD 2>&1 | grep -v unsandboxed >&2 || true)
for deb in "$U"/debs/*.deb; do dpkg-deb -x "$deb" "$U/root"; done
for p in $BUILD; do
  deb=$(ls "$U/build-debs/${p}"_*.deb 2>/dev/null | tail -1)
  [ -n "$deb" ] || { echo "apt-get download $p failed" >&2; exit 1; }
  dpkg-deb -x "$deb" "$U/build"
done
rm -rf "$U/debs" "$U/build-debs"
echo "$RUNTIME / $BUILD" > "$U/.complete"
echo "userland for $ARCH ($SUITE) unpacked to $U" >&2
echo "$U"
