#!/usr/bin/env bash
# Run a test command several times on a busy machine, to catch tests that pass only when the
# machine is idle (fixed sleeps, replies applied out of order, timeouts too tight).
#
#   benchmarks/stress_suite.sh [-n RUNS] [-c CPU_WORKERS] [-- PYTEST COMMAND ...]
#
#   -n RUNS         how many times to run the command (default 3; env STRESS_RUNS)
#   -c CPU_WORKERS  stress-ng CPU workers kept busy meanwhile (default 2; env STRESS_CPU)
#   after --        the command (default: python -m pytest -q -p no:cacheprovider)
#
# Example, the browser tests 3 times beside 2 busy CPU workers:
#
#   benchmarks/stress_suite.sh -n 3 -- python -m pytest -q -p no:cacheprovider tests/test_web_browser.py
#
# Installs nothing: it needs stress-ng (Debian/Ubuntu: apt-get install -y stress-ng). Prints each
# run's wall time and result; stops stress-ng on exit (also on Ctrl-C); exits 1 if any run failed.
set -uo pipefail

runs="${STRESS_RUNS:-3}"
cpu="${STRESS_CPU:-2}"
while [ $# -gt 0 ]; do
  case "$1" in
    -n) runs="${2:?-n needs a number}"; shift 2 ;;
    -c) cpu="${2:?-c needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
case "$runs" in ''|*[!0-9]*|0) echo "stress_suite: RUNS must be a positive whole number, got '$runs'" >&2; exit 2 ;; esac
case "$cpu" in ''|*[!0-9]*|0) echo "stress_suite: CPU_WORKERS must be a positive whole number, got '$cpu'" >&2; exit 2 ;; esac

if [ $# -gt 0 ]; then
  cmd=("$@")
else
  cmd=(python -m pytest -q -p no:cacheprovider)
fi

if ! command -v stress-ng >/dev/null 2>&1; then
  echo "stress_suite: stress-ng is not installed; install it first:" >&2
  echo "    apt-get install -y stress-ng        (as root, Debian/Ubuntu)" >&2
  exit 2
fi

stress_pid=""
stop_stress() {
  if [ -n "$stress_pid" ]; then
    kill "$stress_pid" 2>/dev/null          # stress-ng stops its own workers on SIGTERM
    wait "$stress_pid" 2>/dev/null
    stress_pid=""
  fi
}
trap stop_stress EXIT
trap 'stop_stress; exit 130' INT
trap 'stop_stress; exit 143' TERM

# --timeout: a safety net, should this script be killed without running its trap (SIGKILL).
stress-ng --cpu "$cpu" --timeout 6h --quiet &
stress_pid=$!
sleep 1  # let the workers start before the first run is timed
if ! kill -0 "$stress_pid" 2>/dev/null; then
  echo "stress_suite: stress-ng did not start" >&2
  stress_pid=""
  exit 2
fi

echo "stress_suite: stress-ng --cpu $cpu (pid $stress_pid) on $(nproc) cores; $runs run(s) of: ${cmd[*]}"
failed=0
summary=()
for i in $(seq 1 "$runs"); do
  echo "=== run $i/$runs ==="
  start=$(date +%s.%N)
  "${cmd[@]}"
  rc=$?
  end=$(date +%s.%N)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then result="pass"; else result="FAIL (exit $rc)"; failed=$((failed + 1)); fi
  line="run $i/$runs: ${secs} s, $result"
  summary+=("$line")
  echo "=== $line ==="
done

stop_stress
echo "stress_suite: summary (stress-ng --cpu $cpu)"
for line in "${summary[@]}"; do echo "  $line"; done
if [ "$failed" -gt 0 ]; then
  echo "stress_suite: $failed of $runs run(s) failed"
  exit 1
fi
echo "stress_suite: all $runs run(s) passed"
