# Shared by the service scripts (kafka.sh, prometheus.sh): sourced, never run. Each script sets `repo` and
# `pidfile` and defines `log` before using these.

# The project's interpreter: $QRLOOP_PYTHON, else the clone's virtual environment, else python3.
project_python() {
  if [ -n "${QRLOOP_PYTHON:-}" ]; then
    echo "$QRLOOP_PYTHON"
  elif [ -x "$repo/.venv/bin/python" ]; then
    echo "$repo/.venv/bin/python"
  else
    echo python3
  fi
}

is_running() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# stop_pid SECONDS: SIGTERM the process in $pidfile, wait up to SECONDS for it to exit (a controlled shutdown
# flushes its data, so the next start skips recovery), then SIGKILL it.
stop_pid() {
  local patience="$1" pid
  if ! is_running; then
    log "not running"
    rm -f "$pidfile"
    return
  fi
  pid="$(cat "$pidfile")"
  log "stopping (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 1 "$((patience * 2))"); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; log "stopped"; return; }
    sleep 0.5
  done
  log "did not stop in $patience s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}
