#!/usr/bin/env bash
# The newcomer's entry point (the README's two commands):
#   ./scripts/dev.sh demo    set everything up from nothing and run the main job
#   ./scripts/dev.sh test    set up (idempotent) and run the test suite against the real broker and database
#   ./scripts/dev.sh setup   only set up        ./scripts/dev.sh stop   stop Kafka and PostgreSQL
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) bash scripts/setup.sh "$@" ;;
  demo)
    bash scripts/setup.sh
    .venv/bin/qrloop smoke
    exec .venv/bin/qrloop demo "$@"
    ;;
  test)
    bash scripts/setup.sh
    exec .venv/bin/python -m pytest -q "$@"
    ;;
  stop)
    bash scripts/kafka.sh stop
    bash scripts/postgres.sh stop
    ;;
  *) echo "usage: $0 demo|test|setup|stop [args...]" >&2; exit 2 ;;
esac
