"""Structured pruning removes channels for real, checkpoints rebuild the smaller shapes, fit trains and resumes on.

* 50 % of the channels of torchvision's resnet18 (10 classes, 1x28x28 input)
  and of a user's own residual network with a concatenation, given by import
  path: the forward pass stays valid, the 10 logits stay, the MACs drop at
  least 2x, and a fresh process rebuilds the model from a plain
  {arch, structure, state_dict} file loaded with weights_only=True and gets
  identical outputs.
* Rising targets give the expected channel counts (layer and global scope);
  bn_scale keeps the channels with the largest BatchNorm scales.
* fit with a hook that prunes structurally mid-training: the optimiser follows
  the new parameters (training goes on, at the scheduled learning rate), and
  a run interrupted after an epoch resumes to the same weights as an
  uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import kdcompress
from kdcompress.data import DataSplits, load_data
from kdcompress.errors import CheckpointError
from kdcompress.measure import count_macs
from kdcompress.models import SmallCNN, build_from_checkpoint, build_model, model_spec
from kdcompress.prune.structured import StructuredPruner, apply_structure, find_classifier
from kdcompress.recipe import DataSection, TrainSettings
from kdcompress.train import Hook, fit

SHAPE = (1, 28, 28)

# A user's own network, as they would write it in their own module: conv-bn-relu blocks with an identity
# addition, two branches joined by a concatenation, then flatten -> linear.
USER_NET = """
import torch
from torch import nn


def cbr(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = cbr(c, c)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.b(self.a(x)))


class ResCat(nn.Module):
    def __init__(self, input_shape=(1, 28, 28), num_classes=10, width=16):
        super().__init__()
        c, h, w = input_shape
        self.stem = nn.Sequential(cbr(c, width), nn.MaxPool2d(2))
        self.block = Residual(width)
        self.left, self.right = cbr(width, width, 1), cbr(width, width, 3)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), 32), nn.ReLU(),
                                  nn.Linear(32, num_classes))

    def forward(self, x):
        x = self.block(self.stem(x))
        x = torch.cat([self.left(x), self.right(x)], 1)
        return self.head(self.pool(x))


def build(input_shape=(1, 28, 28), num_classes=10, width=16):
    return ResCat(input_shape, num_classes, width)
