#!/bin/bash
# Build the lab's initramfs: static busybox, bash, ip/bridge, nft, conntrack,
# tcpdump, kmod (with their shared libraries, found by ldd), flowguard (with
# its libraries), a static udpwg, the needed kernel module subtrees + depmod,
# /init and the case runner.
# usage: build-initramfs.sh [--userland U] KROOT FLOWGUARD_BIN OUT
#   KROOT: a Debian linux-image unpacked with dpkg-deb -x (see fetch-kernel.sh)
#   --userland U: a foreign architecture's tools, unpacked by fetch-userland.sh
#     (U/root: the packages, U/build: musl and libgcc for udpwg), instead of
#     the host's; their libraries are found by reading DT_NEEDED (ldd cannot
#     run foreign binaries). FLOWGUARD_BIN must then be a static binary.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
USERLAND=""
if [ "${1:-}" = --userland ]; then USERLAND=$2; shift 2; fi
KROOT=$1; FLOWGUARD=$2; OUT=$3
MODROOT=$KROOT/lib/modules; [ -d "$MODROOT" ] || MODROOT=$KROOT/usr/lib/modules   # merged-/usr packages (trixie+)
KVER=$(ls "$MODROOT" | head -1)
ST=$(mktemp -d "$(dirname "$OUT")/staging.XXXXXX")
trap 'rm -rf "$ST"' EXIT

mkdir -p "$ST"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,var,root,lib64,lib/x86_64-linux-gnu,lab}
ln -s ../run "$ST/var/run"

# busybox (static) + applet links; the applet list is the host's busybox's,
# the same Debian version as the foreign one
cp "$USERLAND${USERLAND:+/root}/bin/busybox" "$ST/bin/busybox"
for a in $(/bin/busybox --list); do
  case $a in ip|modprobe|insmod|lsmod|rmmod|depmod|modinfo|busybox|bash) continue;; esac
  [ -e "$ST/bin/$a" ] || ln -s busybox "$ST/bin/$a"
done

# dynamically linked tools + their libraries
copy_bin() { # src dst
  install -D -m755 "$(readlink -f "$1")" "$ST$2"
  ldd "$1" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
    [ -f "$lib" ] || continue
    d="$ST$(dirname "$lib")"; mkdir -p "$d"
    [ -e "$d/$(basename "$lib")" ] || cp -L "$lib" "$d/"
  done
}
# a foreign binary from the userland root (its path there: / or /usr, bin or
# sbin) and, recursively, the libraries its DT_NEEDED entries name, each from
# the multiarch directory it was unpacked to, as is; its interpreter too
FROOT=$USERLAND/root
foreign_lib() { # NAME : copy one library and what it needs, once
  local name=$1 src="" d
  for d in "$FROOT"/lib/*-linux-gnu* "$FROOT"/usr/lib/*-linux-gnu* "$FROOT/lib" "$FROOT/usr/lib"; do
    [ -e "$d/$name" ] && { src=${d#"$FROOT"/}/$name; break; }
  done
  [ -n "$src" ] || { echo "library $name not found under $FROOT" >&2; return 1; }
  [ -e "$ST/$src" ] && return 0
  mkdir -p "$ST/$(dirname "$src")"; cp -L "$FROOT/$src" "$ST/$src"
  foreign_needed "$ST/$src"
}
foreign_needed() { # ELF
  local lib
  for lib in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do foreign_lib "$lib"; done
}
copy_foreign() { # src dst
  local name=${1##*/} d src="" interp
  for d in bin usr/bin sbin usr/sbin; do
    [ -e "$FROOT/$d/$name" ] && { src=$FROOT/$d/$name; break; }
  done
  [ -n "$src" ] || { echo "$name not found under $FROOT" >&2; return 1; }
  install -D -m755 "$(readlink -f "$src")" "$ST$2"
  interp=$(readelf -l "$src" | sed -n 's/.*interpreter: \(.*\)\]/\1/p')
  if [ -n "$interp" ] && [ ! -e "$ST$interp" ]; then
    mkdir -p "$ST$(dirname "$interp")"; cp -L "$FROOT$interp" "$ST$interp"
  fi
  foreign_needed "$src"
}
[ -n "$USERLAND" ] && copy_bin() { copy_foreign "$@"; }
# bash runs the scripts: Debian's busybox ash prefers its own applets (e.g. a
# minimal "ip") over the binaries in $PATH.
copy_bin /bin/bash            /bin/bash
copy_bin /usr/sbin/nft        /usr/sbin/nft
copy_bin /usr/sbin/conntrack  /usr/sbin/conntrack
copy_bin /usr/bin/tcpdump     /usr/bin/tcpdump
copy_bin /usr/bin/ip          /usr/bin/ip
copy_bin /usr/sbin/bridge     /usr/sbin/bridge
copy_bin /usr/bin/kmod        /usr/bin/kmod
if [ -n "$USERLAND" ]; then
  install -D -m755 "$FLOWGUARD" "$ST/usr/bin/flowguard"   # static musl
