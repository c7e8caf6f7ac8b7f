"""What a run is, typed: the run spec each command builds from its composed config once (spec/build.py),
every setting checked there, before any work. Below the commands nothing reads the config: the loop, the
records, the zoo and the engine take these.

    TrainSpec      seed, data, teacher, student, objective, optim, loop, checkpoints, robustness, explain
    TeacherRunSpec jacdistill teacher: seed, data, teacher, loop
    EvaluateSpec   jacdistill evaluate: checkpoints to measure, data, noise, attacks, faithfulness
    CheckSpec      jacdistill check: networks, methods, batch, precision
    BenchSpec      jacdistill bench: networks, methods, strategies, timing
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PRECISIONS = ("32", "bf16", "16")   # trainer.precision; loop/precision.py runs them
SCHEDULES = ("cosine", "constant", "multistep")
RESUME_MODES = ("auto", "never")
SELECT_MODES = ("last", "best")
SALIENCY_MODES = ("abs", "signed")  # how the saliency images draw the input-gradients (trainer.saliency)
REUSE_MODES = ("auto", True, False)
@dataclass(frozen=True)
class DataSpec:
    """The dataset: its node resolved (what builds it, the teacher cache's key, what checkpoints record)."""

    node: dict[str, Any]
    samples_per_class: int | None = None
    split_seed: int = 0

    @property
    def name(self) -> str:
        return str(self.node.get("name", self.node.get("_target_", "?")))


@dataclass(frozen=True)
class ModelSpec:
    """A network of the zoo or the user's: `architecture` is what builds it ({_target_, name, settings}, as
    checkpoints store it); `option` the group's option it was chosen as; `output` picks the logits from a
    model that returns a tuple or dict (None: the model returns logits)."""

    role: str
    architecture: dict[str, Any]
    option: str | None = None
    output: int | str | None = None

    @property
    def selection(self) -> str:
        """How the user selected it, for messages: `student=timm student.arch=vit_tiny_patch16_224`."""
        from jacdistill_cli.zoo.models import selection

        return selection(self.role, self.option, self.architecture)


@dataclass(frozen=True)
class TeacherTrainingSpec:
    """How a teacher is trained when no checkpoint is given (and what its cache key is made of)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    samples_per_class: int | None = None   # the teacher's own subset (None: the full training split)
    training: Any = None                   # robustness/settings.py TeacherTraining: standard, adversarial, trades


@dataclass(frozen=True)
class TeacherSpec:
    """How the teacher is obtained: `checkpoint` (a file), published `weights`, or `model` trained by
    `training` and cached under `cache_dir` (None: not cached, as `jacdistill teacher` does)."""

    model: ModelSpec
    checkpoint: str | None
    training: TeacherTrainingSpec
    cache_dir: Path | None = None

    @property
    def name(self) -> str:
        return str(self.model.architecture.get("name") or self.model.option or "teacher")


@dataclass(frozen=True)
class OptimSpec:
    name: str
    build: Callable[[Any], Any]   # parameters -> torch.optim.Optimizer
    schedule: str                 # cosine | constant | multistep (per epoch)
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1


@dataclass(frozen=True)
class ObjectiveSpec:
    """The objective's settings, checked and built: what engine.objective.distillation_objective takes.
    `idle`: the parts with weight 0, which are not computed ((config node, why))."""

    alpha: float
    temperature: float
    hard_weight: float
    loss_name: str
    loss: Callable[[Any, Any], Any]   # (student logits, teacher logits) -> scalar
    method: Any                       # an engine.methods.JacobianMethod (NoJacobian when alpha is 0)
    features: Any                     # an engine.features.FeatureMethod, or NoFeatures
    terms: tuple[Any, ...] = ()       # a user's own engine.terms.Term objects
    idle: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LoopSpec:
    """The training loop: epochs, batches, evaluation, logging cadence, precision and processes."""

    epochs: int
    batch_size: int
    eval_batch_size: int = 512
    eval_every: int = 1
    num_workers: int = 0
    log_every_steps: int = 50
    precision: str = "32"
    device: str = "auto"
    devices: int = 1
    threads: int | None = None
    sync_batchnorm: bool = False
    saliency: str = "abs"


@dataclass(frozen=True)
class CheckpointSpec:
    resume: str = "auto"                  # auto | never
    select: str = "last"                  # last | best: the weights tested and kept as student.pt
    save_every_steps: int | None = None
    save_every_epochs: int = 1


@dataclass(frozen=True)
class TrainSpec:
    """`jacdistill train`. `config`: the composed config resolved (the run directory's record and claim);
    `hparams`: TensorBoard's HPARAMS of the run."""

    seed: int
    data: DataSpec
    teacher: TeacherSpec
    student: ModelSpec
    objective: ObjectiveSpec
    optim: OptimSpec
    loop: LoopSpec
    checkpoints: CheckpointSpec
    robustness: Any                   # robustness/settings.py RobustnessSettings
    explain: Any = None               # explain/settings.py ExplainSettings (None: not measured)
    reuse_outputs: Any = "auto"       # teacher.reuse_outputs: auto | True | False
    config: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()    # settings that are allowed but probably not what was meant


@dataclass(frozen=True)
class TeacherRunSpec:
    """`jacdistill teacher`: the teacher trained on the dataset's full training split."""

    seed: int
    data: DataSpec
    teacher: TeacherSpec
    loop: LoopSpec
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateSpec:
    """`jacdistill evaluate`: a checkpoint (and optionally a teacher's) on the test split of `data` (None: the
    dataset stored in the checkpoint, its files under `dataset_root`)."""

    checkpoint: str
    teacher_checkpoint: str | None
    data: DataSpec | None
    dataset_root: str | None
    sigmas: tuple[float, ...]
    seed: int
    device: str
    eval_batch_size: int
    robustness: Any
    explain: Any = None
    trust: tuple[str, ...] = ()       # `_target_`s of the user's own models that a checkpoint may name
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckSpec:
    """`jacdistill check`: every method in `methods` proven on `student` and `teacher` (the teacher from its
    checkpoint, else freshly drawn), `batch_size` validation samples."""

    seed: int
    data: DataSpec
    teacher: ModelSpec
    teacher_checkpoint: str | None
    student: ModelSpec
    methods: tuple[str, ...]
    method_nodes: dict[str, Any]            # each method's settings: the configured node, or the shipped one
    configured: dict[str, Any]              # the configured `jacobian` node (for the retain_graph row)
    features: dict[str, Any] | None         # the configured `features` node, or None
    batch_size: int
    device: str
    precision: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchSpec:
    """`jacdistill bench`: one step of each candidate timed, a table per class count."""

    teacher: ModelSpec
    student: ModelSpec
    data: DataSpec
    classes: tuple[int, ...]
    input_shape: tuple[int, ...]
    methods: tuple[str, ...]
    strategies: tuple[str, ...]
    naive: tuple[str, ...]
    batch_size: int
    warmup: int
    repeats: int
    budget_seconds: float
    alpha: float
    temperature: float
    device: str
    seed: int
    precision: str
    threads: int | None
    data_batches: int
    comparison: str | None = None
    bench_pair: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
