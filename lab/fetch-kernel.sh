#!/bin/bash
# usage: fetch-kernel.sh [--arch ARCH] SUITE CACHE_DIR -> prints the unpacked kernel root on the last line
#        fetch-kernel.sh --deb PATH CACHE_DIR         -> unpacks that linux-image .deb instead
# Downloads (does NOT install) the suite's linux-image-ARCH kernel (ARCH amd64
# by default, or arm64) with `apt-get download` and unpacks it with
# `dpkg-deb -x` under CACHE_DIR/kernels/.
# bookworm amd64 uses the system's apt lists; any other suite or architecture
# a private apt configuration under CACHE_DIR/apt-SUITE[-ARCH] (private-apt.sh),
# so the host's apt sources and state stay untouched and no foreign
# architecture is added to its dpkg. Downloaded .debs are kept in
# CACHE_DIR/deb and reused.
set -euo pipefail
if [ "${1:-}" = --deb ]; then
  DEB=$(readlink -f "$2"); CACHE=$3
  DEST=$CACHE/kernels/$(basename "$DEB" .deb)
  if [ ! -f "$DEST/.complete" ] || [ "$DEB" -nt "$DEST/.complete" ]; then
    rm -rf "$DEST"; mkdir -p "$DEST"; dpkg-deb -x "$DEB" "$DEST"; touch "$DEST/.complete"
  fi
  echo "$DEST"; exit 0
fi
ARCH=amd64
if [ "${1:-}" = --arch ]; then ARCH=$2; shift 2; fi
SUITE=${1:-bookworm}; CACHE=$2
mkdir -p "$CACHE/deb"
. "$(dirname "$0")/private-apt.sh"
if [ "$ARCH" != amd64 ]; then
  private_apt "$SUITE" "$CACHE" "$ARCH"
elif [ "$SUITE" = bookworm ]; then
  unset APT_CONFIG
else
  private_apt "$SUITE" "$CACHE"
fi
IMG=$(apt-cache depends "linux-image-$ARCH" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$IMG" ] || { echo "no linux-image-$ARCH in $SUITE (run apt-get update?)" >&2; exit 1; }
# sid/forky split the image into linux-binary-*, linux-modules-*, linux-base-*
PKGS="$IMG $(apt-cache depends "$IMG" | awk '/Depends: linux-(binary|modules|base)-[0-9]/ {print $2}' | sort -u | tr '\n' ' ')"
cd "$CACHE/deb"
for p in $PKGS; do
  ls "${p}"_*.deb >/dev/null 2>&1 || apt-get -q download "$p" 2>&1 | grep -v 'unsandboxed' >&2 || true
  ls "${p}"_*.deb >/dev/null 2>&1 || { echo "apt-get download $p failed" >&2; exit 1; }
done
DEST=$CACHE/kernels/$IMG
if [ ! -f "$DEST/.complete" ]; then
  rm -rf "$DEST"; mkdir -p "$DEST"
  for p in $PKGS; do dpkg-deb -x "$(ls "${p}"_*.deb | tail -1)" "$DEST"; done
  touch "$DEST/.complete"
fi
echo "kernel $IMG unpacked to $DEST" >&2
echo "$DEST"
