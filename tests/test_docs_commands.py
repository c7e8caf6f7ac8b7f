"""Every `jacdistill ...` command line of README.md and docs/ composes and passes its command's settings check.

A command line is a line of a code block (`$ ` prompts and `\\` continuations included, an environment prefix,
`exec`, `srun` or `torchrun ... -m jacdistill_cli` before it), or an inline code span of the prose, that starts
with `jacdistill <command>`. Its placeholders are filled from fixtures (DIR, PATH, T.pt, DATE/TIME-3f9a1c,
`.../student.pt`, /data/..., `~`, $SLURM_JOB_ID: files and directories made in a temporary home), and the code
blocks captioned with a file name (`mymodels.py`, `myconf/student/tiny.yaml`, ...) are written there, so the
pages' own examples are what `--config-dir ./myconf` finds. A sweep (`-m`, or a preset that is one) is expanded
into its jobs as Hydra's basic sweeper expands them (spec/sweep.py `expanded`); every job is composed in this
process and its spec built (`builders`: the command's whole settings check), as jacdistill's sweeper checks a
sweep before its first job. Jobs that differ only in their seed are composed once: the seed's own check (an
integer >= 0) is made for each. A line the pages show with its one-line refusal must be refused with that line.
`--help` and `completion` run through the console script's entry in this process. Nothing runs.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from jacdistill_cli.cli import COMMANDS, main
from jacdistill_cli.config.keys import home_paths
from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.errors import UsageError
from jacdistill_cli.spec.sweep import builders, expanded, task_config

register_resolvers()
REPO = Path(__file__).resolve().parents[1]
TODAYS_README = REPO / "tests" / "data" / "docs" / "readme_commands_9fa1b92.txt"
NAMES = (*COMMANDS, "completion")

# Lines that cannot be checked here, and why.
UNCHECKED = {
    "jacdistill train experiment=paper_cifar100 hydra/launcher=submitit_slurm hydra.launcher.partition=gpu "
    "hydra.launcher.gpus_per_node=1 hydra.launcher.cpus_per_task=8 hydra.launcher.timeout_min=720 "
    "hydra.launcher.max_num_timeout=3 hydra.launcher.signal_delay_s=120 dataset.root=/data/cifar":
        "needs hydra-submitit-launcher (the slurm extra), which the test extra does not install",
    "jacdistill train -m hydra/launcher=submitit_slurm hydra.launcher.nodes=1 hydra.launcher.gpus_per_node=4 "
    "hydra.launcher.tasks_per_node=4 'hydra.launcher.setup=[\"export MASTER_ADDR=$(hostname)\",\"export "
    "MASTER_PORT=29500\"]' alpha=0,0.3":
        "needs hydra-submitit-launcher (the slurm extra), which the test extra does not install",
    "jacdistill train -m hydra/sweeper=optuna hydra.sweeper.direction=maximize hydra.sweeper.n_trials=30 "
    "hydra.sweeper.n_jobs=1 hydra.sweeper.sampler.seed=0 'alpha=interval(0,1)' "
    "'temperature=tag(log,interval(1,20))' hard_weight=1 trainer.threads=1":
        "needs hydra-optuna-sweeper (the optuna extra), and its trials are drawn as it runs",
}
# A command named in prose without its arguments is a name, not a line to run: these commands need arguments.
NAMED_ONLY = {"jacdistill evaluate", "jacdistill report", "jacdistill completion"}

# Lines of the README as it was at commit 9fa1b92 (tests/data/docs/readme_commands_9fa1b92.txt) that the pages now
# write otherwise, each with what replaced it. Every other line of that README is still in README.md or docs/.
REWRITTEN = {
    "jacdistill train teacher.checkpoint=PATH": "a prose name of the option, now the tour's "
                                                "`jacdistill train teacher.checkpoint=outputs/teacher/.../teacher.pt`",
    "jacdistill completion bash\\|zsh": "a table cell, now `jacdistill completion bash`",
    "jacdistill train recipe=activations_jacobian_ce teacher=vgg9 student=vgg4 ...":
        "now with its dataset: ... dataset=cifar100 dataset.root=/data/cifar",
    "jacdistill train experiment=crd_cifar100 dataset.root=... teacher_dir=...":
        "now with the paths of its how-to: dataset.root=/data/cifar teacher_dir=/data/cifar_teachers",
    "jacdistill train hydra.run.dir=outputs/train/ddp ...": "now with a dataset in place of `...` (distributed.md)",
    "jacdistill train hydra.run.dir=/shared/outputs/run1 ...": "now with a dataset in place of `...`",
    "jacdistill train hydra.run.dir=outputs/train/$SLURM_JOB_ID ...": "now with a dataset in place of `...`",
    "jacdistill check trainer.precision=P": "a prose name, now `jacdistill check trainer.precision=bf16`",
    "jacdistill train experiment=... trainer.save_every_steps=500 hydra.run.dir=outputs/slurm/$SLURM_JOB_ID":
        "an sbatch script's run, now of a named dataset (a preset is a sweep, not one run)",
    "jacdistill train ... teacher.weights=~/weights/resnet50-11ad3fa6.pth": "now the whole command it abbreviated",
    "jacdistill evaluate checkpoint=": "a prose name, now `jacdistill evaluate checkpoint=PATH`",
    "jacdistill train teacher.checkpoint=...": "a prose name of the option",
    "jacdistill report outputs/robust_transfer/DATE/TIME-...": "now ...DATE/TIME-3f9a1c, the form of the others",
    "jacdistill check --config-dir ./myconf jacobian=mine methods=[mine]":
        "the example method is now RunnerUp: jacdistill check --config-dir ./myconf jacobian=runnerup ...",
}


@dataclass
class Line:
    text: str               # the command line as written (continuations joined, comment and prompt dropped)
    where: str              # file:line
    refusal: str | None     # the one-line error shown under it, if any


START = re.compile(r"^(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:exec\s+|srun\s+)?jacdistill\s+("
                   + "|".join(NAMES) + r")(?=\s|$)(.*)$")
TORCHRUN = re.compile(r"^(?:\$\s+)?torchrun\s.*?-m\s+jacdistill_cli\s+(" + "|".join(NAMES) + r")(?=\s|$)(.*)$")
INLINE = re.compile(r"`(jacdistill\s+(?:" + "|".join(NAMES) + r")(?:\s[^`]*)?)`")
FENCE = re.compile(r"^\s*(```+|~~~+)")


def without_comment(text: str) -> str:
    """The text before a `#` that starts a shell comment (outside quotes, after a space)."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


