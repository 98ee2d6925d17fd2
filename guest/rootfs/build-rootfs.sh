#!/usr/bin/env bash
# Build an ext4 root filesystem image from the kit's busybox userland.
#
#   guest/rootfs/build-rootfs.sh [--install-deps] OUT [SIZE_MIB]
#
# OUT (e.g. out/rootfs.ext4) receives a SIZE_MIB (default 64) MiB ext4 image that boots as
# the root of a virtio-blk disk: kernel command line "root=/dev/vda rw", and no initramfs
# (with one, the initramfs's /init runs instead).  Needs the full guest kernel (ext4).
#
# Contents: the busybox initramfs the VMM embeds (src/embervm/guest/initramfs-busybox.cpio.xz,
# or $ROOTFS_INITRAMFS): /bin/busybox and its applet links, and the kit's busybox init
# (guest/init/busybox/init, the initramfs's /init) as /sbin/init, where the kernel looks for
# it on a disk root.  It reads guest.script=, guest.shell and guest.nopoweroff from the
# command line as in the initramfs.  Plus /dev/console and /dev/null (for the console before
# devtmpfs is mounted) and the empty mount points.
#
# No root needed (no loop mount, no mknod on the host): the tree is laid out in a temporary
# directory, copied in by "mkfs.ext4 -d", and debugfs adds the device nodes and makes every
# file owned by root.  The UUID is fixed ($ROOTFS_UUID, default below) so a guest can name
# the root by UUID and two builds of the same inputs have the same identity.
#
# Tools: mkfs.ext4 and debugfs (e2fsprogs), cpio, xz.  --install-deps installs missing ones
# with apt-get (as root), as guest/build.sh does; otherwise the script says what to install.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DEPS="e2fsprogs cpio xz-utils"
INSTALL_DEPS=0
args=()
while [ $# -gt 0 ]; do
	case "$1" in
	--install-deps) INSTALL_DEPS=1 ;;
	-h|--help) sed -n '2,24p' "$0"; exit 0 ;;
	-*) echo "unknown option $1" >&2; exit 2 ;;
	*) args+=("$1") ;;
	esac
	shift
done
if [ ${#args[@]} -lt 1 ] || [ ${#args[@]} -gt 2 ]; then
	echo "usage: $0 [--install-deps] OUT [SIZE_MIB]" >&2
	exit 2
fi
OUT=${args[0]}
SIZE_MIB=${args[1]:-64}
case "$SIZE_MIB" in
''|*[!0-9]*) echo "SIZE_MIB must be a whole number of MiB, got '$SIZE_MIB'" >&2; exit 2 ;;
esac
if [ "$SIZE_MIB" -lt 8 ]; then
	echo "SIZE_MIB must be at least 8 (busybox alone is ~2 MiB, plus the journal)" >&2
	exit 2
fi
INITRAMFS=${ROOTFS_INITRAMFS:-$REPO/src/embervm/guest/initramfs-busybox.cpio.xz}
UUID=${ROOTFS_UUID:-5eedf00d-e3be-4a3e-9000-0000000000e4}
export PATH="$PATH:/usr/sbin:/sbin"  # mkfs.ext4 and debugfs live there

missing=
for t in mkfs.ext4 debugfs cpio xz; do
	command -v "$t" >/dev/null || missing="$missing $t"
done
if [ -n "$missing" ]; then
	if [ "$INSTALL_DEPS" = 1 ] && [ "$(id -u)" = 0 ]; then
		apt-get update
		DEBIAN_FRONTEND=noninteractive apt-get install -y $DEPS
	else
		echo "missing tools:$missing. Install them with:" >&2
		echo "  sudo apt-get install -y $DEPS" >&2
		echo "(or run this script as root with --install-deps)" >&2
		exit 1
	fi
fi
[ -f "$INITRAMFS" ] || { echo "no initramfs at $INITRAMFS" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rootfs.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
T="$WORK/tree"
mkdir -p "$T"

# bin/ (busybox and the applet links) and init from the initramfs; its device nodes are made
# by debugfs below instead, since mknod on the host needs root.
case "$INITRAMFS" in
*.xz) unpack="xz -dc" ;;
*.gz) unpack="gzip -dc" ;;
*) unpack="cat" ;;
esac
$unpack "$INITRAMFS" | (cd "$T" && cpio -id --quiet --no-absolute-filenames 'bin' 'bin/*' 'init')
[ -x "$T/bin/busybox" ] && [ -f "$T/init" ] || {
	echo "$INITRAMFS has no bin/busybox or init" >&2; exit 1; }
mkdir -p "$T/sbin"
mv "$T/init" "$T/sbin/init"
chmod 0755 "$T/sbin/init"
for d in dev proc sys run mnt; do mkdir -p "$T/$d"; chmod 0755 "$T/$d"; done
mkdir -p "$T/tmp" "$T/root"
chmod 1777 "$T/tmp"
chmod 0700 "$T/root"

mkdir -p "$(dirname "$OUT")"
IMG="$WORK/rootfs.ext4"
truncate -s "${SIZE_MIB}M" "$IMG"
mkfs.ext4 -q -F -L rootfs -U "$UUID" -E "root_owner=0:0,hash_seed=$UUID" -d "$T" "$IMG"

# Device nodes, and root ownership for everything mkfs copied with the builder's ids.
{
	echo "cd /dev"  # debugfs's mknod takes a name in the current directory
	echo "mknod console c 5 1"
	echo "mknod null c 1 3"
	echo "cd /"
	echo "sif /dev/console mode 020600"
	echo "sif /dev/null mode 020666"
	(cd "$T" && find . -mindepth 1) | sed 's|^\.||' | while IFS= read -r f; do
		echo "sif \"$f\" uid 0"
		echo "sif \"$f\" gid 0"
	done
	for f in /dev/console /dev/null; do
		echo "sif $f uid 0"
		echo "sif $f gid 0"
	done
} > "$WORK/debugfs.cmds"
# debugfs reports a failed request on stderr but still exits 0: treat any output as failure.
errors=$(debugfs -w -f "$WORK/debugfs.cmds" "$IMG" 2>&1 >/dev/null | grep -v '^debugfs ' || true)
if [ -n "$errors" ]; then
	echo "debugfs failed on $IMG:" >&2
	echo "$errors" >&2
	exit 1
fi
mv "$IMG" "$OUT"
echo "$OUT: ${SIZE_MIB} MiB ext4, UUID $UUID, init /sbin/init"
