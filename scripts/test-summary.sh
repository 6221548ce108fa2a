#!/usr/bin/env bash
# Runs the given test command, streaming its output, and ends with one line totalling every
# `test result:` line cargo printed (cargo's own last line is the doc-tests' count, which is
# often zero and would misreport the run).
set -uo pipefail
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
"$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
passed=$(grep -o '[0-9]* passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -o '[0-9]* failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "all tests: $passed passed, $failed failed"
exit "$status"