def command_lines(text: str, name: str = "") -> list[Line]:
    """Every command line of a Markdown text: in code blocks (fenced, or indented by four spaces) and in the
    prose's inline code (a span may cross a line break)."""
    found: list[Line] = []
    lines = text.splitlines()
    fence = None
    prose: list[tuple[int, str]] = []

    def flush_prose() -> None:
        joined = " ".join(line for _, line in prose)
        for match in INLINE.finditer(joined):
            found.append(Line(re.sub(r"\s+", " ", match.group(1)).strip(), f"{name}:{prose[0][0]}", None))
        prose.clear()

    index = 0
    while index < len(lines):
        raw = lines[index]
        marker = FENCE.match(raw)
        if marker and (fence is None or raw.strip().startswith(fence)):
            flush_prose()
            fence = marker.group(1) if fence is None else None
            index += 1
            continue
        if fence is None and not (raw.startswith("    ") and (not prose or not raw.strip())):
            if raw.strip():
                prose.append((index + 1, raw))
            else:
                flush_prose()
            index += 1
            continue
        flush_prose()
        start, line = index + 1, raw.strip()
        while line.endswith("\\") and index + 1 < len(lines):
            index += 1
            line = line[:-1].rstrip() + " " + lines[index].strip()
        match = START.match(line) or TORCHRUN.match(line)
        if match and not match.group(2).startswith(":"):
            following = lines[index + 1].strip() if index + 1 < len(lines) else ""
            refusal = following if following.startswith(f"jacdistill {match.group(1)}: error:") else None
            command = f"jacdistill {match.group(1)} {without_comment(match.group(2)).strip()}".strip()
            found.append(Line(command, f"{name}:{start}", refusal))
        index += 1
    flush_prose()
    return found


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "_build" not in p.parts)]


def documented_lines() -> list[Line]:
    return [line for path in documents()
            for line in command_lines(path.read_text(), path.relative_to(REPO).as_posix())]


# ---------------------------------------------------------------------------------------------- fixtures

CAPTIONED = re.compile(r"```\{code-block\}\s*\w+\s*\n:caption:\s*(\S+)\s*\n\n(.*?)\n```", re.S)
CRD_TEACHERS = ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13")