"""
USER_MODULE = "kdc_test_user_rescat"  # a name no other test imports: modules are cached per process


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("usernet")
    (folder / f"{USER_MODULE}.py").write_text(USER_NET)
    return folder


def _spec(name: str) -> dict:
    return model_spec(name, {}, 10, SHAPE)


def _fresh_process_outputs(tmp_path: Path, ckpt: dict, x: torch.Tensor, cwd: Path) -> torch.Tensor:
    """Save ``ckpt`` as a plain dict, rebuild it in a new Python process (weights_only=True), return its outputs."""
    ckpt_path, x_path, out_path = tmp_path / "model.pt", tmp_path / "x.pt", tmp_path / "out.pt"
    torch.save(ckpt, ckpt_path)
    torch.save(x, x_path)
    code = textwrap.dedent(
        f"""
        import torch
        from kdcompress.models import build_from_checkpoint
        ckpt = torch.load({str(ckpt_path)!r}, map_location="cpu", weights_only=True)
        model = build_from_checkpoint(ckpt, allow_import=True).eval()  # this test's own file: trusted
        with torch.no_grad():
            torch.save(model(torch.load({str(x_path)!r}, weights_only=True)), {str(out_path)!r})
        """
    )
    root = str(Path(kdcompress.__file__).resolve().parents[1])  # this checkout's kdcompress, not an installed one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_path, weights_only=True)


def _widths(model: nn.Module) -> dict[str, int]:
    return {
        name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


@pytest.mark.parametrize("arch", ["torchvision:resnet18", f"{USER_MODULE}:build"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_half_the_channels_go_outputs_stay_and_a_fresh_process_rebuilds_it(
    arch, scope, user_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(user_dir)  # import paths are found in the current directory, as for a user's recipe
    spec = _spec(arch)
    torch.manual_seed(0)
    model = build_model(spec)
    before = count_macs(model, SHAPE)
    widths = _widths(model)
    pruner = StructuredPruner(model, SHAPE, importance="l1", scope=scope)
    pruner.prune_to(0.5)

    assert abs(pruner.sparsity() - 0.5) < 0.02
    classifier = find_classifier(model, SHAPE)
    assert classifier in ("fc", "head.3") and _widths(model)[classifier] == 10
    assert sum(_widths(model).values()) - 10 < 0.52 * (sum(widths.values()) - 10)  # the channels are gone
    model.eval()
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert before / count_macs(model, SHAPE) >= 2.0

    # Every dependent layer shrank with its conv: the BatchNorms after them, the residual partners.
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.weight.shape == module.running_mean.shape == (module.num_features,)

    ckpt = {"arch": spec, "structure": pruner.history(), "state_dict": model.state_dict()}
    assert json.loads(json.dumps(ckpt["structure"])) == ckpt["structure"]
    with pytest.raises(RuntimeError):  # the saved weights need the structure: a plain build does not take them
        build_model(spec).load_state_dict(ckpt["state_dict"])
    rebuilt = _fresh_process_outputs(tmp_path, ckpt, x, cwd=user_dir)
    assert torch.equal(rebuilt, out)


def test_rising_targets_give_the_expected_channel_counts():
    def net():
        torch.manual_seed(0)
        return build_model(model_spec("mlp", {"hidden": [40, 20]}, 10, SHAPE))

    for scope, expected in [("layer", {0.25: (30, 15), 0.5: (20, 10), 0.8: (8, 4)}), ("global", None)]:
        model = net()
        pruner = StructuredPruner(model, SHAPE, scope=scope)
        assert pruner.initial_channels == {"net.1": 40, "net.3": 20}  # never the classifier net.5
        for target in (0.25, 0.5, 0.8):
            pruner.prune_to(target)
            kept = (model.net[1].out_features, model.net[3].out_features)
            if expected:
                assert kept == expected[target]
            assert sum(kept) == round(60 * (1 - target))
            assert pruner.sparsity() == pytest.approx(1 - sum(kept) / 60)
            assert model.net[3].in_features == kept[0] and model.net[5].in_features == kept[1]
            assert model.net[5].out_features == 10
        assert pruner.steps_taken == 3
        pruner.prune_to(0.5)  # below what is already removed: nothing comes back, nothing more goes
        assert pruner.steps_taken == 3 and sum((model.net[1].out_features, model.net[3].out_features)) == 12
        # the history rebuilds the same shapes on a fresh model, and the state restores it
        fresh = apply_structure(net(), pruner.history(), SHAPE)
        fresh.load_state_dict(model.state_dict())
        again = StructuredPruner(net(), SHAPE, scope=scope)
        again.load_state_dict(pruner.state_dict())
        assert again.steps_taken == 3 and again.history() == pruner.history()
        assert _widths(again.model) == _widths(model)


def test_the_least_important_channels_go_first():
    model = build_model(model_spec("mlp", {"hidden": [8]}, 3, (1, 2, 2)))
    magnitudes = torch.tensor([5.0, 0.5, 7.0, 2.0, 6.0, 1.0, 4.0, 3.0])
    with torch.no_grad():
        model.net[1].weight.copy_(magnitudes[:, None].expand(8, 4))
        model.net[1].bias.zero_()
        model.net[3].weight.fill_(1.0)  # the next layer sees every channel alike
    pruner = StructuredPruner(model, (1, 2, 2), importance="l1", scope="layer")
    pruner.prune_to(0.5)
    assert sorted(model.net[1].weight[:, 0].tolist()) == [4.0, 5.0, 6.0, 7.0]
    assert pruner.history() == [["net.1", True, [1, 3, 5, 7]]]


def test_bn_scale_keeps_the_channels_with_the_largest_batchnorm_scales():
    torch.manual_seed(0)
    model = SmallCNN(SHAPE, 10, channels=(8, 16), hidden=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model.features[1], model.features[5]):
            bn.weight.copy_(torch.randperm(bn.num_features, generator=g).float() + 1)  # distinct scales
    top = [sorted(bn.weight.tolist())[bn.num_features // 2 :] for bn in (model.features[1], model.features[5])]
    pruner = StructuredPruner(model, SHAPE, importance="bn_scale", scope="layer")
    # channels without a BatchNorm after them (the hidden linear) cannot be ranked by it: left alone, not counted
    assert set(pruner.initial_channels) == {"features.0", "features.4"}
    pruner.prune_to(0.5)
    assert [sorted(bn.weight.tolist()) for bn in (model.features[1], model.features[5])] == top
    assert model.classifier[1].out_features == 32 and model.classifier[1].in_features == 8 * 7 * 7
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)

    with pytest.raises(ValueError, match="BatchNorm.*l1 or l2"):
        StructuredPruner(build_model(model_spec("mlp", {"hidden": [16]}, 10, SHAPE)), SHAPE, importance="bn_scale")


def test_bad_arguments_and_a_history_of_another_model_are_refused():
    model = build_model(model_spec("mlp", {"hidden": [16]}, 10, SHAPE))
    with pytest.raises(ValueError, match="importance"):
        StructuredPruner(model, SHAPE, importance="l3")
    with pytest.raises(ValueError, match="scope"):
        StructuredPruner(model, SHAPE, scope="net")
    with pytest.raises(ValueError, match="sparsity"):
        StructuredPruner(model, SHAPE).prune_to(1.0)
    with pytest.raises(ValueError, match="does not fit"):
        apply_structure(model, [["features.0", True, [0, 1]]], SHAPE)
    with pytest.raises(ValueError, match="damaged"):
        apply_structure(model, [["net.1", "yes", [0]]], SHAPE)
    ckpt = {
        "arch": model_spec("mlp", {"hidden": [16]}, 10, SHAPE),
        "structure": [["net.9", True, [0]]],
        "state_dict": model.state_dict(),
    }
    with pytest.raises(CheckpointError, match="structure"):
        build_from_checkpoint(ckpt, where="pruned checkpoint")


def test_round_to_keeps_multiples():
    model = build_model(model_spec("mlp", {"hidden": [64, 40]}, 10, SHAPE))
    pruner = StructuredPruner(model, SHAPE, scope="layer", round_to=8)
    pruner.prune_to(0.55)
    assert (model.net[1].out_features, model.net[3].out_features) == (32, 24)  # 28.8 -> 32, 18 -> 24


def test_every_checkpoint_load_rebuilds_a_structured_stage(in_tmp, write_recipe):
    """load_model, the pipeline's load_stage_model and the report all take a checkpoint with a structure."""
    from kdcompress.checkpoint import save_checkpoint
    from kdcompress.loading import load_model
    from kdcompress.recipe import load_recipe
    from kdcompress.report import build_report
    from kdcompress.run import checkpoint_path, load_stage_model

    recipe = load_recipe(
        write_recipe(changes={"student": {"model": "cnn", "args": {"channels": [8, 16], "hidden": 32}}})
    )
    spec = model_spec("cnn", {"channels": [8, 16], "hidden": 32}, 10, SHAPE)
    torch.manual_seed(0)
    model = build_model(spec)
    dense_macs = count_macs(model, SHAPE)
    pruner = StructuredPruner(model, SHAPE)
    pruner.prune_to(0.5)
    path = checkpoint_path(recipe.run_dir, "pruned")
    save_checkpoint(
        path,
        {
            "stage": "pruned",
            "arch": spec,
            "structure": pruner.history(),
            "state_dict": model.state_dict(),
            "recipe": {},
            "dataset": "fashion-mnist-mini",
            "metrics": {"test_accuracy": 0.5, "test_samples": 1000},
        },
    )
    model.eval()
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        expected = model(x)
        loaded, _ = load_model(path)
        assert torch.equal(loaded(x), expected)
        staged, arch = load_stage_model(recipe, "pruned", torch.device("cpu"))
        assert arch == spec and torch.equal(staged.eval()(x), expected)
    row = build_report(recipe.run_dir, latency=False)["stages"][0]
    assert row["stage"] == "pruned" and row["macs"] == count_macs(model, SHAPE) and row["macs"] * 2 < dense_macs


