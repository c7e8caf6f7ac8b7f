#!/usr/bin/env bash
# Reproduces the digits few-shot table (docs/results/digits-fewshot.md): CNN teacher, MLP students on
# 1, 3 and 10 samples per class, as ce_only, kd and kd_jacobian, 5 seeds; 45 jobs of 100 epochs, minutes
# on a CPU. The sweep ends with its report: SWEEP_DIR/report.md holds the table, report.csv and report.png
# the rest.
#
#   scripts/digits_fewshot.sh [SWEEP_DIR] [override ...]
#
# SWEEP_DIR defaults to outputs/digits_fewshot/reproduction-DATE-TIME; overrides narrow or change the
# sweep like any other (seed=0 dataset.samples_per_class=1: 3 jobs). Trained teachers are cached under
# $JACDISTILL_CACHE (default ~/.cache/jacdistill), as for every run. Runs `jacdistill` from PATH, or
# $JACDISTILL when set (e.g. JACDISTILL="python -m jacdistill_cli").
set -euo pipefail

sweep_dir=${1:-outputs/digits_fewshot/reproduction-$(date +%Y-%m-%d-%H-%M-%S)}
shift $(( $# > 0 ? 1 : 0 ))
read -ra jacdistill <<< "${JACDISTILL:-jacdistill}"

"${jacdistill[@]}" train experiment=digits_fewshot "hydra.sweep.dir=$sweep_dir" "$@"
echo "the table: $sweep_dir/report.md"