@dataclass
class Place:
    """Where placeholders point: a temporary home holding the files and directories the lines name."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"


def make_place(root: Path) -> Place:
    place = Place(root)
    for folder in ("data", "photos", "imagenet", "weights", "sweep", "work"):
        (place.home / folder).mkdir(parents=True, exist_ok=True)
    for arch in CRD_TEACHERS + ("resnet32x4",):
        for base in (place.home / "cifar_teachers", place.root / "data" / "cifar_teachers"):
            (base / f"{arch}_vanilla").mkdir(parents=True, exist_ok=True)
            (base / f"{arch}_vanilla" / "ckpt_epoch_240.pth").write_bytes(b"")
    (place.root / "data" / "cifar").mkdir(parents=True, exist_ok=True)
    for name in ("student.pt", "teacher.pt", "weights/resnet50-11ad3fa6.pth", "deit_tiny.pth"):
        (place.home / name).write_bytes(b"")
    for path in documents():   # the pages' own example files, under the working directory
        for caption, body in CAPTIONED.findall(path.read_text()):
            target = place.home / "work" / caption
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body + "\n")
    return place


def filled(text: str, place: Place) -> str:
    """The line with its placeholders replaced by the fixture's files and directories."""
    home = place.home
    text = text.replace("$SLURM_JOB_ID", "12345")
    text = re.sub(r"(?<=\s)\.\.\.(?=\s|$)", "", text)                              # `...`: your other overrides
    text = re.sub(r"[^\s=]*\.\.\./(student|teacher)\.pt", lambda m: str(home / f"{m.group(1)}.pt"), text)
    text = re.sub(r"outputs/\S*DATE/TIME-\w+", str(home / "sweep"), text)
    text = text.replace("<sweep dir>", str(home / "sweep"))
    text = re.sub(r"(^jacdistill report) DIR\b", rf"\1 {home / 'sweep'}", text)
    text = re.sub(r"=DIR\b", f"={home / 'data'}", text)
    text = re.sub(r"=PATH\b", f"={home / 'teacher.pt'}", text)
    text = re.sub(r"=T\.pt\b", f"={home / 'teacher.pt'}", text)
    text = re.sub(r"=/data/", f"={place.root / 'data'}/", text)
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------- the check


@dataclass
class Parsed:
    command: str
    overrides: list[str]
    multirun: bool
    config_dir: str | None
    flags: list[str]


def parsed(text: str) -> Parsed:
    words = shlex.split(text)
    command, rest = words[1], words[2:]
    overrides, flags, config_dir, multirun = [], [], None, False
    index = 0
    while index < len(rest):
        word = rest[index]
        if word in ("-m", "--multirun"):
            multirun = True
        elif word == "--config-dir":
            config_dir, index = rest[index + 1], index + 1
        elif word == "--cfg":
            flags.append(f"--cfg {rest[index + 1]}")
            index += 1
        elif word.startswith("-"):
            flags.append(word)
        else:
            overrides.append(word)
        index += 1
    return Parsed(command, overrides, multirun, config_dir, flags)


