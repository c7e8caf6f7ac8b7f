"""Distillation losses: `loss(student_logits, teacher_logits, ...) -> scalar`, mean over the batch.

Logits are [batch, classes]. A loss is chosen by the `_target_` of conf/loss/<name>.yaml; its other keys
(`temperature`, `standardize`, `weight`, a loss's own weights) are passed as keywords. A loss whose
signature takes `labels` ([batch] class indices) or `epoch` (1-based, the epoch the step belongs to; None
where the caller does not say, e.g. outside training) receives them from the step, as a term would
(engine/terms.py `Distillation`). `check_settings`, where a loss has it, checks its keyword settings when
the config is read (config/registry.py `bind`), so a bad value stops the run before any work.

Every shipped loss takes

- `standardize`: logit standardization (Sun et al., "Logit Standardization in Knowledge Distillation",
  CVPR 2024): each network's logits are replaced by their Z-score over the classes,
  (z - mean(z)) / (std(z) + 1e-7) (std with Bessel's correction, as the authors' code), before the loss;
  `temperature` is then the paper's base temperature. The loss no longer depends on a shift or a positive
  scale of either network's logits (up to the epsilon).
- `weight`: a multiplier of the loss itself (the published KD+LS weighs KL by 9; DIST on CIFAR-100 by 2).
  The objective's `(1 - alpha)` multiplies it too.

A user's own loss is any function of this form named by a `_target_` (see docs/how-to/own-model.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from jacdistill_cli.config.checks import SettingError, boolean, number, whole

STANDARDIZE_EPSILON = 1e-7


def standardized(logits: Tensor, standardize: bool = True) -> Tensor:
    """[batch, classes] -> the Z-score of each row, (z - mean) / (std + 1e-7), or the logits themselves."""
    if not standardize:
        return logits
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + STANDARDIZE_EPSILON)


def check_common(temperature: Any = 4.0, standardize: Any = False, weight: Any = 1.0, **own: Any) -> None:
    for key in ("labels", "epoch"):
        if key in own:
            raise SettingError(key, own[key], "it is not a setting: the loss receives it from each step")
    number("temperature", temperature, low=0, low_open=True, allowed="it must be a number > 0")
    boolean("standardize", standardize)
    number("weight", weight, low=0, low_open=True, allowed="it must be a number > 0 (loss=none for no distillation)")


def checked(check: Callable[..., None]) -> Callable[[Callable], Callable]:
    """Attach `check` (the loss's keyword settings -> None or SettingError) as the loss's `check_settings`."""
    def attach(function: Callable) -> Callable:
        function.check_settings = check
        return function
    return attach


@checked(check_common)
def kl(student: Tensor, teacher: Tensor, temperature: float = 4.0, standardize: bool = False,
       weight: float = 1.0) -> Tensor:
    """temperature^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch (Hinton et al. 2015).
    The T^2 keeps gradient magnitudes comparable across temperatures."""
    return weight * kl_per_sample(standardized(student, standardize), standardized(teacher, standardize),
                                  temperature).mean()


def kl_per_sample(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """[batch, classes] x2 -> T^2 KL(teacher || student) of each sample [batch]."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1) * temperature ** 2


@checked(check_common)
def mse(student: Tensor, teacher: Tensor, temperature: float = 4.0, standardize: bool = False,
        weight: float = 1.0) -> Tensor:
    """Squared error of the softened probabilities, summed over classes, mean over the batch."""
    student, teacher = standardized(student, standardize), standardized(teacher, standardize)
    diff = F.softmax(student / temperature, dim=1) - F.softmax(teacher / temperature, dim=1)
    return weight * diff.pow(2).sum(dim=1).mean()


@checked(check_common)
def ce(student: Tensor, teacher: Tensor, temperature: float = 4.0, standardize: bool = False,
       weight: float = 1.0) -> Tensor:
    """Cross-entropy of the student to the teacher's argmax (temperature plays no part; standardization
    changes no argmax but scales the student's logits)."""
    return weight * F.cross_entropy(standardized(student, standardize), teacher.argmax(dim=1))


def no_distillation(student: Tensor, teacher: Tensor, temperature: float = 4.0, standardize: bool = False,
                    weight: float = 1.0) -> Tensor:
    return student.new_zeros(())


# ---------------------------------------------------------------------------------------------
# Decoupled knowledge distillation
# ---------------------------------------------------------------------------------------------

def dkd_parts(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """The two parts of decoupled KD per sample (Zhao et al., CVPR 2022), each times T^2:

        TCKD = KL(b_T || b_S), b = (p_target, 1 - p_target), the binary target / non-target split
        NCKD = KL(q_T || q_S), q the softmax over the non-target classes alone

    so that, per sample, T^2 KL(p_T || p_S) = TCKD + (1 - p_T,target) NCKD. student, teacher
    [batch, classes], labels [batch] -> (tckd [batch], nckd [batch]). The probabilities are taken in
    log space (log(1 - p_t) as a log-sum-exp of the other classes), exact where p_t is close to 1."""
    batch, classes = student.shape
    target = F.one_hot(labels, classes).bool()

    def split(logits: Tensor) -> tuple[Tensor, Tensor]:
        scaled = logits / temperature
        whole_set = torch.logsumexp(scaled, dim=1)
        others = scaled[~target].view(batch, classes - 1)
        binary = torch.stack([scaled[target] - whole_set, torch.logsumexp(others, dim=1) - whole_set], dim=1)
        return binary, F.log_softmax(others, dim=1)   # log b [batch, 2], log q [batch, classes - 1]

    binary_student, others_student = split(student)
    binary_teacher, others_teacher = split(teacher)
    tckd = (binary_teacher.exp() * (binary_teacher - binary_student)).sum(dim=1)
    nckd = (others_teacher.exp() * (others_teacher - others_student)).sum(dim=1)
    return tckd * temperature ** 2, nckd * temperature ** 2


def dkd_warmup(epoch: int | None, warmup_epochs: int) -> float:
    """The linear warm-up of DKD: min(epoch / warmup_epochs, 1) (mdistiller's, with 1-based epochs);
    1 without a warm-up or where the epoch is not known (None: evaluation, check, a caller that does not
    pass it)."""
    if epoch is None or warmup_epochs == 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)


def two_parts(first: tuple[str, Any], second: tuple[str, Any]) -> None:
    """The weights (name, value) of a loss's two parts: each >= 0, not both 0 (loss=none is no distillation)."""
    for name, value in (first, second):
        number(name, value, low=0, allowed="it must be a number >= 0")
    if float(first[1]) == 0 and float(second[1]) == 0:
        raise SettingError(second[0], second[1], f"with loss.{first[0]}=0 it must be > 0 (loss=none for no "
                           "distillation)")


def check_dkd(tckd_weight: Any = 1.0, nckd_weight: Any = 8.0, warmup_epochs: Any = 20, **common: Any) -> None:
    check_common(**common)
    two_parts(("tckd_weight", tckd_weight), ("nckd_weight", nckd_weight))
    whole("warmup_epochs", warmup_epochs, low=0, allowed="it must be an integer >= 0 (0: no warm-up)")


@checked(check_dkd)
def dkd(student: Tensor, teacher: Tensor, labels: Tensor, epoch: int | None = None, temperature: float = 4.0,
        tckd_weight: float = 1.0, nckd_weight: float = 8.0, warmup_epochs: int = 20, standardize: bool = False,
        weight: float = 1.0) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022):
    min(epoch / warmup_epochs, 1) * mean over the batch of (tckd_weight * TCKD + nckd_weight * NCKD)
    (see `dkd_parts`). The paper's CIFAR-100 settings (mdistiller): temperature 4, tckd_weight 1,
    nckd_weight 8 (2 for resnet56 -> resnet20, 6 for vgg13 -> vgg8), warm-up 20 of 240 epochs, with
    cross-entropy of weight 1. `labels` [batch]; `epoch` 1-based, None for no warm-up factor."""
    student, teacher = standardized(student, standardize), standardized(teacher, standardize)
    tckd, nckd = dkd_parts(student, teacher, labels, temperature)
    return weight * dkd_warmup(epoch, warmup_epochs) * (tckd_weight * tckd + nckd_weight * nckd).mean()


# ---------------------------------------------------------------------------------------------
# DIST
# ---------------------------------------------------------------------------------------------

def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a with the same row of b, [n, m] x2 -> [n] (the authors' form:
    the cosine of the centred rows, eps in the denominator)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def check_dist(inter_weight: Any = 1.0, intra_weight: Any = 1.0, **common: Any) -> None:
    check_common(**common)
    two_parts(("inter_weight", inter_weight), ("intra_weight", intra_weight))


@checked(check_dist)
def dist(student: Tensor, teacher: Tensor, temperature: float = 4.0, inter_weight: float = 1.0,
         intra_weight: float = 1.0, standardize: bool = False, weight: float = 1.0) -> Tensor:
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022): with
    Y = softmax(logits / T) [batch, classes] of each network,

        T^2 * (inter_weight * (1 - mean_b pearson(Y_S[b], Y_T[b]))          inter-class: each sample's row
               + intra_weight * (1 - mean_c pearson(Y_S[:, c], Y_T[:, c])))  intra-class: each class's column

    The intra-class relation is over the batch: it needs at least 2 samples. The paper's weights are 1 and 1;
    its CIFAR-100 code (hunto/image_classification_sota, configs/strategies/distill/dist_cifar.yaml,
    `kd: dist_t4`) uses T = 4 and weighs the whole loss by 2 beside cross-entropy of weight 1 (ImageNet: T = 1,
    weight 1)."""
    student, teacher = standardized(student, standardize), standardized(teacher, standardize)
    y_student = F.softmax(student / temperature, dim=1)
    y_teacher = F.softmax(teacher / temperature, dim=1)
    inter = 1 - pearson_rows(y_student, y_teacher).mean()
    intra = 1 - pearson_rows(y_student.t(), y_teacher.t()).mean()
    return weight * temperature ** 2 * (inter_weight * inter + intra_weight * intra)
