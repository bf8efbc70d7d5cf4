#!/usr/bin/env bash
# PostgreSQL for the policy store in production mode: Debian's postgresql, one private cluster on loopback.
#
#   scripts/postgres.sh install   apt-get install postgresql when no server binaries are present
#   scripts/postgres.sh start     initdb once, start, create the qrloop role and databases, print the URL
#   scripts/postgres.sh stop      fast, clean shutdown (the data directory survives)
#   scripts/postgres.sh status    running or not
#   scripts/postgres.sh url       print the SQLAlchemy URL to put in QRLOOP_DATABASE_URL
#
# We run our own cluster with pg_ctl instead of Debian's pg_ctlcluster/systemd: containers and CI machines
# rarely run an init system, and a private data directory cannot collide with a cluster the host already has.
set -euo pipefail

port="${QRLOOP_PG_PORT:-5432}"
user="${QRLOOP_PG_USER:-qrloop}"
password="${QRLOOP_PG_PASSWORD:-qrloop}"
databases=(qrloop qrloop_test)

log() { printf '[postgres] %s\n' "$*" >&2; }

if [ "$(id -u)" = 0 ]; then
  # initdb refuses to run as root; the cluster belongs to the 'postgres' system user the package creates.
  datadir="${QRLOOP_PG_DATA:-/var/lib/qrloop/postgres}"
  as_owner() { runuser -u postgres -- "$@"; }
else
  datadir="${QRLOOP_PG_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/qrloop/postgres}"
  as_owner() { "$@"; }
fi
logfile="$datadir/../postgres.log"

pg_bin() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$d" ] && [ -x "$d/pg_ctl" ] && echo "$d"
}

install() {
  if pg_bin >/dev/null; then
    log "server binaries present in $(pg_bin)"
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    log "PostgreSQL is not installed and this is not root: run 'sudo apt-get install -y postgresql'"
    exit 1
  fi
  log "installing Debian's postgresql"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  # The package may start its own cluster on 5432 through an init script; ours would then collide.
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true; done
  fi
}

is_running() {
  local bin
  bin="$(pg_bin)" || return 1
  [ -f "$datadir/PG_VERSION" ] && as_owner "$bin/pg_ctl" -D "$datadir" status >/dev/null 2>&1
}

url() {
  echo "postgresql+psycopg://${user}:${password}@127.0.0.1:${port}/qrloop"
}

psql_admin() {
  as_owner "$(pg_bin)/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

start() {
  install
  local bin
  bin="$(pg_bin)"
  if [ ! -f "$datadir/PG_VERSION" ]; then
    log "initialising a cluster in $datadir"
    mkdir -p "$datadir"
    [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$(dirname "$datadir")"
    as_owner "$bin/initdb" -D "$datadir" -U postgres --auth-local=trust --auth-host=trust -E UTF8 >/dev/null
  fi
  if is_running; then
    log "already running"
  else
    log "starting on 127.0.0.1:$port"
    # Loopback only; the socket directory is the data directory so no system path needs to exist.
    as_owner "$bin/pg_ctl" -D "$datadir" -l "$logfile" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $datadir -c max_connections=100 -c fsync=on" start >/dev/null
  fi
  if ! psql_admin -c "select 1" >/dev/null 2>&1; then
    log "server is not answering; see $logfile"
    exit 1
  fi
  if [ "$(psql_admin -c "select 1 from pg_roles where rolname='${user}'")" != 1 ]; then
    psql_admin -c "create role ${user} login createdb password '${password}'"
  fi
  for db in "${databases[@]}"; do
    if [ "$(psql_admin -c "select 1 from pg_database where datname='${db}'")" != 1 ]; then
      psql_admin -c "create database ${db} owner ${user}"
    fi
  done
  log "ready; QRLOOP_DATABASE_URL=$(url)"
  url
}

stop() {
  if is_running; then
    as_owner "$(pg_bin)/pg_ctl" -D "$datadir" -m fast -w stop >/dev/null
    log "stopped"
  else
    log "not running"
  fi
}

status() {
  if is_running; then echo "running on 127.0.0.1:$port, data in $datadir"; else echo "stopped"; return 3; fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) url ;;
  *) echo "usage: $0 install|start|stop|status|url" >&2; exit 2 ;;
esac
