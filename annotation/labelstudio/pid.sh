# Sourced by start.sh and stop.sh: the PID file names the process *and* its start time, so a PID that was
# reused by another process (after a reboot, or once Label Studio died) is never taken for Label Studio,
# never reported as running and never signalled. File format: "PID START" (START: the kernel's start time
# of the process in clock ticks since boot, field 22 of /proc/PID/stat).

# The start time of PID, or nothing when there is no such process.
ls_start_time() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  # the command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'
  stat="${stat##*) }"
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

# Record PID (just started) in the PID file $2.
ls_write_pid() {
  local start
  start="$(ls_start_time "$1")" || start=""
  echo "$1 $start" >"$2.tmp" && mv "$2.tmp" "$2"
}

# Print the PID recorded in $1 when that very process still runs; otherwise remove the (stale) file,
# say so, and fail. A file from before the start time was recorded (one number) must name a process whose
# command line is Label Studio's.
ls_running_pid() {
  local file="$1" pid start now
  [ -f "$file" ] || return 1
  read -r pid start <"$file" || true
  if [[ "$pid" =~ ^[0-9]+$ ]] && now="$(ls_start_time "$pid")"; then
    if [ -n "${start:-}" ] && [ "$start" = "$now" ]; then
      echo "$pid"
      return 0
    fi
    if [ -z "${start:-}" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "label-studio"; then
      echo "$pid"
      return 0
    fi
    echo "stale Label Studio PID file $file: pid $pid is now another process; removed it, signalled nothing" >&2
  fi
  rm -f "$file"
  return 1
}
