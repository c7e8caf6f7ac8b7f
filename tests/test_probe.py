"""Every model tried on the data before any work (zoo/probe.py): a model that does not take the dataset's
inputs or does not return its logits is refused in one line, `output` picks the logits of a model that
returns more (its checkpoints unchanged), nothing of the run moves (weights, BatchNorm statistics, modes,
random generators), lazy layers take their shapes when the model is built, and the messages of a user's
model (an unimportable `_target_`, a misspelt architecture, a checkpoint of an untrusted target)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.config import registry
from jacdistill_cli.config.registry import shipped_node, shipped_options
from jacdistill_cli.engine.layers import gate_of
from jacdistill_cli.errors import UsageError
from jacdistill_cli.zoo.checkpoints import matching_overrides, trusted_targets
from jacdistill_cli.zoo.models import architecture, build_model, selection
from jacdistill_cli.zoo.probe import probe

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = __name__   # the builders below are `_target_`s of this module, as a user's own module's would be
DIGITS, CIFAR = (1, 8, 8), (3, 32, 32)
TIMM = "jacdistill_cli.zoo.timm_models.timm_model"
SMALL_VIT = {"embed_dim": 16, "depth": 1, "num_heads": 2}


def three_channels(input_shape, num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def fixed_in_features(input_shape, num_classes, in_features=100):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


class LogitsAndFeatures(nn.Module):
    """(logits, features), or {"features": ..., "logits": ...} with as_dict."""

    def __init__(self, inputs: int, num_classes: int, as_dict: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)
        self.as_dict = as_dict

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features)
        return {"features": features, "logits": logits} if self.as_dict else (logits, features)


def pair(input_shape, num_classes, as_dict=False):
    return LogitsAndFeatures(math.prod(input_shape), num_classes, as_dict)


def imagenet_head(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 1000))


def googlenet(input_shape, num_classes):
    """torchvision's GoogLeNet with its auxiliary heads: a named tuple of three logits in train mode."""
    return torchvision.models.googlenet(num_classes=num_classes, aux_logits=True, init_weights=False)


class HostReads(nn.Module):
    """Reads a value on the host (no meta kernel can), with BatchNorm and dropout whose state must not move."""

    def __init__(self, channels: int, num_classes: int, conv_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(conv_channels, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        scale = 1.0 if float(x.abs().sum()) > 0 else 2.0
        return self.head(self.drop(self.norm(self.conv(x * scale)).mean((2, 3))))


def host_reads(input_shape, num_classes, conv_channels=None):
    return HostReads(input_shape[0], num_classes, conv_channels or input_shape[0])


def lazy(input_shape, num_classes, eager=False):
    """conv-BatchNorm-ReLU-linear with lazy layers, or the same layers with their sizes given (eager)."""
    if eager:
        side = (input_shape[1] - 2) * (input_shape[2] - 2)
        return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * side, num_classes))
    return nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(num_classes))


class TrainOnlyBranch(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        self.aux = nn.LazyLinear(num_classes)

    def forward(self, x):
        logits = self.head(x)
        return logits + self.aux(x.flatten(1)) if self.training else logits


def train_only_lazy(input_shape, num_classes):
    return TrainOnlyBranch(num_classes)


def built_on_meta(spec, shape=DIGITS, classes=10, role="student"):
    with torch.device("meta"):
        return build_model(spec, shape, classes, role)


def refusal(spec, shape=DIGITS, classes=10, role="student", label="student=mine") -> str:
    with pytest.raises(UsageError) as caught:
        probe(built_on_meta(spec, shape, classes, role), shape, classes, role, label)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- misfits


def test_a_timm_vit_built_for_another_image_size_is_refused_naming_model_shape_and_cause():
    spec = {"_target_": TIMM, "name": "timm", "arch": "vit_tiny_patch16_224", "img_size": 224,
            "options": SMALL_VIT}
    message = refusal(spec, label="student=timm student.arch=vit_tiny_patch16_224 student.img_size=224")
    assert message.startswith("student=timm student.arch=vit_tiny_patch16_224 student.img_size=224 does not take "
                              "the dataset's inputs [1, 8, 8]")
    assert message.endswith("AssertionError: Input height (8) doesn't match model (224).")


def test_a_three_channel_model_on_one_channel_digits_is_refused_with_the_models_own_message():
    timm_three = {"_target_": TIMM, "name": "timm", "arch": "resnet18", "options": {"in_chans": 3}}
    for spec in (timm_three, {"_target_": f"{HERE}.three_channels"}):
        message = refusal(spec)
        assert "does not take the dataset's inputs [1, 8, 8]" in message
        # the CPU's wording (meta kernels say only "Invalid channel dimensions")
        assert "expected input[2, 1, 8, 8] to have 3 channels, but got 1 channels instead" in message


def test_a_wrong_in_features_is_refused_with_both_shapes():
    message = refusal({"_target_": f"{HERE}.fixed_in_features"})
    assert message.endswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x64 and 100x10)")


