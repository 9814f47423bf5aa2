#!/bin/sh
# Run the CONNECT proxy benchmark: bench.py builds the C load generator and target
# into the work dir, starts every proxy on loopback, checks them, measures, and
# prints/writes the tables.  `tox -e bench` runs this script.
#
#   bench/run_bench.sh                                   # defaults: 3 rounds, ~10 min
#   bench/run_bench.sh --quick                           # smoke test (~2 min)
#   bench/run_bench.sh --proxies direct,ours,squid --rounds 5
#
# `ours` is the twistd next to the Python that runs bench.py, so use a Python that
# has this project installed: $PYTHON if set, else the active virtualenv's
# ($VIRTUAL_ENV, which tox sets), else python3 on PATH.
# Writes only to the work dir (--workdir, else $BENCH_WORKDIR, else
# ${TMPDIR:-/tmp}/tunnel-bench).  All options: run_bench.sh --help
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  py=$VIRTUAL_ENV/bin/python
else
  py=python3
fi
exec "$py" "$here/bench.py" "$@"
