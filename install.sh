#!/usr/bin/env bash
# Installs everything rt-tune and its lab need on a fresh Debian bookworm machine (as root):
# Debian packages for the lab VMs and tests, then the Python package into ./.venv.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
PKGS=(
  qemu-system-x86 qemu-utils ovmf       # the lab VMs: QEMU (TCG) booting UEFI firmware
  qemu-system-arm qemu-efi-aarch64      # the arm64 lab: an EL2 host VM (nested KVM guest inside), AAVMF firmware
  qemu-user-static binfmt-support       # building the arm64 image: its second stage runs under qemu-user
  debootstrap e2fsprogs mtools          # images from Debian packages: root filesystems and the EFI partition
  openssh-client openssh-server         # `tune lab ssh`; a real sshd for the transport tests
  procps iproute2 util-linux            # pgrep, ss, mount/findmnt used by tests
  sqlite3                               # the journal recovery that a damaged-journal error prints, run by a test
  sudo                                  # become: tests with a throwaway non-root user and real sudo rules
  postgresql                            # the journal's PostgreSQL backend: its tests start a throwaway server
  python3 python3-venv python3-pip
  grub2-common systemd-boot u-boot-tools libubootenv-tool libvirt-clients linux-base  # bootloader tools the
                                        # backends' unit tests run for real (grub-editenv, bootctl, fw_setenv, virsh)
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "rt-tune installed: $(.venv/bin/tune --version)"
