#!/bin/sh
# Runs inside the freshly bootstrapped root (chroot) once, at image build time.
set -eu
echo pyshim-vm >/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 pyshim-vm\n' >/etc/hosts
passwd -d root
# Root comes from the kernel command line (rw); nothing else to mount.
: >/etc/fstab
# The guest has no network: nothing waits for it, nothing fetches.
systemctl mask systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer man-db.timer 2>/dev/null || true
systemctl enable containerd.service pyshim-vm.service
# `vm.sh shell`: a root shell on the console.
mkdir -p /etc/systemd/system/console-getty.service.d
cat >/etc/systemd/system/console-getty.service.d/autologin.conf <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,38400,9600 console $TERM
UNIT
# UML looks for its modules under the usual path.
for d in /usr/lib/uml/modules/*; do
    [ -d "$d" ] && ln -sfn "$d" "/lib/modules/$(basename "$d")"
done
apt-get clean
rm -rf /var/lib/apt/lists/*