@pytest.mark.parametrize("as_dict,returned,choice", [
    (False, "a tuple of 2 (tensor [2, 10], tensor [2, 16])", "0"),
    (True, "a dict of 2 (features: tensor [2, 16], logits: tensor [2, 10])", "logits"),
])
def test_a_tuple_or_dict_is_refused_with_the_output_that_picks_the_logits(as_dict, returned, choice):
    message = refusal({"_target_": f"{HERE}.pair", "as_dict": as_dict})
    assert message == (f"student=mine returns {returned} in train mode on inputs [2, 1, 8, 8], not logits [batch, "
                       f"10]: choose them with student.output={choice} (++student.output={choice} on the command line, "
                       f"`output: {choice}` in the option's file), or give a `_target_` of your own that returns the "
                       "logits")


def test_logits_for_another_class_count_are_refused_naming_both_numbers():
    message = refusal({"_target_": f"{HERE}.imagenet_head"})
    assert message.startswith("student=mine returns logits for 1000 classes ([2, 1000] on inputs [2, 1, 8, 8]")
    assert "the dataset has 10" in message


def test_googlenet_with_aux_logits_is_refused_in_train_mode_and_fits_with_output_logits():
    message = refusal({"_target_": f"{HERE}.googlenet"}, CIFAR)
    assert "returns a GoogLeNetOutputs of 3 (logits: tensor [2, 10], aux_logits2: tensor [2, 10], aux_logits1: " \
           "tensor [2, 10]) in train mode" in message and "student.output=logits" in message
    picked = {"_target_": f"{HERE}.googlenet", "output": "logits"}
    probe(built_on_meta(picked, CIFAR), CIFAR, 10, "student", "student=mine")
    torch.manual_seed(0)
    model = build_model(picked, CIFAR, 10, "student")
    plain = googlenet(CIFAR, 10)
    assert list(model.state_dict()) == list(plain.state_dict())   # checkpoints keep the network's keys
    inputs = torch.randn(2, *CIFAR)
    with torch.no_grad():
        assert model.train()(inputs).shape == (2, 10) and model.eval()(inputs).shape == (2, 10)


def test_torchvision_googlenet_and_inception_v3_still_fit_digits():
    for arch in ("googlenet", "inception_v3"):
        spec = {"_target_": "jacdistill_cli.zoo.models.torchvision_model", "name": "torchvision", "arch": arch}
        probe(built_on_meta(spec), DIGITS, 10, "student", f"student=torchvision student.arch={arch}")


# One option of each shipped model (the smallest; the deeper ones run the same code), teacher-only ones too.
SHIPPED = [("student", option) for option in ("cnn", "lenet5", "mlp", "resnet8x4", "timm", "torchvision", "vgg4",
                                              "vgg8", "vit", "wrn_16_2")] + [("teacher", "vgg9")]


def test_the_list_of_shipped_options_probed_has_every_shipped_model():
    targets = {target for group in ("student", "teacher") for target in shipped_options(group).values()}
    assert {shipped_options(group)[option] for group, option in SHIPPED} == targets


@pytest.mark.parametrize("size", [DIGITS, CIFAR])
def test_every_shipped_model_fits_the_data_it_is_shipped_for(size):
    for group, option in SHIPPED:
        if option == "vit" and size == CIFAR:
            continue   # its patches tile 8x8 digits; bench_pair=vit sizes it for 32x32
        spec = architecture(shipped_node(group, option), option)
        probe(built_on_meta(spec, size, 10, group), size, 10, group, f"{group}={option}")


# ---------------------------------------------------------------------------------------------- output


def test_output_picks_the_logits_and_keeps_the_state_dict_keys_so_checkpoints_load_into_the_same_config():
    spec = {"_target_": f"{HERE}.pair", "output": 0}
    torch.manual_seed(0)
    model = build_model(spec, DIGITS, 10, "student").eval()
    inputs = torch.randn(3, *DIGITS)
    with torch.no_grad():
        logits = model(inputs)
        unpicked = LogitsAndFeatures(64, 10)
        unpicked.load_state_dict(model.state_dict())   # the same keys as the model without `output`
        assert torch.equal(logits, unpicked.eval()(inputs)[0])
        again = build_model(spec, DIGITS, 10, "student")
        again.load_state_dict(model.state_dict())
        assert torch.equal(again.eval()(inputs), logits)
    dict_model = build_model({"_target_": f"{HERE}.pair", "as_dict": True, "output": "logits"}, DIGITS, 10)
    assert dict_model(inputs).shape == (3, 10)


