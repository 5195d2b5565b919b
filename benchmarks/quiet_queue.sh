#!/bin/bash
# Issues 18-20: every CPU figure still to be measured, in order of need (~80 min).
# Run it alone on a quiet machine: bash benchmarks/quiet_queue.sh; logs in $B (default /tmp/bench).
# The quiet-machine benchmarks of this session, one after another (nothing else runs).
cd /work/main
export PYTHONUNBUFFERED=1
PY=.venv/bin/python
B=${B:-/tmp/bench}; mkdir -p $B
step() { local name=$1; shift; echo "== $name $(date +%T) load $(cut -d' ' -f1 /proc/loadavg): $*"; "$@" > $B/$name.log 2>&1; echo "== $name done rc=$? $(date +%T)"; }
step decode_busy $PY benchmarks/bench_busy_decode.py --busy 1 --new-tokens 200 --json
step finetune $PY benchmarks/bench_finetune.py --shape gpt2-small --batch 8 --seq 256 --steps 10 --warmup 2 --rank 8 --targets attn
step tasks $PY benchmarks/bench_tasks.py --items 1000 --batch-size 16
# The default run, with an in-training task evaluation every 120 steps (~10 in the run) on
# 2 x 200 items from the held-out text: its cost is the run's task_eval_s over its wall_s.
$PY benchmarks/task_scores.py --write-suite $B/suite --items 200
step plays2 $PY benchmarks/bench_quality.py --budget 530 --threads 2 --out $B/runs2 --json $B/quality.jsonl \
    --recipe "cpu train.eval_tasks=$B/suite/suite.toml train.task_eval_every=120"
step task_scores bash -c '.venv/bin/python benchmarks/task_scores.py --checkpoint $(ls -d '"$B"'/runs2/*/ | head -1)'
step plays1 $PY benchmarks/bench_quality.py --budget 530 --threads 1 --out $B/runs1 --json $B/quality.jsonl --recipe cpu
# Today's default before the time budget (1,200 fixed steps, 570 s safety net) on one thread.
step plays1old $PY benchmarks/bench_quality.py --threads 1 --out $B/runs1old --json $B/quality.jsonl \
    --recipe "cpu train.budget=steps train.max_steps=1200 train.max_time=570 train.warmup_frac=0 train.eval_every_frac=0"
step fortunes $PY benchmarks/bench_quality.py --budget 530 --threads 2 --data corpora/fortunes.txt --out $B/runsf --json $B/fortunes.jsonl --recipe cpu --recipe nanogpt-cpu
step kjv $PY benchmarks/bench_quality.py --budget 530 --threads 2 --data corpora/kjv.txt --out $B/runsk --json $B/kjv.jsonl --recipe cpu --recipe nanogpt-cpu
echo ALL DONE $(date +%T)
