#!/usr/bin/env bash
# The CIFAR-100 table of the distillation benchmark (CRD/RepDistiller, mdistiller): the five published
# teachers distilled into their students as kd, kd_jacobian, dkd, dkd_jacobian, kd_ls, kd_ls_jacobian, dist and
# dist_jacobian over 3 seeds (120 runs of 240 epochs, experiment=crd_cifar100), ending with the sweep's report:
# mean and std over the seeds of each pair and recipe.
#
#   scripts/crd_cifar100.sh DATA_ROOT TEACHER_DIR [OVERRIDE ...]
#
# DATA_ROOT holds cifar-100-python/ (or cifar-100-python.tar.gz); TEACHER_DIR holds the published folders
# <arch>_vanilla/ckpt_epoch_240.pth of resnet56, resnet110, resnet32x4, wrn_40_2 and vgg13.
# Environment: JOBS=N runs N jobs at once on this machine (Hydra's joblib launcher; several small
# networks share one GPU well), SWEEP_DIR sets the sweep directory. Overrides narrow or change the sweep,
# e.g. `seed=0 crd_pair=resnet32x4-resnet8x4` (8 runs), `recipe=kd,dkd,kd_ls` or `trainer.num_workers=8`.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
data_root=$1
teacher_dir=$2
shift 2

if [[ ! -d "$data_root/cifar-100-python" && ! -f "$data_root/cifar-100-python.tar.gz" ]]; then
    echo "crd_cifar100.sh: error: $data_root holds neither cifar-100-python/ nor cifar-100-python.tar.gz" >&2
    exit 2
fi
missing=()
for arch in resnet56 resnet110 resnet32x4 wrn_40_2 vgg13; do
    file="$teacher_dir/${arch}_vanilla/ckpt_epoch_240.pth"
    [[ -f "$file" ]] || missing+=("$file")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "crd_cifar100.sh: error: teacher files not found: ${missing[*]}" >&2
    exit 2
fi

extra=()   # the sweep directory: the preset's (outputs/crd_cifar100/DATE/TIME-xxxxxx) unless SWEEP_DIR is set
if [[ -n "${SWEEP_DIR:-}" ]]; then
    extra+=("hydra.sweep.dir=$SWEEP_DIR")
fi
if [[ -n "${JOBS:-}" ]]; then
    extra+=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")
fi
# The sweep ends with its report (printed, and written to report.md, .csv, .png) and its directory.
jacdistill train experiment=crd_cifar100 "dataset.root=$data_root" "teacher_dir=$teacher_dir" "${extra[@]}" "$@"
