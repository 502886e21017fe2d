#!/bin/sh
# Assembles the datapathd image's root filesystem in OUT from the binaries in BIN_DIR:
#   deploy/image/rootfs.sh BIN_DIR OUT
# - /usr/local/bin/datapathd and /usr/local/bin/lb-ctl, without their debug info;
# - the shared libraries they load (as ldd lists them), at the same paths;
# - a static busybox as /bin/busybox, with /bin/sh, /bin/grep and /bin/mount, for the
#   DaemonSet's init container that mounts bpffs;
# - /etc/passwd and /etc/group: root, and `datapath` (65532) for what runs without
#   capabilities (lb-ctl);
# nothing else. BUSYBOX names another static busybox (default /bin/busybox, Debian's
# busybox-static).
set -eu
if [ $# -ne 2 ]; then
    echo "usage: $0 BIN_DIR OUT" >&2
    exit 2
fi
bin=$1
out=$2
busybox=${BUSYBOX:-/bin/busybox}
for b in datapathd lb-ctl; do
    if [ ! -x "$bin/$b" ]; then
        echo "$0: no executable $b in $bin" >&2
        exit 1
    fi
done
if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
    echo "$0: $busybox is not a static busybox (Debian: busybox-static)" >&2
    exit 1
fi
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/bin" "$out/etc" "$out/tmp"
chmod 1777 "$out/tmp"
for b in datapathd lb-ctl; do
    cp "$bin/$b" "$out/usr/local/bin/$b"
    if command -v strip >/dev/null; then
        strip --strip-debug "$out/usr/local/bin/$b"
    fi
done
# The loader and every library, by the path the binaries ask for (symlinks followed).
for lib in $(ldd "$bin/datapathd" "$bin/lb-ctl" |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u); do
    mkdir -p "$out$(dirname "$lib")"
    cp -L "$lib" "$out$lib"
done
cp "$busybox" "$out/bin/busybox"
for applet in sh grep mount; do
    ln -s busybox "$out/bin/$applet"
done
printf 'root:x:0:0:root:/:/bin/sh\ndatapath:x:65532:65532:datapath:/:/bin/sh\n' >"$out/etc/passwd"
printf 'root:x:0:\ndatapath:x:65532:\n' >"$out/etc/group"
