#!/bin/bash
# Issue 32: the CPU figures this session still needs, in order (~15 min). Run it alone on a
# quiet machine (no helper, no test run): bash benchmarks/quiet_queue.sh; logs in $B
# (default /tmp/bench). Each figure in BENCHMARKS.md names the CPU this prints first.
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
PY=.venv/bin/python
B=${B:-/tmp/bench}; mkdir -p "$B"
step() { local name=$1; shift; echo "== $name $(date +%T) load $(cut -d' ' -f1 /proc/loadavg): $*"; "$@" > "$B/$name.log" 2>&1; echo "== $name done rc=$? $(date +%T)"; }
lscpu | grep -E "Model name" ; echo "flags: $(grep -o -w -E 'avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
# the thread default right after a finished job and beside a running one
step threads_after_job $PY benchmarks/bench_threads_after_job.py --job-seconds 40 --json
# decode beside one spinning program: the default against one thread per core and one
step decode_busy $PY benchmarks/bench_busy_decode.py --busy 1 --new-tokens 200 --json
# the default run (make demo's command) and its score: the sizing line names the speed it measured
step demo .venv/bin/gptlab train --out "$B/demo"
step demo_eval .venv/bin/gptlab eval --checkpoint "$B/demo" --json
echo ALL DONE $(date +%T)
