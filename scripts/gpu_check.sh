#!/usr/bin/env bash
# The GPU check: on a machine with one or more CUDA GPUs, from a checkout with jacdistill installed
# (pip install -e .), run
#
#     bash scripts/gpu_check.sh [OUT_DIR]
#
# It runs `jacdistill check` in each precision, `jacdistill bench` in each precision, a short
# `jacdistill train` per precision, and a 2-GPU `train` when there are 2 GPUs, and exits non-zero on
# any failure or on a missed bench target. Every command's output and run directory go under OUT_DIR
# (default outputs/gpu_check/DATE-TIME); the last line says which steps failed.
set -uo pipefail
out="${1:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$out"
jd=(jacdistill)
command -v jacdistill >/dev/null || jd=(python -m jacdistill_cli)
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
echo "gpu check: $gpus CUDA GPU(s); torch $(python -c 'import torch; print(torch.__version__)'); output in $out"
if [ "$gpus" -lt 1 ]; then
  echo "gpu check: torch sees no CUDA GPU on this machine" >&2
  exit 2
fi
failed=()
step() {   # step NAME ARGS...: run one command, keep its output, note a failure
  local name=$1; shift
  echo "== $name: ${jd[*]} $*"
  if "${jd[@]}" "$@" > "$out/$name.log" 2>&1; then
    tail -n 3 "$out/$name.log"
  else
    echo "   FAILED (exit $?); see $out/$name.log"; tail -n 5 "$out/$name.log"; failed+=("$name")
  fi
}
for precision in 32 bf16 16; do
  step "check-$precision" check student=cnn device=cuda trainer.precision=$precision "hydra.run.dir=$out/check-$precision"
done
for precision in 32 bf16 16; do
  step "bench-$precision" bench device=cuda trainer.precision=$precision "hydra.run.dir=$out/bench-$precision"
  met=$(python -c "import json,sys; print(json.load(open('$out/bench-$precision/bench.json')).get('targets_met'))" 2>/dev/null)
  if [ "$met" != "True" ]; then echo "   bench targets missed at precision $precision"; failed+=("bench-$precision-targets"); fi
done
for precision in 32 bf16 16; do
  step "train-$precision" train dataset=fake teacher=cnn student=cnn \
    trainer.device=cuda trainer.epochs=2 teacher.epochs=2 trainer.precision=$precision "hydra.run.dir=$out/train-$precision"
done
if [ "$gpus" -ge 2 ]; then
  step "train-2gpu" train dataset=fake teacher=cnn student=cnn \
    trainer.device=cuda trainer.devices=2 trainer.epochs=2 teacher.epochs=2 "hydra.run.dir=$out/train-2gpu"
  ws=$(python -c "import json; print(json.load(open('$out/train-2gpu/metrics.json'))['world_size'])" 2>/dev/null)
  [ "$ws" = "2" ] || { echo "   world_size is '$ws', not 2"; failed+=("train-2gpu-world-size"); }
else
  echo "== train-2gpu: skipped (one GPU)"
fi
if [ ${#failed[@]} -eq 0 ]; then
  echo "gpu check: all steps passed"
else
  echo "gpu check: FAILED: ${failed[*]}"
  exit 1
fi
