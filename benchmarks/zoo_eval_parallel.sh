#!/bin/bash
# CI, Neural Cleanse and Pixel on every model of a zoo, side by side, in parallel processes on one device,
# then one report over all of them (the figures of the README's whole-zoo baseline table):
#
#   benchmarks/zoo_eval_parallel.sh ZOO OUT_DIR [DEVICE] [CI_SHARDS NC_SHARDS PIXEL_SHARDS]
#
# e.g. `benchmarks/zoo_eval_parallel.sh runs/zoo_seed2 runs/eval_s2 cuda 2 4 5` (11 processes sharing one
# H100: 206 s for 44 models). Each process writes OUT_DIR/DET-K.json as it goes (resumable: run it again
# to finish an interrupted evaluation), its log beside it; OUT_DIR/all.json holds the joined rows.
# The tiny models leave a GPU mostly idle per process, so shards share it well; on a CPU use 1 1 1.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
zoo=$1 out=$2 device=${3:-cpu}
shards=(ci "${4:-1}" nc "${5:-1}" pixel "${6:-1}")
mkdir -p "$out"
pids=()
for ((i = 0; i < ${#shards[@]}; i += 2)); do
  det=${shards[i]} n=${shards[i + 1]}
  for ((k = 1; k <= n; k++)); do
    # one thread each: the processes share the cores, the GPU does the work
    OMP_NUM_THREADS=1 scanner zoo eval "$zoo" --detectors "$det" --device "$device" --shard "$k/$n" \
      --json "$out/$det-$k.json" >"$out/$det-$k.log" 2>&1 &
    pids+=($!)
  done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
[ "$failed" -eq 0 ] || echo "$failed evaluation process(es) failed: see $out/*.log" >&2
scanner zoo report "$out"/ci-*.json "$out"/nc-*.json "$out"/pixel-*.json --zoo "$zoo" --json "$out/all.json"
exit "$failed"
