#!/bin/sh
# The generate -> permissive -> learn -> enforce walk-through of the README, as run in the test VM:
#   ipe-bpf vm run -- sh scripts/generate-walkthrough.sh
# It enables fs-verity on the guest's python3, ls and what they load (the VM root disk is a fresh
# snapshot every run). Each command is echoed with "$ " before its output.
ipe() { python3 -m ipe_bpf "$@"; }
cd /tmp
echo '$ ipe-bpf load'; ipe load >/dev/null 2>&1 && echo "(loaded)"
echo '$ ipe-bpf policy generate --enable-verity --name apps /usr/bin/python3 /usr/bin/ls -o apps.pol'
ipe policy generate --enable-verity --name apps /usr/bin/python3 /usr/bin/ls -o apps.pol
echo '$ grep -c "^op=" apps.pol'; grep -c "^op=" apps.pol
echo '$ sed -n "1,12p" apps.pol'; sed -n '1,12p' apps.pol | cut -c1-110
echo '$ ipe-bpf enforce off && ipe-bpf policy deploy --unsigned apps.pol && ipe-bpf policy activate apps'
ipe enforce off && ipe policy deploy --unsigned apps.pol 2>&1 | cut -c1-110 && ipe policy activate apps
echo '$ python3 -c "import _ssl, sqlite3"; ls / >/dev/null      # the workload, permissive'
python3 -c "import _ssl, sqlite3"; ls / >/dev/null
echo '$ ipe-bpf audit tail --json > permissive.json; wc -l < permissive.json'
ipe audit tail --json > permissive.json; wc -l < permissive.json
echo '$ ipe-bpf policy learn permissive.json --policy apps.pol --enable-verity -o apps-2.pol'
ipe policy learn permissive.json --policy apps.pol --enable-verity -o apps-2.pol
echo '$ diff apps.pol apps-2.pol | head -16'; diff apps.pol apps-2.pol | head -16 | cut -c1-110
echo '$ ipe-bpf policy update apps apps-2.pol --unsigned && ipe-bpf enforce on'
ipe policy update apps apps-2.pol --unsigned 2>&1 | cut -c1-110 && ipe enforce on
echo '$ python3 -c "import _ssl, sqlite3; print(_ssl.OPENSSL_VERSION)"'
python3 -c "import _ssl, sqlite3; print(_ssl.OPENSSL_VERSION)"
echo '$ head -n1 /etc/os-release'; head -n1 /etc/os-release; echo "(exit status $?)"
echo '$ ipe-bpf policy explain apps-2.pol --file /usr/bin/head --exit-status --json > explain.json'
ipe policy explain apps-2.pol --file /usr/bin/head --exit-status --json > explain.json; echo "(exit status $?)"
python3 -c 'import json; print(json.load(open("explain.json"))["audit"])'
echo '$ ipe-bpf audit tail > enforced.log; ipe-bpf enforce off'
ipe audit tail > enforced.log; ipe enforce off >/dev/null
echo '$ grep -c action=DENY enforced.log; grep -o "ipe_hook=.*" enforced.log'
grep -c action=DENY enforced.log; grep -o "ipe_hook=.*" enforced.log | cut -c1-150