def through_the_entry(args: list[str]) -> tuple[int, str]:
    """`jacdistill ARGS` through the console script's entry in this process (for --help and completion)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(args)
        except SystemExit as done:
            status = done.code
    return status or 0, err.getvalue()


SEED = re.compile(r"^seed=(.*)$")


class Checker:
    """Composes and checks jobs in this process, each distinct job once."""

    def __init__(self, place: Place):
        self.place = place
        self.seen: dict[tuple, str | None] = {}
        self.bases: dict[tuple, Any] = {}   # each line's constant overrides composed: (preset?, params, config)
        self.entries: dict[tuple, str | None] = {}   # each --help or completion line, run once
        self.hydra = None   # Hydra's compose API, held open between jobs (initialising it costs more than a job)

    def release(self) -> None:
        if self.hydra is not None:
            self.hydra.__exit__(None, None, None)
            self.hydra = None

    def compose(self, command: str, overrides: list[str], config_dir: str | None):
        if self.hydra is None:
            self.hydra = initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3")
            self.hydra.__enter__()
        extra = [f"hydra.searchpath=[file://{(self.place.home / 'work' / config_dir).resolve()}]"] if config_dir else []
        return compose(config_name=command, overrides=[*overrides, *extra], return_hydra_config=True)

    def job(self, command: str, overrides: list[str], config_dir: str | None, composed=None) -> str | None:
        """None when the job composes and its spec builds; else the one-line error. `composed`: its config, when
        the caller has it."""
        seeds = [o for o in overrides if SEED.match(o)]
        # Jobs that differ in their seed, or in Hydra's own settings (a launcher's; the line's first composition
        # checked those), are composed once.
        overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
        key = (command, config_dir, tuple(sorted(o for o in overrides if not SEED.match(o))))
        for seed in seeds:
            value = SEED.match(seed).group(1)
            if not value.isdigit():
                return f"seed={value} is not allowed: it must be an integer >= 0"
        if key not in self.seen:
            self.seen[key] = self._built(command, overrides, config_dir, composed)
        return self.seen[key]

    def _built(self, command: str, overrides: list[str], config_dir: str | None, composed=None) -> str | None:
        try:
            cfg = composed if composed is not None else self.compose(command, overrides, config_dir)
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors, said as the console script says them
            return f"does not compose: {type(err).__name__}: {str(err).splitlines()[0]}"
        task, choices = task_config(cfg)
        if command == "report":
            return None if task.get("dir") else "dir=null is not allowed"
        try:
            builders()[command](task, choices)
        except UsageError as err:
            return str(err)
        return None

    def line(self, text: str) -> str | None:
        """None when every job of the line passes; else what is wrong, in one line."""
        args = parsed(filled(text, self.place))
        if args.command == "completion" or "--help" in args.flags:
            words = tuple(shlex.split(filled(text, self.place))[1:])
            if words not in self.entries:
                self.release()   # the entry starts Hydra itself
                status, stderr = through_the_entry(list(words))
                self.entries[words] = None if status == 0 else stderr.strip()
            return self.entries[words]
        overrides = home_paths(args.overrides)
        if args.command == "report":
            from jacdistill_cli.commands.report import translate_argv

            overrides = translate_argv(overrides)
        constant = [o for o in overrides if not is_sweep(o)]
        key = (args.command, args.config_dir, tuple(sorted(constant)))
        if key not in self.bases:
            try:
                base = self.compose(args.command, constant, args.config_dir)
            except Exception as err:  # noqa: BLE001
                self.bases[key] = f"does not compose: {type(err).__name__}: {str(err).splitlines()[0]}"
            else:
                params = base.hydra.sweeper.get("params") if "sweeper" in base.hydra else None
                self.bases[key] = (str(base.hydra.mode) == "RunMode.MULTIRUN",
                                   OmegaConf.to_container(params) if params else {}, base)
        if isinstance(self.bases[key], str):
            return self.bases[key]
        preset, params, base = self.bases[key]
        if not args.multirun and not preset:
            return self.job(args.command, overrides, args.config_dir, composed=base)   # one run: the base is the job
        jobs = jobs_of(params, overrides)
        for number, job in enumerate(jobs):
            error = self.job(args.command, job, args.config_dir)
            if error is not None:
                return error if len(jobs) == 1 else f"job {number} ({' '.join(job)}): {error}"
        return None


def jobs_of(params: dict, overrides: list[str]) -> list[list[str]]:
    """The sweep's jobs (spec/sweep.py `expanded`). A `glob(...)` sweep lists a group's options, which needs Hydra's
    config loader: `expanded` parses without one, so a glob is expanded here as Hydra's basic sweeper does."""
    if not any("glob(" in o for o in overrides):
        return expanded(params, overrides)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    lines = [f"{key}={value}" for key, value in params.items()] + list(overrides)
    return [job for batch in BasicSweeper.split_arguments(parser.parse_overrides(lines), None) for job in batch]


def is_sweep(override: str) -> bool:
    key, _, value = override.partition("=")
    quoted = value.startswith(("'", '"', "[", "{"))
    return not quoted and ("," in value or re.match(r"^(range|glob|choice|interval)\(", value) is not None)


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    place = make_place(tmp_path_factory.mktemp("docs-commands"))
    monkey = pytest.MonkeyPatch()
    monkey.setenv("HOME", str(place.home))
    monkey.setenv("JACDISTILL_CACHE", str(place.root / "cache"))
    monkey.chdir(place.home / "work")
    monkey.syspath_prepend(str(place.home / "work"))
    checker = Checker(place)
    yield checker
    checker.release()
    monkey.undo()


def verdict(checker: Checker, line: Line) -> str | None:
    """None when the line is right as documented: it passes, or it is refused with the line shown under it."""
    error = checker.line(line.text)
    if line.refusal is not None:
        command = line.text.split()[1]
        shown = f"jacdistill {command}: error: {error}" if error else None
        return None if shown is None or shown == line.refusal else f"refused otherwise than shown: {shown}"
    return error


# ---------------------------------------------------------------------------------------------- the tests


