#!/usr/bin/env bash
# Stops the Label Studio started by start.sh, by the PID it recorded (never by process name), and only if
# that PID is still the same process (its start time matches: annotation/labelstudio/pid.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${LABEL_STUDIO_STATE_DIR:-$ROOT/.run/labelstudio}"
PIDFILE="$STATE/labelstudio.pid"
# shellcheck source=annotation/labelstudio/pid.sh
. "$ROOT/annotation/labelstudio/pid.sh"
if [ ! -f "$PIDFILE" ]; then
  echo "no Label Studio pid file at $PIDFILE; nothing to stop"
  exit 0
fi
# only the process start.sh started (same PID and start time), never one that reuses its PID
if ! PID="$(ls_running_pid "$PIDFILE")"; then
  echo "Label Studio is not running (nothing to stop)"
  exit 0
fi
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
