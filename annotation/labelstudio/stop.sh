#!/usr/bin/env bash
# Stops the Label Studio started by start.sh, by the PID it recorded (never by process name).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${LABEL_STUDIO_STATE_DIR:-$ROOT/.run/labelstudio}"
PIDFILE="$STATE/labelstudio.pid"
if [ ! -f "$PIDFILE" ]; then
  echo "no Label Studio pid file at $PIDFILE; nothing to stop"
  exit 0
fi
PID="$(cat "$PIDFILE")"
if kill -0 "$PID" 2>/dev/null; then
  kill -TERM "$PID"
  for _ in $(seq 1 30); do
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$PID" 2>/dev/null; then
    echo "Label Studio (pid $PID) ignored SIGTERM for 15 s; sending SIGKILL" >&2
    kill -KILL "$PID"
  fi
fi
rm -f "$PIDFILE"
echo "stopped Label Studio (pid $PID)"
