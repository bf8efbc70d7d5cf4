#!/usr/bin/env bash
# A real Prometheus (Debian's `prometheus` package) scraping qrloop's roles on this host. Optional: the loop
# runs without it; the test suite uses it (tests/test_prometheus.py), so scripts/setup.sh installs it.
#
#   scripts/prometheus.sh install   apt-get install prometheus (its promtool too), unless already there
#   scripts/prometheus.sh start     generate the scrape config (`qrloop prometheus config`: every role's
#                                   /metrics port from the settings, the alert rules of ops/prometheus/),
#                                   check it with promtool, start Prometheus, wait until it is ready
#   scripts/prometheus.sh stop      stop it (SIGTERM, then wait); its data survives
#   scripts/prometheus.sh status    running or not, and where
#
# Everything lives under $QRLOOP_PROMETHEUS__HOME (default ~/.cache/qrloop/prometheus): prometheus.yml,
# data/, prometheus.log, prometheus.pid. It listens on 127.0.0.1:$QRLOOP_PROMETHEUS__PORT (default 9090);
# the ports it scrapes follow the same QRLOOP_* settings `qrloop run` reads.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${QRLOOP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qrloop}"
home="${QRLOOP_PROMETHEUS__HOME:-$cache/prometheus}"
port="${QRLOOP_PROMETHEUS__PORT:-9090}"
pidfile="$home/prometheus.pid"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
python="$(project_python)"

log() { printf '[prometheus] %s\n' "$*" >&2; }

install() {
  if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    log "already installed: $(prometheus --version 2>&1 | head -n 1)"
    return
  fi
  if [ "$(id -u)" != 0 ]; then log "need root: sudo apt-get install -y prometheus"; exit 1; fi
  log "installing Prometheus from Debian"
  apt-get update -qq
  # --no-install-recommends: the exporters and the web console libraries are not needed here.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package's service (where an init system runs) would take port 9090 with its own config.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
}

start() {
  install
  if is_running; then
    log "already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"
    return
  fi
  mkdir -p "$home/data"
  (cd "$repo" && PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m qrloop prometheus config) >"$home/prometheus.yml"
  promtool check config "$home/prometheus.yml" >/dev/null
  log "starting on 127.0.0.1:$port (config $home/prometheus.yml)"
  setsid nohup prometheus --config.file="$home/prometheus.yml" --storage.tsdb.path="$home/data" \
    --web.listen-address="127.0.0.1:$port" --web.enable-lifecycle >"$home/prometheus.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 1 120); do
    if ! is_running; then
      log "Prometheus exited during start; last lines of $home/prometheus.log:"
      tail -n 20 "$home/prometheus.log" >&2
      exit 1
    fi
    if "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$port/-/ready" 2>/dev/null; then
      log "ready: http://127.0.0.1:$port/ (targets: /targets, alerts: /alerts)"
      return
    fi
    sleep 0.5
  done
  log "Prometheus did not become ready in 60 s; see $home/prometheus.log"
  exit 1
}

stop() {
  stop_pid 30
}

status() {
  if is_running; then
    echo "running: pid $(cat "$pidfile"), http://127.0.0.1:$port/, config $home/prometheus.yml"
  else
    echo "stopped"
    return 3
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
