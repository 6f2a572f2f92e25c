#!/usr/bin/env bash
# Records the real tool output and tool-generated files under tests/recorded/boot/ (see README.md there).
# Run as root on Debian bookworm from the repository root:
#   apt-get install -y --no-install-recommends systemd-boot u-boot-tools libubootenv-tool linux-base \
#       libvirt-clients
#   bash tests/recorded/boot/record_local.sh
# It mounts a tmpfs (bootctl wants the ESP to be a mount point), uses a private mount namespace for
# u-boot-update (which only writes /boot/extlinux), and touches nothing else outside a temporary directory.
set -euo pipefail
OUT="$(cd "$(dirname "$0")" && pwd)"
W="$(mktemp -d)"
cleanup() { umount "$W/esp" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# ---- systemd-boot: bootctl install + kernel-install (systemd 252's own entry writer) ---------------------
export SYSTEMD_RELAX_ESP_CHECKS=1
MID=3a6d2b9e8f1c4d7a9b0e5f2c1d8a7b6e
mkdir -p "$W/esp" "$W/conf" "$OUT/systemd-boot/entries"
mount -t tmpfs -o size=64m tmpfs "$W/esp"
bootctl --esp-path="$W/esp" is-installed > "$OUT/systemd-boot/bootctl-is-installed-no.txt" || true
bootctl --esp-path="$W/esp" --no-variables install > /dev/null 2>&1
bootctl --esp-path="$W/esp" is-installed > "$OUT/systemd-boot/bootctl-is-installed-yes.txt"
echo 'layout=bls' > "$W/conf/install.conf"
echo 'root=UUID=5b1c6a4e-3f0e-4a57-9a8e-2f1b0c7d9e21 ro quiet' > "$W/conf/cmdline"
for v in 6.1.0-27-amd64 6.1.0-28-amd64; do
  head -c 4096 /dev/zero > "$W/vmlinuz-$v"; head -c 4096 /dev/zero > "$W/initrd.img-$v"
  KERNEL_INSTALL_CONF_ROOT="$W/conf" BOOT_ROOT="$W/esp" MACHINE_ID=$MID KERNEL_INSTALL_LAYOUT=bls \
    kernel-install add "$v" "$W/vmlinuz-$v" "$W/initrd.img-$v" > /dev/null
done
cp "$W/esp/loader/loader.conf" "$OUT/systemd-boot/loader.conf"
cp "$W/esp/loader/entries/"*.conf "$OUT/systemd-boot/entries/"
bootctl --esp-path="$W/esp" --no-pager list --json=short | sed "s|$W/esp|/boot/efi|g" \
  > "$OUT/systemd-boot/bootctl-list-json-short.txt"
# boot counting: the 6.1.0-28 entry renamed as systemd-boot renames it after one failed try of three
E="$W/esp/loader/entries"
mv "$E/$MID-6.1.0-28-amd64.conf" "$E/$MID-6.1.0-28-amd64+2-1.conf"
bootctl --esp-path="$W/esp" --no-pager list --json=short | sed "s|$W/esp|/boot/efi|g" \
  > "$OUT/systemd-boot/bootctl-list-json-short-boot-counting.txt"
umount "$W/esp"

# ---- extlinux: Debian's u-boot-update (package u-boot-menu, not installed: run from the .deb) ----------------
mkdir -p "$W/boot" "$W/ubm" "$OUT/extlinux"
(cd "$W" && apt-get download u-boot-menu > /dev/null 2>&1 && dpkg -x u-boot-menu_*.deb "$W/ubm")
for v in 6.1.0-27-arm64 6.1.0-28-arm64; do
  head -c 1024 /dev/zero > "$W/boot/vmlinuz-$v"; head -c 1024 /dev/zero > "$W/boot/initrd.img-$v"
  mkdir -p "$W/boot/dtbs/$v/broadcom"; head -c 512 /dev/zero > "$W/boot/dtbs/$v/broadcom/bcm2711-rpi-4-b.dtb"
done
unshare --mount sh -c "mount --bind '$W/boot' /boot && \
  U_BOOT_ROOT='root=PARTUUID=6c586e13-02' \
  U_BOOT_PARAMETERS='console=ttyS1,115200 console=tty0 rootwait ro quiet' \
  U_BOOT_FDT='broadcom/bcm2711-rpi-4-b.dtb' U_BOOT_FDT_DIR='/boot/dtbs/' \
  U_BOOT_MENU_LABEL='Debian GNU/Linux 12 (bookworm)' sh '$W/ubm/usr/sbin/u-boot-update'" > /dev/null 2>&1
cp "$W/boot/extlinux/extlinux.conf" "$OUT/extlinux/extlinux.conf"

# ---- U-Boot environment: mkenvimage + libubootenv's fw_printenv ---------------------------------------------
mkdir -p "$OUT/u-boot"
mkenvimage -s 0x4000 -o "$W/env.bin" "$OUT/u-boot/vars.txt"
echo "$W/env.bin 0x0000 0x4000" > "$W/fw_env.config"
fw_printenv -c "$W/fw_env.config" > "$OUT/u-boot/fw_printenv.txt"
fw_printenv -V > "$OUT/u-boot/fw_printenv-V.txt"
cp "$W/env.bin" "$W/bad.bin"; printf '\000' | dd of="$W/bad.bin" bs=1 seek=10 conv=notrunc 2> /dev/null
echo "$W/bad.bin 0x0000 0x4000" > "$W/bad.config"
set +e; fw_printenv -c "$W/bad.config" > "$OUT/u-boot/fw_printenv-bad-crc.stdout" \
  2> "$OUT/u-boot/fw_printenv-bad-crc.stderr"; echo "$?" > "$OUT/u-boot/fw_printenv-bad-crc.rc"; set -e

# ---- libvirt: virsh against the test driver, loaded from node.xml ----------------------------------------------
URI="test://$OUT/libvirt/node.xml"
virsh -c "$URI" dumpxml --inactive --security-info rtguest > "$OUT/libvirt/dumpxml-inactive.xml"
virsh -c "$URI" domstate rtguest > "$OUT/libvirt/domstate-running.txt"
virsh -c "$URI" "destroy rtguest; domstate rtguest" | tail -n 2 > "$OUT/libvirt/domstate-shut-off.txt"
virsh -c "$URI" dominfo rtguest | grep -v '^CPU time:' > "$OUT/libvirt/dominfo.txt"
echo "recorded into $OUT"
