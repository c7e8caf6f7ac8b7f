#!/usr/bin/env bash
# Two checkouts timed against each other on the CPU, one thread, alternately (A B A B ...), so that load from
# other processes hits both alike:
#
#     bash scripts/bench_ab.sh A_CHECKOUT A_PYTHON B_CHECKOUT B_PYTHON [ROUNDS] [PAIRS...]
#     bash scripts/bench_ab.sh /work/A /work/venvs/A/bin/python . .venv/bin/python 2 vit cnn
#
# Each round runs `jacdistill bench bench_pair=PAIR threads=1` in A, then in B, for every pair (default: vit,
# then cnn), and then B's comparison with the plain way (python -m jacdistill_cli.proofs.plain_way). The table
# rows (ms and ratios to plain KD, measured within each run) go to the screen, whole outputs under
# outputs/bench_ab/DATE-TIME; `uptime` before each run says how busy the machine was.
set -uo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
a_dir=$(cd "$1" && pwd); a_py=$2; b_dir=$(cd "$3" && pwd); b_py=$4; rounds=${5:-2}; shift 4; shift $(( $# > 0 ? 1 : 0 ))
pairs=("$@"); [ ${#pairs[@]} -eq 0 ] && pairs=(vit cnn)
out="$b_dir/outputs/bench_ab/$(date +%Y-%m-%d_%H-%M-%S)"
mkdir -p "$out"
for round in $(seq "$rounds"); do
  for pair in "${pairs[@]}"; do
    for side in A B; do
      if [ "$side" = A ]; then dir=$a_dir; py=$a_py; else dir=$b_dir; py=$b_py; fi
      log="$out/${pair}_${round}_${side}.log"
      echo "== $pair round $round $side ($dir): $(uptime)"
      (cd "$dir" && "$py" -m jacdistill_cli bench "bench_pair=$pair" threads=1 "hydra.run.dir=$out/${pair}_${round}_${side}" \
        > "$log" 2>&1) || echo "   FAILED: see $log"
      grep -E "^([0-9]+ classes|plain KD|top1|target|projected|noise|exact|naive|targets missed|  [a-z])" "$log"
    done
  done
  echo "== plain way, B, round $round: $(uptime)"
  (cd "$b_dir" && "$b_py" -m jacdistill_cli.proofs.plain_way --rounds 15) | tee "$out/plain_way_$round.log"
done
echo "outputs in $out"