# --------------------------------------------------------------------------- fit


class _PruneAt(Hook):
    """Prunes structurally before the given global batches: {step: target sparsity}."""

    def __init__(self, pruner: StructuredPruner, at: dict[int, float], stop_at: int | None = None):
        self.pruner, self.at, self.stop_at = pruner, at, stop_at
        self.snapshots: dict[int, dict] = {}

    def on_batch_start(self, step: int, batches_per_epoch: int) -> bool:
        if step == self.stop_at:
            raise KeyboardInterrupt  # the run dies here; the state of the last finished epoch is on disk
        if step in self.at:
            self.pruner.prune_to(self.at[step])
            self.snapshots[step] = {k: v.clone() for k, v in self.pruner.model.state_dict().items()}
            return self.pruner.changes_parameters
        return False

    def state_dict(self) -> dict:
        return self.pruner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state)

    def epoch_metrics(self) -> dict:
        return {"sparsity": self.pruner.sparsity()}


@pytest.fixture(scope="module")
def mini() -> DataSplits:
    s = load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)
    return DataSplits(
        s.name,
        s.train.subset(torch.arange(1536)),
        s.test.subset(torch.arange(500)),
        None,
        s.num_classes,
        s.input_shape,
        "mini-1536",
    )


SETTINGS = TrainSettings(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, schedule="step", step_size=1, gamma=0.5)
BATCH = 128  # 12 batches per epoch
AT = {2: 0.25, 12 + 5: 0.5}  # in the first and in the middle of the second epoch


