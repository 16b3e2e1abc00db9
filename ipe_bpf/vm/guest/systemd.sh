#!/bin/sh
# The test VM booted with systemd as PID 1 (`ipe-bpf vm run --systemd`), installed as
# /usr/local/sbin/ipe-bpf-vm-systemd and run by two units of the image:
#
#   mount  (ipe-bpf-vm-disks.service, before local-fs.target): finds the data disks by their
#          virtio serial (ctl: the host's tar with the command; work: the project, mounted at
#          /work; results: a raw disk for the tar of /results), like the PID-1 script does
#   run    (ipe-bpf-vm-run.service, after multi-user.target): runs the command as root in /work,
#          prints its exit status as the marker line on the console, writes /results, and
#          asks systemd to power off (a clean shutdown: the root disk of `--state` stays whole)
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
LANG=C.UTF-8
IPE_BPF_IN_VM=1
export PATH HOME LANG IPE_BPF_IN_VM
bb=/bin/busybox
vm=/run/ipe-bpf-vm

say() { echo "$*" >/dev/console; }

disk() { # SERIAL -> /dev/vdX
    for d in /sys/block/vd*; do
        [ -r "$d/serial" ] || continue
        if [ "$($bb cat "$d/serial")" = "$1" ]; then
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 1
}

mount_disks() {
    modprobe -q virtio_pci 2>/dev/null
    modprobe -q virtio_blk || { say "IPE-BPF-VM-FAIL cannot load virtio_blk"; exit 1; }
    i=0
    while ! disk ctl >/dev/null || ! disk work >/dev/null || ! disk results >/dev/null; do
        i=$((i + 1))
        [ "$i" -gt 100 ] && { say "IPE-BPF-VM-FAIL data disks (serial ctl, work, results) not found"; exit 1; }
        $bb sleep 0.05
    done
    $bb mkdir -p "$vm" /work /results
    tar -xf "$(disk ctl)" -C "$vm" || { say "IPE-BPF-VM-FAIL cannot read the control disk"; exit 1; }
    disk results >"$vm/results-disk"
    mountpoint -q /work || $bb mount -t ext4 "$(disk work)" /work || { say "IPE-BPF-VM-FAIL cannot mount the work disk"; exit 1; }
}

run_command() {
    nonce=$($bb cat "$vm/nonce")
    cd /work || exit 1
    /bin/sh "$vm/command.sh" </dev/null
    status=$?
    cd /
    say "IPE-BPF-VM-STATUS $nonce $status"
    if tar -C /results -cf "$($bb cat "$vm/results-disk")" . ; then
        say "IPE-BPF-VM-RESULTS $nonce ok"
    else
        say "IPE-BPF-VM-RESULTS $nonce failed"
    fi
    $bb sync
    systemctl start --no-block --job-mode=replace-irreversibly poweroff.target
}

case "$1" in
    mount) mount_disks ;;
    run) run_command ;;
    *) echo "usage: $0 mount|run" >&2; exit 2 ;;
esac
