"""Bad input across every command and config group: one line on stderr, a non-zero exit, no traceback,
nothing written outside the run directory and nothing cached.

The corpus runs in this process through the console script's entry point (`jacdistill_cli.cli.main`),
so that a hundred cases cost seconds; a few run through the real console script as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import hydra_run, run_in_process, write_crafted_cifar, write_student
from PIL import Image

ERROR = "jacdistill {command}: error: "

# (arguments, a piece of the error line). Paths: {file} an existing text file, {dir} an empty
# directory, {garbage} a .pt that is no checkpoint, {corrupt}, {two}, {one} image folders (a corrupt
# image; 2 images per class; one class), {list_metrics}, {broken_yaml} run directories for report,
# {cifar} CIFAR-10 files with a crafted batch, {student} a student checkpoint on a CIFAR-10 folder.
CORPUS: list[tuple[str, str]] = [
    # --- train: the model groups (student/teacher builders)
    ("train student.hidden=abc", "student.hidden='abc' is not allowed"),
    ("train student.hidden=[-5]", "student.hidden=[-5] is not allowed"),
    ("train +student.dropout=2", "student.dropout=2 is not allowed"),
    ("train student=cnn student.channels=[0]", "student.channels=[0] is not allowed"),
    ("train student=cnn student.hidden=-1", "student.hidden=-1 is not allowed"),
    ("train student=lenet5 student.channels=[6]", "student.channels=[6] is not allowed"),
    ("train student=lenet5 student.activation=gelu", "student.activation='gelu' is not allowed"),
    ("train student=vgg4 student.depth=5", "student.depth=5 is not allowed"),
    ("train student=vgg4 student.depth=[1]", "student.depth=[1] is not allowed"),
    ("train student=vgg4 student.width=inf", "student.width=inf is not allowed"),
    ("train student=resnet20 student.depth=21", "student.depth=21 is not allowed"),
    ("train student=wrn_16_2 student.depth=17", "student.depth=17 is not allowed"),
    ("train student=wrn_16_2 student.dropout=1", "student.dropout=1 is not allowed"),
    ("train student.name=nonet", "student.name='nonet' is not allowed"),
    ("train +student.hiden=[3]", "did you mean student.hidden?"),
    ("train teacher.hidden=-1", "teacher.hidden=-1 is not allowed"),
    ("train teacher=lenet5 teacher.activation=1", "teacher.activation=1 is not allowed"),
    ("train teacher=resnet56 teacher.depth=7", "teacher.depth=7 is not allowed"),
    ("train teacher.epochs=0", "teacher.epochs=0 is not allowed"),
    ("train teacher.lr=-1", "teacher.lr=-1 is not allowed"),
    ("train teacher.samples_per_class=0 trainer.epochs=1 teacher.epochs=1", "teacher.samples_per_class=0"),
    ("train teacher.checkpoint={dir}/missing.pt", "teacher.checkpoint="),
    ("train teacher.checkpoint={garbage}", "is not a jacdistill checkpoint"),
    ("train teacher=nope", "Could not find 'teacher/nope'"),
    # --- train: the dataset group
    ("train dataset.split_seed=abc", "dataset.split_seed='abc' is not allowed"),
    ("train dataset.val_fraction=0", "dataset.val_fraction=0"),
    ("train dataset.samples_per_class=0", "dataset.samples_per_class=0 is not allowed"),
    ("train dataset.samples_per_class=1000", "dataset.samples_per_class=1000 is not allowed"),
    ("train dataset.augment=maybe", "dataset.augment='maybe' is not allowed"),
    ("train dataset=fake dataset.num_classes=1", "dataset.num_classes=1 is not allowed"),
    ("train dataset=fake dataset.train_size=5", "dataset.train_size=5 is not allowed"),
    ("train dataset=mnist dataset.root={dir}", "files not found"),
    ("train dataset=cifar10 dataset.root={dir}", "files not found"),
    ("train dataset=cifar10 dataset.root={cifar}", "md5 checksums"),
    ("train dataset=cifar10 dataset.root={cifar} dataset.verify=false", "is refused: it would call"),
    ("train dataset=cifar10 dataset.root={cifar} dataset.verify=maybe", "dataset.verify='maybe' is not allowed"),
    ("train dataset=cifar10 dataset.root={cifar} dataset.download=1", "dataset.download=1 is not allowed"),
    ("train dataset=mnist dataset.download=maybe", "dataset.download='maybe' is not allowed"),
    ("train dataset=imagefolder", "dataset.root=null is not allowed"),
    ("train dataset=imagefolder dataset.root={dir}/none", "no such directory"),
    ("train dataset=imagefolder dataset.root={dir}", "is not allowed"),
    ("train dataset=imagefolder dataset.root={corrupt} dataset.test_fraction=0.25 dataset.val_fraction=0.25",
     "cannot be read"),
    ("train dataset=imagefolder dataset.root={two}", "split is empty"),
    ("train dataset=imagefolder dataset.root={one}", "a classifier needs at least 2"),
    ("train dataset=nope", "Could not find 'dataset/nope'"),
    # --- train: loss, jacobian, features, optim, trainer, top level
    ("train loss=none jacobian=none hard_weight=0", "nothing to train"),
    ("train jacobian=none alpha=1", "nothing to train"),
    ("train loss=nope", "Could not find 'loss/nope'"),
    ("train loss.name=huber", "loss.name='huber' is not allowed"),
    ("train jacobian=nope", "Could not find 'jacobian/nope'"),
    ("train jacobian.normalize=2", "jacobian.normalize=2 is not allowed"),
    ("train jacobian.batchnorm=frozen", "jacobian.batchnorm='frozen' is not allowed"),
    ("train jacobian=exact jacobian.strategy=fast", "jacobian.strategy='fast' is not allowed"),
    ("train jacobian=projected jacobian.num_projections=0", "jacobian.num_projections=0 is not allowed"),
    ("train jacobian=noise jacobian.sigma=0", "jacobian.sigma=0 is not allowed"),
    ("train jacobian=noise jacobian.form=taylor", "jacobian.form='taylor' is not allowed"),
    ("train jacobian=noise jacobian.antithetic=1", "jacobian.antithetic=1 is not allowed"),
    ("train loss=dkd loss.nckd_weight=-1", "loss.nckd_weight=-1 is not allowed"),
    ("train loss=dkd loss.tckd_weight=0 loss.nckd_weight=0", "loss.nckd_weight=0 is not allowed"),
    ("train loss=dkd loss.warmup_epochs=2.5", "loss.warmup_epochs=2.5 is not allowed"),
    ("train loss=dkd +loss.labels=3", "loss.labels=3 is not allowed"),
    ("train loss=dist loss.intra_weight=abc", "loss.intra_weight='abc' is not allowed"),
    ("train loss=dist loss.inter_weight=0 loss.intra_weight=0", "loss.intra_weight=0 is not allowed"),
    ("train loss.standardize=maybe", "loss.standardize='maybe' is not allowed"),
    ("train loss=mse loss.weight=0", "loss.weight=0 is not allowed"),
    ("train recipe=kd_ls loss.temperature=-2", "loss.temperature=-2 is not allowed"),
    ("train +jacobian.sigmaa=1", "jacobian has no setting 'sigmaa'"),
    ("train features=nope", "Could not find 'features/nope'"),
    ("train features=attention features.pairs=[[nope,nope]]", "is not allowed"),
    ("train features=hint features.weight=-1", "features.weight=-1"),
    ("train optim=nope", "Could not find 'optim/nope'"),
    ("train optim.lr=0", "optim.lr=0 is not allowed"),
    ("train optim.schedule=step", "optim.schedule='step' is not allowed"),
    ("train optim=sgd optim.momentum=2", "optim.momentum=2 is not allowed"),
    ("train trainer.epochs=0", "trainer.epochs=0 is not allowed"),
    ("train trainer.batch_size=0", "trainer.batch_size=0 is not allowed"),
    ("train trainer.eval_every=0", "trainer.eval_every=0 is not allowed"),
    ("train trainer.threads=0", "trainer.threads=0 is not allowed"),
    ("train trainer.save_every_epochs=0", "trainer.save_every_epochs=0 is not allowed"),
    ("train trainer.save_every_epochs=null", "trainer.save_every_epochs=None is not allowed"),
    ("train trainer.save_every_steps=1.5", "trainer.save_every_steps=1.5 is not allowed"),
    ("train trainer.resume=maybe", "trainer.resume='maybe' is not allowed"),
    ("train trainer.device=tpu", "trainer.device='tpu' is not allowed"),
    ("train +trainer.epoch=2", "did you mean trainer.epochs?"),
    ("train trainer.epoch=2", "did you mean trainer.epochs?"),
    ("train +alpah=0.1", "did you mean alpha?"),
    ("train alpha=1.5", "alpha=1.5 is not allowed"),
    ("train temperature=0", "temperature=0 is not allowed"),
    ("train hard_weight=-1", "hard_weight=-1 is not allowed"),
    ("train seed=-1", "seed=-1 is not allowed"),
    ("train recipe=nope", "Could not find 'recipe/nope'"),
    ("train experiment=nope", "Could not find 'experiment/nope'"),
    ("train alpha=[", "no viable alternative"),
    # --- train: robustness and robust teachers
    ("train teacher.training=madry", "teacher.training='madry' is not allowed: it must be one of standard, "
     "adversarial, trades"),
    ("train teacher.training=adversarial teacher.adversarial.eps=0", "teacher.adversarial.eps=0 is not allowed"),
    ("train teacher.training=trades teacher.adversarial.norm=l1", "teacher.adversarial.norm='l1' is not allowed"),
    ("train robustness.samples=0", "robustness.samples=0 is not allowed"),
    ("train robustness=digits robustness.attacks.0.eps=-0.1", "robustness.attacks[0].eps=-0.1 is not allowed"),
    # --- teacher
    ("teacher teacher.epochs=0", "teacher.epochs=0 is not allowed"),
    ("teacher teacher.hidden=-3", "teacher.hidden=-3 is not allowed"),
    ("teacher teacher=lenet5 teacher.hidden=[1.5]", "teacher.hidden=[1.5] is not allowed"),
    ("teacher +trainer.epoch=2", "did you mean teacher.epochs?"),   # teacher trains teacher.epochs
    ("teacher dataset.split_seed=abc", "dataset.split_seed='abc' is not allowed"),
    ("teacher dataset=imagefolder dataset.root={two}", "split is empty"),
    ("teacher dataset=imagefolder dataset.root={one}", "a classifier needs at least 2"),
    ("teacher dataset=cifar100 dataset.root={dir}", "files not found"),
    ("teacher teacher.training=madry", "teacher.training='madry' is not allowed"),
    ("teacher teacher.training=adversarial teacher.adversarial.steps=0", "teacher.adversarial.steps=0 is not allowed"),
    # --- evaluate
    ("evaluate", "checkpoint=null is not allowed"),
    ("evaluate checkpoint={dir}/missing.pt", "no such file"),
    ("evaluate checkpoint={garbage}", "is not a jacdistill checkpoint"),
    ("evaluate checkpoint={file}", "is not a jacdistill checkpoint"),
    ("evaluate checkpoint={student}", "dataset_root=null is not allowed"),
    ("evaluate checkpoint={student} dataset_root={cifar}", "is refused: it would call"),
    ("evaluate checkpoint={student} dataset=digits dataset_root={dir}", "dataset_root="),
    ("evaluate checkpoint={student} sigmas=abc", "sigmas='abc' is not allowed"),
    ("evaluate checkpoint={student} sigmas=[-1]", "sigmas=[-1] is not allowed"),
    ("evaluate checkpoint={student} teacher.checkpoint={garbage}", "is not a jacdistill checkpoint"),
    ("evaluate checkpoint={student} +checkpoint_path=x", "did you mean checkpoint?"),
    # --- evaluate: the robustness group (attacks on the test split)
    ("evaluate checkpoint={student} robustness=nope", "Could not find 'robustness/nope'"),
    ("evaluate checkpoint={student} robustness.samples=0", "robustness.samples=0 is not allowed"),
    ("evaluate checkpoint={student} robustness=digits robustness.attacks.1.eps=-0.1",
     "robustness.attacks[1].eps=-0.1 is not allowed: epsilon in pixel scale"),
    ("evaluate checkpoint={student} robustness=digits robustness.attacks.1.steps=0",
     "robustness.attacks[1].steps=0 is not allowed"),
    ("evaluate checkpoint={student} robustness.attacks=[{{name:cw,eps:0.1}}]",
     "robustness.attacks[0].name='cw' is not allowed: it must be one of fgsm, pgd"),
    ("evaluate checkpoint={student} robustness.attacks=[{{name:pgd,norm:l1,eps:0.1}}]",
     "robustness.attacks[0].norm='l1' is not allowed: it must be one of linf, l2"),
    ("evaluate checkpoint={student} robustness.attacks=[{{name:noise,norm:linf,sigma:0.1}}]",
     "robustness.attacks[0].norm='linf' is not allowed: attack noise has no setting 'norm'"),
    ("evaluate checkpoint={student} robustness.attacks=[{{name:fgsm,eps:0.1,restarts:2}}]",
     "attack fgsm has no setting 'restarts'"),
    # --- check
    ("check methods=[nope]", "is not allowed"),
    ("check batch_size=1", "batch_size=1 is not allowed"),
    ("check student.hidden=[-1]", "student.hidden=[-1] is not allowed"),
    ("check teacher.checkpoint={garbage}", "is not a jacdistill checkpoint"),
    ("check +batchsize=2", "did you mean batch_size?"),
    ("check jacobian=nope", "Could not find 'jacobian/nope'"),
    # --- bench
    ("bench classes=[1]", "is not allowed"),
    ("bench methods=[nope]", "is not allowed"),
    ("bench repeats=0", "repeats=0 is not allowed"),
    ("bench input_shape=[3]", "is not allowed"),
    ("bench student.channels=[0]", "student.channels=[0] is not allowed"),
    ("bench +repeat=2", "did you mean repeats?"),
    # --- report
    ("report {dir}", "it holds no train run"),
    ("report {dir}/none", "it is not a directory"),
    ("report {broken_yaml}", "is not valid YAML"),
    ("report {list_metrics} +metrik=x", "did you mean metric?"),
    ("report", "dir=null is not allowed"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The files the corpus names, written once."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "garbage.pt").write_bytes(b"\x00\x01 not a zip nor a pickle")
    rng = np.random.default_rng(0)

    def images(folder: Path, classes: list[str], per_class: int) -> Path:
        for name in classes:
            (folder / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
        return folder

    corrupt = images(root / "corrupt", ["a", "b"], 4)
    (corrupt / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    images(root / "two", ["a", "b", "c"], 2)
    images(root / "one", ["only"], 6)
    cifar = write_crafted_cifar(root / "cifar", root / "marker")
    list_metrics = hydra_run(root / "list_metrics")
    (list_metrics / "metrics.json").write_text("[1, 2, 3]\n")
    broken = hydra_run(root / "broken_yaml")
    (broken / ".hydra" / "overrides.yaml").write_text("- alpha=0.1\n  - : [unclosed\n")
    student = root / "student.pt"
    write_student(student, cifar)
    return {"file": str(root / "notes.txt"), "dir": str(root / "empty"), "garbage": str(root / "garbage.pt"),
            "corrupt": str(corrupt), "two": str(root / "two"), "one": str(root / "one"), "cifar": str(cifar),
            "list_metrics": str(list_metrics), "broken_yaml": str(broken), "student": str(student),
            "marker": str(root / "marker")}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case,expected", CORPUS, ids=[c for c, _ in CORPUS])
def test_bad_input_is_one_line(case, expected, inputs, tmp_path, monkeypatch):
    cwd, cache, run_dir = tmp_path / "cwd", tmp_path / "cache", tmp_path / "cwd" / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("JACDISTILL_CACHE", str(cache))
    command, *rest = case.format(**inputs).split(" ")
    status, stderr = run_in_process([command, *rest, f"hydra.run.dir={run_dir}"])
    lines = stderr.strip().splitlines()
    assert status == 2, (status, stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(ERROR.format(command=command)) and expected in lines[0], lines[0]
    cached = {p for p in files_under(cache) if p.suffix != ".lock"} if cache.exists() else set()
    assert not cached, "something was cached"
    outside = {p for p in files_under(cwd) if run_dir not in p.parents}
    assert not outside, outside
    assert not Path(inputs["marker"]).exists(), "a data file ran code"


def test_the_corpus_covers_every_command_and_group():
    assert len(CORPUS) >= 100
    commands = {case.split(" ")[0] for case, _ in CORPUS}
    assert commands == {"train", "teacher", "evaluate", "check", "bench", "report"}
    text = " ".join(case for case, _ in CORPUS)
    for group in ("dataset", "teacher", "student", "loss", "jacobian", "features", "optim", "trainer", "recipe",
                  "experiment", "robustness"):
        assert f" {group}" in text, group


@pytest.mark.slow
@pytest.mark.parametrize("case,expected", [
    ("train +trainer.epoch=2", "+trainer.epoch=2 is not allowed: trainer has no setting 'epoch'; did you mean "
                               "trainer.epochs?"),
    ("train student=cnn student.channels=[0]", "student.channels=[0] is not allowed: it must be a list of "
                                                "integers >= 1, e.g. [16,32]"),
    ("report {list_metrics}/none", "is not allowed: it is not a directory"),
])
def test_bad_input_through_the_console_script(cli, case, expected, inputs, tmp_path):
    command, *rest = case.format(**inputs).split(" ")
    result = cli(command, *rest, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                 env={"JACDISTILL_CACHE": str(tmp_path / "cache")})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(ERROR.format(command=command)) and expected in lines[0], lines[0]
    assert not (tmp_path / "cache").exists() and not Path(inputs["marker"]).exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"run"}
