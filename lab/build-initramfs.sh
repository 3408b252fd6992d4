#!/bin/bash
# Build the lab's initramfs: static busybox, bash, ip/bridge, nft, conntrack,
# tcpdump, kmod (with their shared libraries, found by ldd), flowguard (with
# its libraries), a static udpwg, the needed kernel module subtrees + depmod,
# /init and the case runner.
# usage: build-initramfs.sh KROOT FLOWGUARD_BIN OUT
#   KROOT: a Debian linux-image unpacked with dpkg-deb -x (see fetch-kernel.sh)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KROOT=$1; FLOWGUARD=$2; OUT=$3
MODROOT=$KROOT/lib/modules; [ -d "$MODROOT" ] || MODROOT=$KROOT/usr/lib/modules   # merged-/usr packages (trixie+)
KVER=$(ls "$MODROOT" | head -1)
ST=$(mktemp -d "$(dirname "$OUT")/staging.XXXXXX")
trap 'rm -rf "$ST"' EXIT

mkdir -p "$ST"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,var,root,lib64,lib/x86_64-linux-gnu,lab}
ln -s ../run "$ST/var/run"

# busybox (static) + applet links
cp /bin/busybox "$ST/bin/busybox"
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
# bash runs the scripts: Debian's busybox ash prefers its own applets (e.g. a
# minimal "ip") over the binaries in $PATH.
copy_bin /bin/bash            /bin/bash
copy_bin /usr/sbin/nft        /usr/sbin/nft
copy_bin /usr/sbin/conntrack  /usr/sbin/conntrack
copy_bin /usr/bin/tcpdump     /usr/bin/tcpdump
copy_bin /usr/bin/ip          /usr/bin/ip
copy_bin /usr/sbin/bridge     /usr/sbin/bridge
copy_bin /usr/bin/kmod        /usr/bin/kmod
copy_bin "$FLOWGUARD"         /usr/bin/flowguard
for a in modprobe insmod lsmod rmmod depmod modinfo; do ln -s ../usr/bin/kmod "$ST/sbin/$a"; done
cp -L /lib64/ld-linux-x86-64.so.2 "$ST/lib64/"
# every library in /lib/x86_64-linux-gnu; /usr/lib/x86_64-linux-gnu is a symlink to it
if [ -d "$ST/usr/lib/x86_64-linux-gnu" ]; then
  cp -a "$ST/usr/lib/x86_64-linux-gnu/." "$ST/lib/x86_64-linux-gnu/"
  rm -rf "$ST/usr/lib/x86_64-linux-gnu"
  ln -s ../../lib/x86_64-linux-gnu "$ST/usr/lib/x86_64-linux-gnu"
fi

gcc -O2 -static -o "$ST/usr/bin/udpwg" "$HERE/udpwg.c"

# kernel modules: only the subtrees we need, then depmod so modprobe/autoload work
M="$MODROOT/$KVER"
for pat in kernel/net/netfilter kernel/net/ipv4 kernel/net/ipv6 kernel/net/bridge \
           kernel/net/8021q kernel/net/802 kernel/net/llc kernel/net/sched kernel/net/core \
           kernel/lib kernel/crypto kernel/arch/x86/crypto \
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
