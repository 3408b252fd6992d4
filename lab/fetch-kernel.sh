#!/bin/bash
# usage: fetch-kernel.sh SUITE CACHE_DIR      -> prints the unpacked kernel root on the last line
#        fetch-kernel.sh --deb PATH CACHE_DIR -> unpacks that linux-image .deb instead
# Downloads (does NOT install) the suite's linux-image-amd64 kernel with
# `apt-get download` and unpacks it with `dpkg-deb -x` under CACHE_DIR/kernels/.
# bookworm uses the system's apt lists; any other suite uses a private apt
# configuration under CACHE_DIR/apt-SUITE, so the host's apt sources and state
# stay untouched. Downloaded .debs are kept in CACHE_DIR/deb and reused.
set -euo pipefail
if [ "${1:-}" = --deb ]; then
  DEB=$(readlink -f "$2"); CACHE=$3
  DEST=$CACHE/kernels/$(basename "$DEB" .deb)
  if [ ! -f "$DEST/.complete" ] || [ "$DEB" -nt "$DEST/.complete" ]; then
    rm -rf "$DEST"; mkdir -p "$DEST"; dpkg-deb -x "$DEB" "$DEST"; touch "$DEST/.complete"
  fi
  echo "$DEST"; exit 0
fi
SUITE=${1:-bookworm}; CACHE=$2
mkdir -p "$CACHE/deb"
if [ "$SUITE" = bookworm ]; then
  unset APT_CONFIG
else
  A=$CACHE/apt-$SUITE
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" > "$A/sources.list"
  cat > "$A/apt.conf" <<C
Dir::Etc::SourceList "$A/sources.list";
Dir::Etc::SourceParts "$A/sources.list.d";
Dir::State::Lists "$A/lists";
Dir::Cache "$A/cache";
Acquire::Languages "none";
C
  export APT_CONFIG=$A/apt.conf
  apt-get -q update >&2
fi
IMG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$IMG" ] || { echo "no linux-image-amd64 in $SUITE (run apt-get update?)" >&2; exit 1; }
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
