#!/bin/sh
# `ipe-bpf` in the test VM (/usr/local/bin/ipe-bpf): the checkout at /work, so the README's
# commands work verbatim inside `ipe-bpf vm run`.
PYTHONPATH=/work${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH
exec python3 -m ipe_bpf "$@"
