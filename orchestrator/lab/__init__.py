"""The rehearsal lab: robot units made of real Debian VMs (a host VM and a guest VM) booted through UEFI and GRUB."""