def test_output_is_in_the_architecture_only_when_set_so_todays_cache_keys_stay():
    node = OmegaConf.create({"_target_": f"{HERE}.pair", "name": "pair", "output": None, "epochs": 3})
    assert architecture(node) == {"_target_": f"{HERE}.pair", "name": "pair"}
    node.output = "logits"
    assert architecture(node) == {"_target_": f"{HERE}.pair", "name": "pair", "output": "logits"}


@pytest.mark.parametrize("choice,message", [
    (3, r"^student.output=3 is not allowed: the model returns a tuple of 2 \(tensor \[2, 10\], tensor \[2, 16\]\), "
        r"where it finds nothing instead of a tensor of logits; it must be null"),
    ("logits", r"^student.output='logits' is not allowed: the model returns a tuple of 2"),
    (1.5, r"^student.output=1.5 is not allowed: it must be null \(the model returns its logits\), an index"),
])
def test_an_output_that_picks_no_tensor_is_one_line(choice, message):
    with pytest.raises(UsageError, match=message):
        probe(built_on_meta({"_target_": f"{HERE}.pair", "output": choice}), DIGITS, 10, "student", "student=mine")


# ---------------------------------------------------------------------------------------------- nothing moves


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("target", ["pair", "host_reads"])   # on meta; on a CPU copy (a value read on the host)
def test_the_probe_moves_no_weight_statistic_mode_hook_or_random_generator(target):
    torch.manual_seed(0)
    model = build_model({"_target_": f"{HERE}.{target}", **({"output": 0} if target == "pair" else {})}, DIGITS,
                        10, "student")
    model.train()
    next(iter(model.children())).eval()   # a module in its own mode keeps it
    modes = [m.training for m in model.modules()]
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    before, rng = state_of(model), torch.get_rng_state()
    probe(model, DIGITS, 10, "student", "student=mine")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    assert [m.training for m in model.modules()] == modes
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


def test_the_probe_leaves_the_lazy_layers_of_the_model_it_is_given_lazy():
    model = lazy(DIGITS, 10)
    rng = torch.get_rng_state()
    probe(model, DIGITS, 10, "student", "student=mine")
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter) and type(model[4]) is nn.LazyLinear
    assert torch.equal(rng, torch.get_rng_state())


def test_a_model_that_cannot_run_on_meta_is_tried_on_a_cpu_copy_whose_error_is_the_one_said():
    probe(built_on_meta({"_target_": f"{HERE}.host_reads"}), DIGITS, 10, "student", "student=mine")
    message = refusal({"_target_": f"{HERE}.host_reads", "conv_channels": 3})
    assert "expected input[2, 1, 8, 8] to have 3 channels, but got 1 channels instead" in message


# ---------------------------------------------------------------------------------------------- lazy layers


def test_lazy_layers_take_their_shapes_when_built_drawing_what_eager_layers_draw():
    """The same seed gives the weights of the same network with its sizes given, and leaves the global
    generator where that network leaves it; BatchNorm's statistics stay untouched, the mode is train."""
    torch.manual_seed(0)
    model = build_model({"_target_": f"{HERE}.lazy"}, DIGITS, 10, "student")
    after_lazy = torch.get_rng_state()
    torch.manual_seed(0)
    eager = build_model({"_target_": f"{HERE}.lazy", "eager": True}, DIGITS, 10, "student")
    assert torch.equal(after_lazy, torch.get_rng_state())
    assert list(model.state_dict()) == list(eager.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
    assert int(model[1].num_batches_tracked) == 0 and model.training and all(m.training for m in model.modules())
    assert type(model[0]) is type(eager[0]) and gate_of(model) is not None   # Jacobian-ready as any conv
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)   # no uninitialised parameter reaches it
    model(torch.randn(4, *DIGITS)).sum().backward()
    optimiser.step()


def test_lazy_layers_pass_the_meta_check_and_the_probe_drawing_nothing():
    rng = torch.get_rng_state()
    probe(built_on_meta({"_target_": f"{HERE}.lazy"}), DIGITS, 10, "student", "student=mine")
    assert torch.equal(rng, torch.get_rng_state())


