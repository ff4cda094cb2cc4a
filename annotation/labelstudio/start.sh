#!/usr/bin/env bash
# Starts a local Label Studio for development, tests and demos, and waits until it answers.
#
#   127.0.0.1 only, SQLite under $LABEL_STUDIO_STATE_DIR, an admin user and API token taken from the
#   environment (created on first start), signup only through the invite link, SSRF protection on,
#   analytics/version checks/Sentry off, and images served from
#   $LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT as /data/local-files/?d=... (annotation/client.py adds the
#   local storage connection each project needs for that).
#
# Prints "url=..." on success. PID (and the process's start time: annotation/labelstudio/pid.sh) in
# $LABEL_STUDIO_STATE_DIR/labelstudio.pid, log beside it.
# Stop with annotation/labelstudio/stop.sh (same environment).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LABEL_STUDIO_VENV:-$ROOT/.venv-labelstudio}"
STATE="${LABEL_STUDIO_STATE_DIR:-$ROOT/.run/labelstudio}"
PORT="${LABEL_STUDIO_PORT:-8080}"
START_TIMEOUT="${LABEL_STUDIO_START_TIMEOUT:-240}"
PIDFILE="$STATE/labelstudio.pid"
LOG="$STATE/labelstudio.log"

if [ ! -x "$VENV/bin/label-studio" ]; then
  echo "label-studio is not installed in $VENV; run annotation/labelstudio/install.sh" >&2
  exit 1
fi
# shellcheck source=annotation/labelstudio/pid.sh
. "$ROOT/annotation/labelstudio/pid.sh"
if RUNNING="$(ls_running_pid "$PIDFILE")"; then
  # started already (by make up, make labelstudio or an earlier call): nothing to do
  echo "Label Studio already running (pid $RUNNING); stop it with annotation/labelstudio/stop.sh" >&2
  echo "url=http://127.0.0.1:$PORT"
  exit 0
fi
# Label Studio silently moves to the next free port when its port is taken, which would leave
# clients talking to whatever holds the port: refuse instead.
if "$VENV/bin/python" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)"; then
  echo "port $PORT on 127.0.0.1 is already in use; set LABEL_STUDIO_PORT to a free port" >&2
  exit 1
fi

mkdir -p "$STATE"
export LABEL_STUDIO_BASE_DATA_DIR="${LABEL_STUDIO_BASE_DATA_DIR:-$STATE/data}"
export LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="${LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT:-$ROOT/data/labelstudio-files}"
export LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true
export LABEL_STUDIO_USERNAME="${LABEL_STUDIO_USERNAME:-admin@needles.local}"
export LABEL_STUDIO_PASSWORD="${LABEL_STUDIO_PASSWORD:-needles-dev-password}"
export LABEL_STUDIO_USER_TOKEN="${LABEL_STUDIO_USER_TOKEN:-needles-dev-token-0123456789abcdef}"
# Read once, on the first start (when the organisation is created).
export LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true
# Annotators join only through the organisation's invite link (annotation/client.py uses it).
export LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true
# Every member of the organisation can add webhooks, URL imports, storages and ML backends (the community
# edition has no roles), so the server must never fetch loopback or private addresses for them: SSRF
# protection and the ML backend check are always on (the prefixed names win over HEARTEX_/bare ones).
# Nothing in needles needs a loopback callback (rounds are polled); to let one webhook receiver through,
# see the README's "Security" paragraph (USE_DEFAULT_BANNED_SUBNETS / USER_ADDITIONAL_BANNED_SUBNETS).
export LABEL_STUDIO_SSRF_PROTECTION_ENABLED=true LABEL_STUDIO_ML_BLOCK_LOCAL_IP=true
# Uploaded SVGs are sanitised (script in an SVG would run in the other annotators' browsers); no
# tracebacks in the UI.
export LABEL_STUDIO_SVG_SECURITY_CLEANUP=true LABEL_STUDIO_DEBUG_MODAL_EXCEPTIONS=false
export COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false SENTRY_DSN= FRONTEND_SENTRY_DSN=
mkdir -p "$LABEL_STUDIO_BASE_DATA_DIR" "$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"

nohup "$VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$PORT" \
  --data-dir "$LABEL_STUDIO_BASE_DATA_DIR" \
  --username "$LABEL_STUDIO_USERNAME" --password "$LABEL_STUDIO_PASSWORD" \
  --user-token "$LABEL_STUDIO_USER_TOKEN" --enable-legacy-api-token \
  >>"$LOG" 2>&1 </dev/null &
PID=$!
ls_write_pid "$PID" "$PIDFILE"

# First start runs the migrations (about 45 s on 2 cores); later starts take a few seconds.
deadline=$((SECONDS + START_TIMEOUT))
until "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "Label Studio exited during start; last log lines:" >&2
    tail -n 30 "$LOG" >&2
    rm -f "$PIDFILE"
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "Label Studio did not answer on port $PORT within ${START_TIMEOUT}s; see $LOG" >&2
    kill "$PID" 2>/dev/null || true
    rm -f "$PIDFILE"
    exit 1
  fi
  sleep 1
done
# The health check must have been answered by our process, not by one that grabbed the port meanwhile.
if ! ss -Hltnp "sport = :$PORT" | grep -q "pid=$PID,"; then
  echo "something other than pid $PID answers on port $PORT; see $LOG" >&2
  kill "$PID" 2>/dev/null || true
  rm -f "$PIDFILE"
  exit 1
fi
echo "url=http://127.0.0.1:$PORT"
