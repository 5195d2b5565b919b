#!/bin/bash
# GPU check of distributed training through the CLI, for a machine with one or more GPUs:
#   bash benchmarks/check_dist_gpu.sh        (from the repository root; OUT=dir keeps the logs)
# It trains a small char-level model 30 steps, as one plain process and under torchrun (one
# process per visible GPU) with DDP and FSDP2: first fp32 without compile, whose loss curves
# must agree closely, then bf16 with torch.compile. It resumes the FSDP2 bf16 run from its
# step-15 checkpoint and samples from its consolidated checkpoint on one process. The table
# prints each run's last loss, its largest difference from the plain run, and tokens/s.
set -u
export PYTHONPATH=$PWD/src GPTLAB_CACHE=${GPTLAB_CACHE:-/tmp/gptlab-dist-check/cache}
OUT=${OUT:-/tmp/gptlab-dist-check}
RUNS=/tmp/gptlab-dist-check/runs
rm -rf "$RUNS"; mkdir -p "$OUT" "$RUNS"
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, '| processes per run:', $NGPU)"
python3 - <<'PY'
import random
r = random.Random(0)
w = "the king queen castle sword horse night day love war peace crown river stone bread wine".split()
lines = ["Every effort moves you."]
lines += [" ".join(r.choice(w) for _ in range(r.randint(4, 12))).capitalize() + "." for _ in range(20000)]
open("/tmp/gptlab-dist-check/corpus.txt", "w").write("\n".join(lines))
PY
A="train --preset tiny --data /tmp/gptlab-dist-check/corpus.txt --data.tokenizer char --max-steps 30
   --train.log_every 1 --train.eval_freq 10 --train.batch_size 16 --model.context_length 128
   --model.emb_dim 256 --model.n_heads 4 --model.n_layers 4 --train.batch_tokens $((8192 * NGPU))
   --train.checkpoint_every 15 --train.keep_last 5 --quiet --device cuda"
TR="python3 -m torch.distributed.run --standalone --nproc_per_node $NGPU -m gptlab"
run() {
  local name=$1; shift
  local t0=$SECONDS
  "$@" --out "$RUNS/$name" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
}
run plain32 python3 -m gptlab $A --precision fp32 --compile off
run ddp32 $TR $A --precision fp32 --compile off --parallel ddp
run fsdp32 $TR $A --precision fp32 --compile off --parallel fsdp
run plainbf python3 -m gptlab $A --precision bf16 --compile on
run ddpbf $TR $A --precision bf16 --compile on --parallel ddp
run fsdpbf $TR $A --precision bf16 --compile on --parallel fsdp
cp -r "$RUNS/fsdpbf" "$RUNS/fsdpbf_res"
rm -rf "$RUNS/fsdpbf_res/checkpoints/step-00000030" "$RUNS/fsdpbf_res/checkpoints/latest"
run fsdpbf_res $TR $A --precision bf16 --compile on --parallel fsdp --resume
python3 -m gptlab generate --checkpoint "$RUNS/fsdpbf" --prompt "Every" --max-new-tokens 20 \
  --seed 0 --device cuda >"$OUT/generate.log" 2>&1
echo "generate from the FSDP2 checkpoint: exit $? -> $(tail -1 "$OUT/generate.log")"
RUNS=$RUNS python3 - <<'PY'
import json, os
runs = os.environ["RUNS"]
def recs(r): return [json.loads(l) for l in open(f"{runs}/{r}/metrics.jsonl")]
def curve(r): return {x["step"]: x["loss"] for x in recs(r) if x["event"] == "train"}
def tps(r):
    v = [x["tokens_per_s"] for x in recs(r) if x["event"] == "train" and x["step"] > 5]
    return sum(v) / len(v) if v else float("nan")
print("| run | processes | mode | precision | compiled | last loss | max abs diff vs plain | tokens/s |")
print("|---|---|---|---|---|---|---|---|")
for group in (["plain32", "ddp32", "fsdp32"], ["plainbf", "ddpbf", "fsdpbf", "fsdpbf_res"]):
    ref = curve(group[0])
    for r in group:
        try:
            c, st = curve(r), next(x for x in recs(r) if x["event"] == "start")
        except (OSError, StopIteration):
            print(f"| {r} | failed, see its log |"); continue
        d = max(abs(c[s] - ref[s]) for s in ref if s in c)
        print(f"| {r} | {st.get('world_size', 1)} | {st.get('parallel', 'none')} | {st['precision']} "
              f"| {st['compiled']} | {c[max(c)]:.5f} | {d:.1e} | {tps(r):,.0f} |")
PY
