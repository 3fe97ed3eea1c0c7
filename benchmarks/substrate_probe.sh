#!/bin/bash
# Substrate probe: does captioning only a share of overlays (Phase.describe < 1) make clean prompt-tuned
# models harder to move with untrained overlays, while BadNets / Blended still take? Three arms, each on
# the same small zoo (seed 5, 6 datasets x {1 clean CSC, BadNets, Blended}): the shipped backbone
# (base), + STEPS fine-tuning steps with describe=0.25 (d025), + STEPS with describe=1 (d100, the control
# for "more training"). Each arm runs in its own copy of the committed tree (git archive) whose bundled
# weights it may replace; the repository's own weights are never touched. Any other arm name X takes its
# weights from the file OUT/X.safetensors (a backbone trained elsewhere, e.g. by gpu_pretrain.py).
#
#   benchmarks/substrate_probe.sh [OUT]      (env: STEPS=400, ARMS="base d025 d100")
#   python benchmarks/substrate_probe_summary.py [OUT]
#
# About 1 h 40 min on 2 cores (each 400-step fine-tune ~19 min when sharing them).
set -u
STEPS=${STEPS:-400}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-runs/substrate_probe}")
mkdir -p $OUT
DS=shapes,letters,positions,counts,sizes,pairs
for arm in ${ARMS:-base d025 d100}; do
  tree=${TMPDIR:-/tmp}/scanner_probe_$arm
  rm -rf $tree && mkdir -p $tree && (cd $ROOT && git archive HEAD | tar -x -C $tree)
  export PYTHONPATH=$tree SCANNER_ONNX_PROVIDER=cpu
  cd $tree  # python - puts the working directory first on sys.path
  if [ -f $OUT/$arm.safetensors ]; then
    cp $OUT/$arm.safetensors $tree/scanner/clip/weights/scanner-tiny.safetensors
  elif [ $arm != base ]; then
    d=$([ $arm = d025 ] && echo 0.25 || echo 1.0)
    /usr/bin/time -f "%e s" $ROOT/.venv/bin/python - <<PY > $OUT/$arm.pretrain.log 2>&1
from scanner.clip.backbone import bundled_weights_path, read_fp32_weights
from scanner.zoo.pretrain import Phase, PretrainConfig, pretrain, save_weights
import scanner
assert scanner.__file__.startswith("$tree"), scanner.__file__
cfg = PretrainConfig(seed=11, warmup=20, phases=(Phase($STEPS, 2e-4, focus=0.7, caption_aware=True, drill=0.3, describe=$d),))
def on_step(step, loss, scale):
    if step % 50 == 0: print(step, round(loss, 3), round(scale, 1), flush=True)
bb, rec = pretrain(cfg, on_step, resume=read_fp32_weights(bundled_weights_path()))
print(save_weights(bb, bundled_weights_path(), rec), rec)
PY
  fi
  cd $tree
  $ROOT/.venv/bin/python -c "from scanner.cli import main; main()" zoo info --no-coop --no-probe --json > $OUT/$arm.info.json 2> $OUT/$arm.info.err
  /usr/bin/time -f "%e s" $ROOT/.venv/bin/python -c "from scanner.cli import main; main()" zoo build $OUT/zoo_$arm --seed 5 --attacks badnets,blended \
    --datasets $DS --clean-per-dataset 1 > $OUT/$arm.build.log 2>&1
  $ROOT/.venv/bin/python $tree/benchmarks/natural_triggers.py --zoo $OUT/zoo_$arm --json $OUT/$arm.nat.json > $OUT/$arm.nat.log 2>&1
  /usr/bin/time -f "%e s" $ROOT/.venv/bin/python -c "from scanner.cli import main; main()" zoo eval $OUT/zoo_$arm --detectors ci --json $OUT/$arm.eval.json \
    > $OUT/$arm.eval.log 2>&1
  cd $ROOT
done
echo done > $OUT/DONE
echo "summary: python $ROOT/benchmarks/substrate_probe_summary.py $OUT"