def test_a_lazy_layer_reached_in_train_mode_only_is_refused_in_one_line():
    with pytest.raises(UsageError, match=r"^student train_only_lazy\(\): its lazy layers aux are not reached by an "
                                         r"eval-mode pass of the dataset's inputs \[1, 8, 8\]"):
        build_model({"_target_": f"{HERE}.train_only_lazy"}, DIGITS, 10, "student")


# ---------------------------------------------------------------------------------------------- a user's model


def test_a_users_option_without_name_is_named_by_its_file_and_shipped_specs_do_not_change():
    node = OmegaConf.create({"_target_": "mymodels.tiny", "width": 8, "epochs": 2})
    assert architecture(node, "tiny") == {"_target_": "mymodels.tiny", "name": "tiny", "width": 8}
    assert architecture(node, "sub/tiny")["name"] == "tiny"
    assert "name" not in architecture(node, "cnn")   # `name: cnn` would claim the shipped option's target
    for group in ("student", "teacher"):
        for option in shipped_options(group):
            shipped = shipped_node(group, option)
            assert architecture(shipped, option) == architecture(shipped)


def test_a_checkpoints_output_is_named_with_the_override_that_adds_it():
    spec = {**architecture(shipped_node("teacher", "timm")), "arch": "resnet10t", "output": 0}
    assert matching_overrides(spec, "teacher") == "teacher=timm teacher.arch=resnet10t ++teacher.output=0"


def test_selection_names_the_model_as_the_user_selected_it():
    spec = architecture(OmegaConf.merge(shipped_node("student", "timm"), {"arch": "vit_tiny_patch16_224"}))
    assert selection("student", "timm", spec) == "student=timm student.arch=vit_tiny_patch16_224"
    assert selection("teacher", "tiny", {"_target_": "mymodels.tiny"}) == "teacher=tiny"


@pytest.mark.parametrize("target,reason", [
    ("nowhere_at_all.tiny", "No module named 'nowhere_at_all'"),
    (f"{HERE}.tinyy", f"module '{HERE}' has no attribute 'tinyy'"),
    ("jacdistill_cli.zoo.nothing.tiny", "module 'jacdistill_cli.zoo' has no attribute 'nothing'"),
    ("my-models.tiny", "'my-models.tiny' is not a dotted path of names"),
])
def test_an_unimportable_target_says_why(target, reason):
    with pytest.raises(UsageError) as caught:
        registry.locate("student", {"_target_": target})
    assert str(caught.value) == (f"student._target_={target!r} is not allowed: it cannot be imported ({reason}); it "
                                 "must name a function or class, e.g. mypackage.module.name, importable from the "
                                 "current directory or PYTHONPATH")


def test_a_module_that_fails_to_import_names_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "broken_models.py").write_text("import a_missing_dependency\n")
    (tmp_path / "raising_models.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match=r"\(No module named 'a_missing_dependency'\)"):
        registry.locate("student", {"_target_": "broken_models.tiny"})
    with pytest.raises(UsageError, match=r"\(RuntimeError: no GPU here\)"):
        registry.locate("student", {"_target_": "raising_models.tiny"})


@pytest.mark.parametrize("spec,suggestion", [
    ({"_target_": TIMM, "arch": "resnt18"}, "; did you mean resnet18"),
    ({"_target_": TIMM, "arch": "vit_tiny_patch16_22"}, "; did you mean vit_tiny_patch16_224"),
    ({"_target_": "jacdistill_cli.zoo.models.torchvision_model", "arch": "resnet_18"}, "; did you mean resnet18"),
])
def test_a_misspelt_architecture_gets_a_did_you_mean(spec, suggestion):
    with pytest.raises(UsageError, match=r"^student.arch='.*' is not allowed: it must name .*" + suggestion):
        built_on_meta(spec)


def test_a_checkpoint_of_an_untrusted_target_names_the_trust_setting():
    spec = {"_target_": f"{HERE}.pair"}
    with pytest.raises(UsageError, match=rf"^checkpoint: the checkpoint's model is built by '{HERE}.pair', which "
                                         rf"is not part of jacdistill, and a checkpoint imports no code on its own: "
                                         rf"add trust=\[{HERE}.pair\] to trust it"):
        build_model(spec, DIGITS, 10, "checkpoint", trusted=trusted_targets([]))
    assert build_model(spec, DIGITS, 10, "checkpoint", trusted=trusted_targets(OmegaConf.create([f"{HERE}.pair"])))
    with pytest.raises(UsageError, match=r"^trust='mymodels.tiny' is not allowed: it must be a list"):
        trusted_targets("mymodels.tiny")