# The lines are checked in several test items, which xdist spreads over its workers: the lines of each preset
# (experiment=NAME: a sweep of many jobs, whose variants share jobs and so the cache) in one item of their own, the
# other lines by a hash of the line in a few more.
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
OTHERS = 3
BUCKETS = [*PRESETS, *(f"lines-{i}" for i in range(OTHERS))]


def bucket_of(text: str) -> str:
    preset = re.search(r"\bexperiment=(\w+)", text)
    if preset and preset.group(1) in PRESETS:
        return preset.group(1)
    return f"lines-{zlib.crc32(text.encode()) % OTHERS}"


@pytest.mark.parametrize("bucket", BUCKETS)
def test_every_documented_command_line_composes_and_passes_its_settings_check(checker, bucket):
    lines = [line for line in documented_lines() if bucket_of(line.text) == bucket]
    wrong = []
    for line in lines:
        if line.text in UNCHECKED or line.text in NAMED_ONLY:
            continue
        error = verdict(checker, line)
        if error is not None:
            wrong.append(f"{line.where}: {line.text}\n    {error}")
    assert not wrong, f"{len(wrong)} documented command lines do not pass:\n" + "\n".join(wrong)
    assert lines


def test_the_pages_hold_the_command_lines_they_should():
    texts = {line.text for line in documented_lines()}
    assert len(texts) > 100 and {"jacdistill train", "jacdistill check", "jacdistill bench"} <= texts


def test_the_lines_left_unchecked_are_still_documented_and_say_why():
    texts = {line.text for line in documented_lines()}
    assert set(UNCHECKED) <= texts, set(UNCHECKED) - texts
    assert all(reason for reason in UNCHECKED.values())


BROKEN = """
A page with lines that must fail:

```bash
jacdistill train alpha=1.5                     # outside [0, 1]
jacdistill train -m jacobian=top1,exactt       # no such option, in the second job of a sweep
jacdistill train experiment=digits_fewshot seed=-1
jacdistill evaluate sigmas=[0.1]               # no checkpoint
jacdistill train teacher.checkpoint=PATH trainer.epoch=3
```

and one whose refusal is shown otherwise than it is:

```text
$ jacdistill train alpha=2
jacdistill train: error: alpha=2 is not allowed: something else
```

and two that pass: `jacdistill train alpha=0.3` and

```bash
jacdistill train dataset=mnist dataset.root=DIR teacher.checkpoint=PATH \\
    trainer.epochs=3   # a continued line
```
"""


def test_a_broken_line_fails_and_a_right_one_passes(checker):
    lines = command_lines(BROKEN, "fixture")
    assert [line.text for line in lines] == [
        "jacdistill train alpha=1.5", "jacdistill train -m jacobian=top1,exactt",
        "jacdistill train experiment=digits_fewshot seed=-1", "jacdistill evaluate sigmas=[0.1]",
        "jacdistill train teacher.checkpoint=PATH trainer.epoch=3", "jacdistill train alpha=2",
        "jacdistill train alpha=0.3",
        "jacdistill train dataset=mnist dataset.root=DIR teacher.checkpoint=PATH trainer.epochs=3"]
    verdicts = [verdict(checker, line) for line in lines]
    assert verdicts[0] == "alpha=1.5 is not allowed: alpha must be a number in [0, 1]"
    assert verdicts[1].startswith("job 1 (jacobian=exactt): does not compose")
    assert verdicts[2].startswith("job 0 (") and verdicts[2].endswith("seed=-1 is not allowed: it must be an integer >= 0")
    assert verdicts[3].startswith("checkpoint=null is not allowed")
    assert "trainer.epoch" in verdicts[4]
    assert verdicts[5] == ("refused otherwise than shown: jacdistill train: error: alpha=2 is not allowed: alpha must "
                           "be a number in [0, 1]")
    assert verdicts[6:] == [None, None]


def test_every_command_of_the_readme_before_the_docs_is_found_in_the_pages():
    """The README of commit 9fa1b92 held every command in one file; each of its command lines is still in
    README.md or docs/ (found by the same reading), or REWRITTEN says what replaced it."""
    before = [line for line in TODAYS_README.read_text().splitlines() if line]
    assert len(before) > 100
    assert [line.text for line in command_lines("\n".join(f"    {line}" for line in before))] == before
    now = {line.text for line in documented_lines()}
    missing = [line for line in dict.fromkeys(before) if line not in now and line not in REWRITTEN]
    assert not missing, "commands of the README before the docs that no page has:\n" + "\n".join(missing)
    stale = [line for line in REWRITTEN if line in now or line not in before]
    assert not stale, f"REWRITTEN names lines the pages still have, or the old README never had: {stale}"