def _train(mini, state_path: Path, stop_at: int | None = None, console: Console | None = None):
    torch.manual_seed(0)
    model = SmallCNN(SHAPE, 10, channels=(8, 16), hidden=32)
    hook = _PruneAt(StructuredPruner(model, SHAPE), AT, stop_at)
    history = fit(
        model,
        lambda logits, y, idx, x: nn.functional.cross_entropy(logits, y),
        mini,
        SETTINGS,
        batch_size=BATCH,
        seed=0,
        stage="pruned",
        hooks=[hook],
        state_path=state_path,
        state_tag="t",
        console=console or Console(stderr=True, quiet=True),
    )
    return model, hook, history


def test_fit_trains_on_after_structured_pruning_and_resumes_to_the_same_weights(mini, tmp_path):
    model, hook, history = _train(mini, tmp_path / "whole.pt")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["lr"] for r in history] == pytest.approx([0.05, 0.025, 0.0125])  # the schedule survives the rebuilds
    assert history[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # the optimiser holds the new parameters: every one of them moved after the last pruning
    after_pruning = hook.snapshots[17]
    for name, value in model.state_dict().items():
        if value.is_floating_point() and "running" not in name:
            assert not torch.equal(value, after_pruning[name]), name
    assert history[-1]["train_accuracy"] > 0.6 and history[-1]["test_accuracy"] > 0.6

    # A run killed in the third epoch, then resumed on a freshly built model and pruner
    with pytest.raises(KeyboardInterrupt):
        _train(mini, tmp_path / "resumed.pt", stop_at=2 * 12 + 3)
    out = io.StringIO()
    resumed, _, resumed_history = _train(mini, tmp_path / "resumed.pt", console=Console(file=out, width=200))
    assert "resuming after epoch 2/3" in out.getvalue()
    assert [r["epoch"] for r in resumed_history] == [1, 2, 3]
    expected = model.state_dict()
    got = resumed.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
