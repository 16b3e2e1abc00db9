# The commands behind the README's "Running as a service" output: `ipe-bpf vm run --systemd -- bash docs/service-demo.sh`
set -u
cd /tmp
say() { echo; echo "# \$ $*"; "$@" 2>&1; }
say ipe-bpf service install --now
mkdir -p /mnt/demo
# a fs-verity capable scratch fs
truncate -s 64M /tmp/fsv.img && mkfs.ext4 -q -b 4096 -O verity /tmp/fsv.img && mount -o loop /tmp/fsv.img /mnt/demo
cp /usr/bin/true /mnt/demo/blocked && fsverity enable /mnt/demo/blocked
D=$(fsverity measure /mnt/demo/blocked | cut -d' ' -f1)
printf 'policy_name=demo policy_version=0.0.1\nDEFAULT action=ALLOW\nop=EXECUTE fsverity_digest=%s action=DENY\n' "$D" > /tmp/demo.pol
say ipe-bpf policy deploy --unsigned /tmp/demo.pol
say ipe-bpf policy activate demo
say /mnt/demo/blocked
sleep 3
say ipe-bpf service status
say journalctl -t ipe-bpf IPE_OP=EXECUTE IPE_ACTION=DENY -o cat --no-pager
say ausearch -m MAC_CHECK -i
say tail -n 3 /var/log/ipe-bpf/audit.log
say systemctl is-enabled ipe-bpf.service ipe-bpf-auditd.service
true
