"""Networks whose input-gradients vanish where the proofs would be made, and the point they are made at instead.

Many networks zero-initialise their last layer (torchvision's VisionTransformer its classification head): freshly
drawn, their logits do not depend on the input and every input-gradient is exactly 0. There a normalised
Jacobian has no direction, and a Jacobian term's derivative with respect to that layer is not defined: autograd
gives 0, central differences a large number of no meaning. No method can be proven right or wrong at that point.

So before the proofs (`jacdistill check`, bench's agreement of the exact strategies with the naive loop) each
network's input-gradients are measured on the proofs' batch: the logits' input-gradients, in float64, along
OUTPUT_DIRECTIONS standard Gaussian output directions (one vector-Jacobian product each). They vanish when their
largest entry is at most finite_differences.DERIVATIVE_RESOLUTION (1e-8) x max(1, largest |logit|), the smallest derivative the
finite-difference checks resolve. The proofs are then made at a perturbed copy of that network, to which
PERTURBATION_STD x N(0, 1) is added entry by entry in

- the parameter tensors that are all zero and each alone bring the input-gradients back: zero-initialised
  parameters through which every input-gradient passes (a last Linear's weight); where there is none,
- every all-zero parameter tensor together; where that does not bring them back either,
- every parameter tensor.

The draws come from one generator seeded with the proofs' seed, tensor after tensor in the order of
`named_parameters()`, so a check is repeated exactly. A method right at every point is right at the perturbed
one, and a broken one (a gradient cut from the graph, a wrong value) is as broken there.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from jacdistill_cli.proofs.finite_differences import resolution

# The standard deviation of transformer weights' usual initialisation (BERT, GPT-2, timm's ViT heads): large
# enough for input-gradients far above the resolution, small enough to keep a network near its initialisation.
PERTURBATION_STD = 0.02
OUTPUT_DIRECTIONS = 3


@dataclass
class Perturbation:
    """What was added to one network (its role, `student` or `teacher`) so that its input-gradients do not vanish."""
    network: str
    largest_gradient: float         # the largest input-gradient entry before, at most `tolerance`
    tolerance: float                # DERIVATIVE_RESOLUTION x max(1, largest |logit|)
    parameters: list[str]           # the perturbed tensors, as named_parameters() names them
    zero_initialised: bool          # each is all zero and alone brings the input-gradients back
    std: float
    seed: int
    largest_gradient_after: float

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line on what was found and what the checks are made at."""
        names = ", ".join(self.parameters)
        if self.zero_initialised:
            why = f"{names} {'is' if len(self.parameters) == 1 else 'are'} all zero (zero-initialised) and every " \
                  f"input-gradient passes through {'it' if len(self.parameters) == 1 else 'each'}"
        else:
            why = f"no all-zero parameter alone explains it; perturbed: {names}"
        after = (f"where the largest is {self.largest_gradient_after:.1e}"
                 if self.largest_gradient_after > self.tolerance else
                 f"where they still vanish ({self.largest_gradient_after:.1e}): the checks cannot tell right from wrong")
        return (f"{self.network}: its input-gradients vanish on this batch (largest entry {self.largest_gradient:.1e} "
                f"<= {self.tolerance:.1e}): {why}; checked with {self.std:g} x N(0, 1) added to "
                f"{'it' if len(self.parameters) == 1 else 'them'} (seed {self.seed}), {after}")


def largest_input_gradient(model: nn.Module, inputs: Tensor, seed: int) -> tuple[float, float]:
    """(largest |entry| of the logits' input-gradients along OUTPUT_DIRECTIONS Gaussian output directions,
    largest |logit|) of a float64 copy of `model` in its own mode; inputs [batch, *input]. The model and its
    buffers are left as they were."""
    network = copy.deepcopy(model).double()
    x = inputs.detach().double().requires_grad_(True)
    logits = network(x)                                        # [batch, classes]
    generator = torch.Generator().manual_seed(seed)
    largest = 0.0
    for k in range(OUTPUT_DIRECTIONS):
        direction = torch.randn(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
        (gradient,) = torch.autograd.grad(logits, x, direction, retain_graph=k + 1 < OUTPUT_DIRECTIONS,
                                          allow_unused=True)
        if gradient is not None:
            largest = max(largest, float(gradient.abs().max()))
    return largest, float(logits.detach().abs().max())


def vanish(model: nn.Module, inputs: Tensor, seed: int) -> bool:
    """Whether the model's input-gradients on `inputs` are below what the checks resolve."""
    largest, logit = largest_input_gradient(model, inputs, seed)
    return largest <= resolution(logit)


def perturbed(model: nn.Module, names: list[str], seed: int, std: float = PERTURBATION_STD) -> nn.Module:
    """A copy of `model` with std x N(0, 1) added to the parameter tensors `names`, drawn by a generator seeded
    with `seed`, tensor after tensor in the order of named_parameters()."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in names:
                draw = std * torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.add_(draw.to(p.device, p.dtype))
    return moved


def parameters_to_perturb(model: nn.Module, inputs: Tensor, seed: int) -> tuple[list[str], bool]:
    """(the parameter tensors to perturb, whether they are zero-initialised ones through which every
    input-gradient passes), as the module's docstring orders the choices."""
    zeros = [name for name, p in model.named_parameters() if p.numel() and not bool(p.detach().any())]
    alone = [name for name in zeros if not vanish(perturbed(model, [name], seed), inputs, seed)]
    if alone:
        return alone, True
    if zeros and not vanish(perturbed(model, zeros, seed), inputs, seed):
        return zeros, False
    return [name for name, _ in model.named_parameters()], False


def proof_point(model: nn.Module, inputs: Tensor, seed: int, network: str) -> tuple[nn.Module, Perturbation | None]:
    """`model` itself when its input-gradients on `inputs` do not vanish, else its perturbed copy and what was
    perturbed (`network`: its role, for the report)."""
    largest, logit = largest_input_gradient(model, inputs, seed)
    if largest > resolution(logit):
        return model, None
    names, zero_initialised = parameters_to_perturb(model, inputs, seed)
    moved = perturbed(model, names, seed)
    after, _ = largest_input_gradient(moved, inputs, seed)
    return moved, Perturbation(network, largest, resolution(logit), names, zero_initialised, PERTURBATION_STD, seed,
                               after)


def proof_networks(student: nn.Module, teacher: nn.Module, inputs: Tensor,
                   seed: int) -> tuple[nn.Module, nn.Module, list[Perturbation]]:
    """(student, teacher, perturbations): each network as the proofs on `inputs` use it (`proof_point`)."""
    student, student_perturbation = proof_point(student, inputs, seed, "student")
    teacher, teacher_perturbation = proof_point(teacher, inputs, seed, "teacher")
    return student, teacher, [p for p in (student_perturbation, teacher_perturbation) if p is not None]

