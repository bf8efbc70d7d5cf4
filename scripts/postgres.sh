#!/usr/bin/env bash
# PostgreSQL for the policy store in production mode: Debian's postgresql, one private cluster on loopback.
#
#   scripts/postgres.sh install   apt-get install postgresql when no server binaries are present
#   scripts/postgres.sh start     initdb once, start, create the qrloop role and databases, print the URL;
#                                 an existing cluster still on 'trust' is migrated to scram-sha-256 in place
#   scripts/postgres.sh stop      fast, clean shutdown (the data directory survives)
#   scripts/postgres.sh status    running or not
#   scripts/postgres.sh url       print the SQLAlchemy URL to put in QRLOOP_DATABASE_URL (no password in it)
#
# We run our own cluster with pg_ctl instead of Debian's pg_ctlcluster/systemd: containers and CI machines
# rarely run an init system, and a private data directory cannot collide with a cluster the host already has.
#
# Authentication is scram-sha-256 for every connection (never 'trust': any local user would be superuser).
# The passwords are generated once and kept in files only their owner can read (0600, in a 0700 directory):
#   ${XDG_CONFIG_HOME:-~/.config}/qrloop/postgres-password        the qrloop role's (QRLOOP_PG_SECRET)
#   ${XDG_CONFIG_HOME:-~/.config}/qrloop/postgres-admin-password  the 'postgres' superuser's
# They are never printed: `url` prints a URL without the password, and qrloop's settings fill it in from the
# first file (settings.database_password_file); so do the tests (tests/conftest.py).
set -euo pipefail
umask 077

port="${QRLOOP_PG_PORT:-5432}"
user="${QRLOOP_PG_USER:-qrloop}"
databases=(qrloop qrloop_test)
config_dir="${XDG_CONFIG_HOME:-$HOME/.config}/qrloop"
secret_file="${QRLOOP_PG_SECRET:-$config_dir/postgres-password}"
admin_secret_file="$(dirname "$secret_file")/postgres-admin-password"

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
  echo "postgresql+psycopg://${user}@127.0.0.1:${port}/qrloop"
}

# A secret file: created with a fresh random password (0600, directory 0700) unless it already exists.
ensure_secret() {
  local file="$1"
  mkdir -p "$(dirname "$file")"
  chmod 700 "$(dirname "$file")"
  if [ ! -s "$file" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file")
    log "generated a password in $file"
  fi
  chmod 600 "$file"
}

secret() { tr -d '\n' <"$1"; }

psql_admin() {
  # The password travels in psql's environment only (never on a command line, never printed).
  PGPASSWORD="$(secret "$admin_secret_file")" as_owner \
    "$(pg_bin)/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

hba() { echo "$datadir/pg_hba.conf"; }

uses_trust() { grep -Eq '^[[:space:]]*(local|host)[^#]*[[:space:]]trust([[:space:]]|$)' "$(hba)"; }

# Set both roles' passwords from the secret files (scram hashes). The SQL goes through stdin, so the
# passwords never appear on a command line.
set_passwords() {
  local verb=alter
  [ "$(psql_admin -c "select 1 from pg_roles where rolname='${user}'")" = 1 ] || verb=create
  psql_admin >/dev/null <<SQL
set password_encryption = 'scram-sha-256';
alter role postgres password '$(secret "$admin_secret_file")';
${verb} role ${user} login createdb password '$(secret "$secret_file")';
SQL
}

# An existing cluster initialised with 'trust' (older versions of this script): set the passwords, switch
# every trust line of pg_hba.conf to scram-sha-256 (a copy of the old file is kept), and reload: no restart,
# open connections stay. Running it again changes nothing.
migrate_from_trust() {
  uses_trust || return 0
  log "cluster in $datadir still uses 'trust': switching it to scram-sha-256"
  psql_admin -c "alter system set password_encryption = 'scram-sha-256'" >/dev/null
  set_passwords
  as_owner cp -p "$(hba)" "$(hba).trust-backup"
  as_owner sed -i -E 's/^([[:space:]]*(local|host)[^#]*[[:space:]])trust([[:space:]]|$)/\1scram-sha-256\3/' "$(hba)"
  as_owner "$(pg_bin)/pg_ctl" -D "$datadir" reload >/dev/null
  log "pg_hba.conf now requires scram-sha-256 (old file: $(hba).trust-backup)"
}

start() {
  install
  local bin
  bin="$(pg_bin)"
  ensure_secret "$secret_file"
  ensure_secret "$admin_secret_file"
  if [ ! -f "$datadir/PG_VERSION" ]; then
    log "initialising a cluster in $datadir (scram-sha-256)"
    mkdir -p "$datadir"
    [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$(dirname "$datadir")"
    # initdb reads the superuser's password from a file the cluster's owner can read; removed right after.
    local pwfile
    pwfile="$(mktemp "$(dirname "$datadir")/.pwfile.XXXXXX")"
    secret "$admin_secret_file" >"$pwfile"
    [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
    as_owner "$bin/initdb" -D "$datadir" -U postgres --pwfile="$pwfile" \
      --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 >/dev/null || { rm -f "$pwfile"; exit 1; }
    rm -f "$pwfile"
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
    log "server is not answering, or not with the password in $admin_secret_file; see $logfile"
    exit 1
  fi
  migrate_from_trust
  set_passwords
  for db in "${databases[@]}"; do
    if [ "$(psql_admin -c "select 1 from pg_database where datname='${db}'")" != 1 ]; then
      psql_admin -c "create database ${db} owner ${user}"
    fi
  done
  log "ready; QRLOOP_DATABASE_URL=$(url) (password: $secret_file)"
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
