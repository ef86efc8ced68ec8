#!/usr/bin/env bash
# Builds the hotplug-vmm test guest from Debian packages: minimal kernels from linux-source-6.1 and
# linux-source-6.12, and an initramfs from busybox-static. Missing packages are installed with apt-get.
#
# Output is cached outside the work tree, keyed by everything that goes into it:
#   ${HOTPLUG_VMM_CACHE:-~/.cache/hotplug-vmm}/guest/linux-<ver>-<key>/{vmlinux,bzImage}
#   ${HOTPLUG_VMM_CACHE:-~/.cache/hotplug-vmm}/guest/initramfs-<key>.cpio
# and published as stable symlinks: .../guest/linux-<ver>/ and .../guest/initramfs.cpio.
#
# Usage: resources/build-guest.sh [6.1|6.12|all|initramfs]...   (default: all)
# Prints nothing but progress on stderr; `--print-paths` prints the published paths on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${HOTPLUG_VMM_CACHE:-$HOME/.cache/hotplug-vmm}/guest
jobs=${JOBS:-$(nproc)}
mkdir -p "$cache"

log() { echo "build-guest: $*" >&2; }

need_pkgs() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        local sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -q >&2 || true
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
}

key_of() { cat "$@" | sha256sum | cut -c1-12; }

build_kernel() {
    local ver=$1
    need_pkgs "linux-source-$ver" bc flex bison libelf-dev libssl-dev xz-utils make gcc
    local pkgver; pkgver=$(dpkg-query -W -f='${Version}' "linux-source-$ver")
    local key; key=$(echo "$pkgver" | key_of - "$here/guest/kernel.config" "$here/guest/patch-kernel.sh")
    local out="$cache/linux-$ver-$key"
    if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
        log "linux $ver ($pkgver) cached in $out"
    else
        local work; work=$(mktemp -d "$cache/build-$ver.XXXXXX")
        # A failed build leaves nothing behind (a kernel tree is over a gigabyte).
        trap 'rm -rf "$work"' EXIT
        log "building linux $ver ($pkgver) in $work, $jobs jobs"
        tar -C "$work" -xf "/usr/src/linux-source-$ver.tar.xz"
        local src="$work/linux-source-$ver"
        bash "$here/guest/patch-kernel.sh" "$src"
        make -C "$src" -s tinyconfig >&2
        (cd "$src" && scripts/kconfig/merge_config.sh -m .config "$here/guest/kernel.config" >/dev/null)
        make -C "$src" -s olddefconfig >&2
        # Every option we asked for must have survived olddefconfig (a dependency we forgot drops it).
        local bad=0
        while IFS= read -r line; do
            case "$line" in CONFIG_*=y) grep -qx "$line" "$src/.config" || { log "option lost: $line"; bad=1; } ;; esac
        done <"$here/guest/kernel.config"
        [ $bad = 0 ] || { log "kernel.config does not survive olddefconfig on $ver"; exit 1; }
        make -C "$src" -s -j"$jobs" vmlinux bzImage >&2
        mkdir -p "$out.tmp"
        cp "$src/vmlinux" "$out.tmp/vmlinux"
        cp "$src/arch/x86/boot/bzImage" "$out.tmp/bzImage"
        cp "$src/.config" "$out.tmp/config"
        strip --strip-debug "$out.tmp/vmlinux" 2>/dev/null || true
        rm -rf "$out" && mv "$out.tmp" "$out"
        rm -rf "$work"
        trap - EXIT
        log "linux $ver built: $out"
    fi
    ln -sfn "$(basename "$out")" "$cache/linux-$ver"
}

build_initramfs() {
    need_pkgs busybox-static cpio
    local extra=("$here/guest/init" "$here/guest/uevent-helper.c" "$here/guest/blkzeroout.c" "$here/guest/hostile.c" "$here/build-guest.sh")
    local bbver; bbver=$(dpkg-query -W -f='${Version}' busybox-static)
    local key; key=$(echo "$bbver" | key_of - "${extra[@]}")
    local out="$cache/initramfs-$key.cpio"
    if [ ! -f "$out" ]; then
        local root; root=$(mktemp -d)
        mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,run,etc,root}
        # Every byte and every file of the initramfs costs boot time on PVM hosts: the kernel
        # unpacks it in the emulator (5 MB and 270 applet links took 15 s). So busybox alone, and
        # no links to its applets but /bin/sh: Debian's busybox is built with the standalone
        # shell, which runs applets without them (through /proc/self/exe: /init mounts /proc
        # first), and so do the applets that run other programs (setsid, xargs, ...).
        cp /bin/busybox "$root/bin/busybox"
        ln -s busybox "$root/bin/sh"
        [ "$(env -i PATH=/nonexistent "$root/bin/busybox" sh -c 'command -v mount')" = mount ] ||
            { log "busybox's shell does not run applets without links"; exit 1; }
        install -m 0755 "$here/guest/init" "$root/init"
        local tool
        for tool in uevent-helper blkzeroout hostile; do
            gcc -Os -static -nostdlib -fno-stack-protector -fno-pie -no-pie \
                -o "$root/sbin/$tool" "$here/guest/$tool.c"
        done
        printf 'export PS1="# "\nexport PATH=/bin:/sbin:/usr/bin:/usr/sbin\n' >"$root/etc/profile"
        (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$out.tmp"
        mv "$out.tmp" "$out"
        rm -rf "$root"
        log "initramfs built: $out"
    fi
    ln -sfn "$(basename "$out")" "$cache/initramfs.cpio"
}

print_paths=0
targets=()
for a in "$@"; do
    case "$a" in
        --print-paths) print_paths=1 ;;
        6.1|6.12|initramfs) targets+=("$a") ;;
        all) targets+=(6.1 6.12 initramfs) ;;
        *) echo "usage: $0 [--print-paths] [6.1|6.12|all|initramfs]..." >&2; exit 2 ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(6.1 6.12 initramfs)
for t in "${targets[@]}"; do
    case "$t" in
        initramfs) build_initramfs ;;
        *) build_kernel "$t" ;;
    esac
done
if [ $print_paths = 1 ]; then
    for t in "${targets[@]}"; do
        case "$t" in
            initramfs) echo "$cache/initramfs.cpio" ;;
            *) echo "$cache/linux-$t/vmlinux" ;;
        esac
    done
fi
