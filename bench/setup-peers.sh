#!/usr/bin/env bash
# Install what the benchmark compares against; safe to run again (it only adds what is missing).
#
#   setup-peers.sh [--workdir DIR] [--peers-venv DIR] [--no-apt]
#
# 1. Debian packages squid, tinyproxy, socat, haproxy (and gcc, python3-venv when missing),
#    with apt-get update first.  Needs root (or password-less sudo); services are not started.
# 2. A virtualenv with proxy.py (the Python peer; the plain-Twisted references run on the
#    project's own Python and Twisted) at --peers-venv, else $PEERS_VENV, else <workdir>/peers-venv, where
#    <workdir> is --workdir, else $BENCH_WORKDIR, else ${TMPDIR:-/tmp}/tunnel-bench: the same
#    default bench.py uses.  $PEERS_PACKAGES overrides the pinned package list.
# Exits 0 when everything is in place, 1 otherwise (bench.py skips whatever is missing).
set -u

workdir=${BENCH_WORKDIR:-${TMPDIR:-/tmp}/tunnel-bench}
venv=${PEERS_VENV:-}
do_apt=1
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) workdir=$2; shift 2 ;;
    --workdir=*) workdir=${1#*=}; shift ;;
    --peers-venv) venv=$2; shift 2 ;;
    --peers-venv=*) venv=${1#*=}; shift ;;
    --no-apt) do_apt=0; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-peers.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
venv=${venv:-$workdir/peers-venv}
# The versions measured in the published peer run; change them only on purpose.
packages=${PEERS_PACKAGES:-"proxy.py==2.4.10"}
status=0

# ---- 1. system packages (squid and haproxy live in /usr/sbin, which a user's PATH may lack)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
want=""
for b in squid tinyproxy socat haproxy; do
  command -v "$b" >/dev/null 2>&1 || want="$want $b"
done
command -v gcc >/dev/null 2>&1 || want="$want gcc libc6-dev"
python3 -c 'import ensurepip' >/dev/null 2>&1 || want="$want python3-venv"
if [ -z "$want" ]; then
  echo "system packages: squid tinyproxy socat haproxy gcc already installed"
elif [ "$do_apt" = 0 ]; then
  echo "system packages: missing:$want (skipped: --no-apt)"
  status=1
else
  if [ "$(id -u)" = 0 ]; then sudo=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"
  else sudo=none
  fi
  if [ "$sudo" = none ]; then
    echo "system packages: missing:$want; run as root: apt-get update && apt-get install -y$want"
    status=1
  else
    # Keep the packages' init scripts from starting system-wide squid/tinyproxy/haproxy daemons.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null && $sudo chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    echo "system packages: installing$want"
    if $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
       $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $want >/dev/null; then
      echo "system packages: installed$want"
    else
      echo "system packages: apt-get failed for$want"
      status=1
    fi
    [ "$made_policy" = 1 ] && $sudo rm -f /usr/sbin/policy-rc.d
  fi
fi

# ---- 2. the peers' virtualenv
stamp="$venv/.bench-peers"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$packages" ] &&
   "$venv/bin/python" -c 'import proxy' >/dev/null 2>&1; then
  echo "peers venv: $venv already has $packages"
else
  echo "peers venv: creating $venv with $packages"
  mkdir -p "$(dirname "$venv")"
  if ! python3 -m venv "$venv"; then
    echo "peers venv: python3 -m venv failed"
    status=1
  else
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if "$venv/bin/python" -m pip install -q $packages; then
      printf '%s\n' "$packages" > "$stamp"
      echo "peers venv: ready"
    else
      echo "peers venv: pip install failed"
      status=1
    fi
  fi
fi

[ "$status" = 0 ] && echo "setup-peers: done (peers venv $venv)" || echo "setup-peers: incomplete (see above)"
exit $status
