#!/usr/bin/env bash
# Kernel same-page merging (KSM) for pyshim's shims: off unless the operator asks for
# it with PYSHIM_KSM=1. Run by install.sh.
#
# Shims forked from one template copy the same pages with the same writes, and ksmd
# can fold the copies back together (per container 8.5 -> 2.9 MB PSS here; bench/README.md
# "Same-page merging"), for ~2.5% of one core while any shim runs. The price is
# isolation: once ksmd runs, any process that marks its memory mergeable (a
# container's included) can time its writes to learn whether a page with a given
# content exists elsewhere, and merged pages are what rowhammer-style attacks on
# shared pages need. So by default nothing node-wide changes. PYSHIM_KSM=1 turns ksmd
# on (now and at every boot) and, where containerd runs under systemd, puts
# PYSHIM_KSM=1 in its environment, which is what makes forked shims mark their memory
# (shim/sys/ksm.py); elsewhere, put it in containerd's environment yourself.
#
# The paths can be moved (tests): KSM_RUN, TMPFILES_DIR, SYSTEMD_RUN_DIR,
# CONTAINERD_DROPIN_DIR, SYSTEMCTL.
set -euo pipefail

ksm_run=${KSM_RUN:-/sys/kernel/mm/ksm/run}
ksm_boot=${TMPFILES_DIR:-/etc/tmpfiles.d}/pyshim-ksm.conf
systemd_run=${SYSTEMD_RUN_DIR:-/run/systemd/system}
dropin_dir=${CONTAINERD_DROPIN_DIR:-/etc/systemd/system/containerd.service.d}
ksm_unit=$dropin_dir/pyshim-ksm.conf
systemctl=${SYSTEMCTL:-systemctl}

if [ "${PYSHIM_KSM:-0}" = 1 ]; then
    if [ ! -w "$ksm_run" ]; then
        echo "ksm.sh: no KSM in this kernel; shims will not share identical pages" >&2
        exit 0
    fi
    echo 1 > "$ksm_run"
    if [ -d "$(dirname "$ksm_boot")" ]; then
        echo "w /sys/kernel/mm/ksm/run - - - - 1" > "$ksm_boot"  # again at every boot
    fi
    if [ -d "$systemd_run" ]; then
        mkdir -p "$dropin_dir"
        printf '[Service]\nEnvironment=PYSHIM_KSM=1\n' > "$ksm_unit"
        "$systemctl" daemon-reload
        echo "ksm.sh: restart containerd for its shims to use same-page merging" >&2
    fi
else
    # An earlier install turned it on by default: that choice was not the operator's.
    # ksmd's current state is left as found; from the next boot on it is the kernel's.
    for f in "$ksm_boot" "$ksm_unit"; do
        if [ -e "$f" ]; then
            rm -f "$f"
            echo "ksm.sh: removed $f (same-page merging is opt-in: PYSHIM_KSM=1)" >&2
        fi
    done
fi