else
  copy_bin "$FLOWGUARD"         /usr/bin/flowguard
fi
for a in modprobe insmod lsmod rmmod depmod modinfo; do ln -s ../usr/bin/kmod "$ST/sbin/$a"; done
[ -z "$USERLAND" ] && cp -L /lib64/ld-linux-x86-64.so.2 "$ST/lib64/"
# every library in /lib/x86_64-linux-gnu; /usr/lib/x86_64-linux-gnu is a symlink to it
if [ -d "$ST/usr/lib/x86_64-linux-gnu" ]; then
  cp -a "$ST/usr/lib/x86_64-linux-gnu/." "$ST/lib/x86_64-linux-gnu/"
  rm -rf "$ST/usr/lib/x86_64-linux-gnu"
  ln -s ../../lib/x86_64-linux-gnu "$ST/usr/lib/x86_64-linux-gnu"
fi

if [ -n "$USERLAND" ]; then
  # static musl, linked by clang/lld; libgcc.a has the long double soft-float
  # arithmetic musl's printf calls
  B=$USERLAND/build; MUSL=$(ls -d "$B"/usr/lib/*-linux-musl* | head -1)
  TRIPLE=$(basename "$MUSL"); LIBGCC=$(ls "$B"/usr/lib/gcc/*/*/libgcc.a | head -1)
  clang-22 --target="$TRIPLE" -O2 -static -nostdlib -nostdinc -fuse-ld=lld \
    -isystem "$B/usr/include/$TRIPLE" -isystem "$(clang-22 -print-resource-dir)/include" \
    "$MUSL/crt1.o" "$MUSL/crti.o" "$HERE/udpwg.c" -L"$MUSL" -lc "$LIBGCC" "$MUSL/crtn.o" \
    -o "$ST/usr/bin/udpwg"
else
  gcc -O2 -static -o "$ST/usr/bin/udpwg" "$HERE/udpwg.c"
fi

# kernel modules: only the subtrees we need, then depmod so modprobe/autoload work
M="$MODROOT/$KVER"
for pat in kernel/net/netfilter kernel/net/ipv4 kernel/net/ipv6 kernel/net/bridge \
           kernel/net/8021q kernel/net/802 kernel/net/llc kernel/net/sched kernel/net/core \
           kernel/lib kernel/crypto 'kernel/arch/*/crypto' \
           'kernel/drivers/net/veth.ko*' 'kernel/drivers/net/macvlan.ko*' 'kernel/drivers/net/dummy.ko*'; do
  for src in "$M"/$pat; do          # unquoted $pat: the glob matches .ko, .ko.xz, .ko.zst
    [ -e "$src" ] || continue
    sub=${src#"$M"/}
    mkdir -p "$ST/lib/modules/$KVER/$(dirname "$sub")"
    cp -a "$src" "$ST/lib/modules/$KVER/$(dirname "$sub")/"
  done
done
cp "$M"/modules.builtin* "$M"/modules.order "$ST/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$ST" "$KVER"

cat > "$ST/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
tcpdump:x:100:100:tcpdump:/nonexistent:/bin/false
P
cat > "$ST/etc/group" <<'G'
root:x:0:
tcpdump:x:100:
G
echo 'hosts: files' > "$ST/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n' > "$ST/etc/hosts"

install -m755 "$HERE/init" "$ST/init"
install -m755 "$HERE/cases.sh" "$ST/lab/cases.sh"

(cd "$ST" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "built $OUT ($(du -h "$OUT" | cut -f1), kernel $KVER)" >&2
