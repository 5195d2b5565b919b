#!/bin/bash
# The training step before and after a change, alternating, one process at a time:
#   git worktree add /tmp/before <commit>
#   bash benchmarks/ab_train.sh /tmp/before [rounds]
# Each tree runs its own benchmarks/bench_train.py (gptlab's default row of the `small`
# workload) on its own src/; prints tokens/s and the last loss of each run.
set -euo pipefail
before=$(cd "$1" && pwd)
rounds=${2:-3}
after=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
for i in $(seq "$rounds"); do
  for side in before after; do
    tree=$before; [ "$side" = after ] && tree=$after
    PYTHONPATH="$tree/src" PYTHONUNBUFFERED=1 "$python" "$tree/benchmarks/bench_train.py" \
      --workload small --json | grep '^{' |
      "$python" -c "import json, sys; r = json.loads(sys.stdin.read()); print('$side', $i, r['tokens_per_s'], r['last_loss'])"
  done
done
