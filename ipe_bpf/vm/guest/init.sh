#!/bin/sh
# PID 1 of the ipe-bpf test VM (installed as /usr/local/sbin/ipe-bpf-vm-init).
#
# Mounts the kernel filesystems, finds the data disks by their virtio serial (ctl: a tar
# the host wrote with the command; work: the project, mounted at /work; results: a raw disk
# this script writes a tar of /results onto), runs the command as root in /work, prints its
# exit status as a marker line on the console and powers off.  Works both as init= on the
# ext4 root disk and as rdinit= from an initramfs (no switch_root: / stays the rootfs).
bb=/bin/busybox
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
LANG=C.UTF-8
IPE_BPF_IN_VM=1
export PATH HOME LANG IPE_BPF_IN_VM

fail() {
    echo "IPE-BPF-VM-FAIL $*"
    halt
}

halt() {
    $bb sync
    $bb poweroff -f
    echo o >/proc/sysrq-trigger
    $bb sleep 30
}

watchdog() { # SECONDS: shortly before the host gives up, show what every process waits on
    $bb sleep "$1" || return 0
    echo "IPE-BPF-VM-WATCHDOG still running after $1 s; processes (pid state wchan command):"
    for p in /proc/[0-9]*; do
        cmd=$($bb tr '\0' ' ' <"$p/cmdline" 2>/dev/null)
        [ -n "$cmd" ] || continue # kernel threads
        state=$($bb awk '/^State:/ {print $2}' "$p/status" 2>/dev/null)
        echo "  ${p#/proc/} $state $($bb cat "$p/wchan" 2>/dev/null) $cmd"
    done
}

mnt() { # TYPE SOURCE TARGET [OPTIONS]
    $bb mkdir -p "$3"
    mountpoint -q "$3" && return 0
    $bb mount -t "$1" -o "${4:-defaults}" "$2" "$3"
}

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

mnt proc proc /proc || fail "cannot mount /proc"
mnt sysfs sysfs /sys || fail "cannot mount /sys"
mnt devtmpfs devtmpfs /dev mode=0755 || fail "cannot mount /dev"
mnt devpts devpts /dev/pts gid=5,mode=620,ptmxmode=666
mnt tmpfs tmpfs /dev/shm mode=1777,nosuid,nodev
mnt tmpfs tmpfs /run mode=0755,nosuid,nodev
mnt tmpfs tmpfs /tmp mode=1777,nosuid,nodev
mnt securityfs securityfs /sys/kernel/security
mnt bpf bpf /sys/fs/bpf mode=0700
mnt tracefs tracefs /sys/kernel/tracing
mnt debugfs debugfs /sys/kernel/debug 2>/dev/null
mnt cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
$bb ln -sf /proc/self/fd /dev/fd
$bb hostname ipe-bpf-vm
$bb ip link set lo up 2>/dev/null

modprobe -q virtio_pci 2>/dev/null
modprobe -q virtio_blk || fail "cannot load virtio_blk"

i=0
while ! disk ctl >/dev/null || ! disk work >/dev/null || ! disk results >/dev/null; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "data disks (serial ctl, work, results) not found"
    $bb sleep 0.05
done
ctl=$(disk ctl)
work=$(disk work)
results=$(disk results)

$bb mkdir -p /run/ipe-bpf-vm /results
tar -xf "$ctl" -C /run/ipe-bpf-vm || fail "cannot read the control disk $ctl"
nonce=$($bb cat /run/ipe-bpf-vm/nonce)
mnt ext4 "$work" /work || fail "cannot mount the work disk $work"

wd=$($bb cat /run/ipe-bpf-vm/watchdog 2>/dev/null)
if [ -n "$wd" ]; then
    watchdog "$wd" &
    wd_pid=$!
fi
cd /work
# stdin is /dev/null: nothing answers on the console, and a program that prompts when stdin
# is a terminal (mke2fs on an existing image, ...) would otherwise wait forever
/bin/sh /run/ipe-bpf-vm/command.sh </dev/null
status=$?
[ -n "$wd_pid" ] && kill "$wd_pid" 2>/dev/null
cd /
echo "IPE-BPF-VM-STATUS $nonce $status"
if tar -C /results -cf "$results" . ; then
    echo "IPE-BPF-VM-RESULTS $nonce ok"
else
    echo "IPE-BPF-VM-RESULTS $nonce failed"
fi
$bb umount /work 2>/dev/null
halt
