"""`inspect`: every architecture, statistics with known answers, and refused inputs."""

import json

import numpy as np
import pytest
import torch

from resnet_study.catalogue import PRESETS
from resnet_study.cli import main
from resnet_study.inspection.anatomy import anatomy
from resnet_study.inspection.probes import BlockStats, cam_layer, first_per_class, watch_blocks
from resnet_study.models import BasicBlock, network
from resnet_study.training.checkpoint import save_checkpoint

EXPERIMENTS = PRESETS.experiments

# One preset per distinct architecture: the paper's rows and the literature's networks.
ARCHITECTURES = ["resnet18-lr0.01", "resnet18-wide", "resnet18-3x3-shortcut", "resnet18-preact",
                 "resnet18-no-bn", "resnet18-dropout", "new-wide-resnet18", "wrn-16-8",
                 "resnet-110"]


def write_run(root, name, **overrides):
    """A run folder as `train` leaves it (config.json, checkpoint.pt), with fresh weights: what
    `inspect` reads, without paying for training."""
    exp = EXPERIMENTS[name].replace(data="synthetic", test_subset=64, **overrides)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(exp.to_dict()))
    torch.manual_seed(0)
    model = network(exp.model, num_classes=10)
    save_checkpoint(root / "checkpoint.pt", model=model.state_dict(), experiment=exp.to_dict(),
                    epoch=1)
    return root


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_is_inspected(name, tmp_path, capsys):
    run = write_run(tmp_path / name, name)
    assert main(["inspect", str(run), "--images", "48", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = run / "inspect"
    stages = ["layer1", "layer2", "layer3"] + ([] if name in ("wrn-16-8", "resnet-110")
                                               else ["layer4"])
    for figure in ["stem_filters", "cam_correct", "cam_wrong", "activations", "embedding",
                   "feature_maps_stem", *(f"feature_maps_{s}" for s in stages)]:
        assert (out / f"{figure}.png").stat().st_size > 0
    assert {p.name for p in out.glob("*.svg")} == {"activations.svg", "embedding.svg"}
    rows = (out / "activations.csv").read_text().splitlines()
    blocks = {"wrn-16-8": 6, "resnet-110": 54}.get(name, 8)
    assert len(rows) == 1 + blocks
    assert summary["images"] == 48 and len(summary["grid_images"]) == 8
    # The paper's stem leaves layer2 as the last stage with 4x4 maps; the CIFAR stem, layer3.
    assert summary["cam_layer"] == ("layer3" if name in ("wrn-16-8", "resnet-110") else "layer2")
    assert len((out / "embedding.csv").read_text().splitlines()) == 1 + 48


def block_row(model, x, block="layer1.1"):
    stats, handles = watch_blocks(anatomy(model, True, None))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return stats[block].row(block)


@pytest.mark.parametrize("name", ["resnet18-lr0.01", "resnet18-preact", "resnet-110"])
def test_statistics_have_the_known_answers(name):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    model = network(EXPERIMENTS[name].model, num_classes=10).eval()
    block = model.layer1[1]
    post = isinstance(block, BasicBlock)
    # Mean and variance are those of the block's output.
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.update(out=out))
    row = block_row(model, x)
    handle.remove()
    assert row["mean"] == pytest.approx(seen["out"].double().mean().item(), rel=1e-6)
    assert row["variance"] == pytest.approx(seen["out"].double().var(unbiased=False).item(),
                                            rel=1e-5)
    assert row["residual_ratio"] > 0 and 0 <= row["dead_fraction"] < 1
    # A residual branch that adds nothing: ratio 0.
    with torch.no_grad():
        if post:
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
        else:
            block.conv2.weight.zero_()
    assert block_row(model, x)["residual_ratio"] == 0
    # Units between the two convs pushed below zero for every image: all dead.
    with torch.no_grad():
        (block.bn1 if post else block.bn2).bias.fill_(-1e4)
    assert block_row(model, x)["dead_fraction"] == 1.0


def test_shortcut_is_the_projection_where_the_shape_changes():
    """layer2.0 of the base model: its shortcut is the 1x1 projection's output, not its input
    (whose shape differs)."""
    model = network(EXPERIMENTS["resnet18-lr0.01"].model, num_classes=10).eval()
    stats, handles = watch_blocks(anatomy(model, True, None))
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    s: BlockStats = stats["layer2.0"]
    assert s.shortcut.shape == s.residual.shape == (4, 128, 4, 4)
    for h in handles:
        h.remove()


def test_picture_grids_take_the_first_image_of_each_class():
    labels = np.array([3, 3, 1, 0, 1, 2, 0])
    assert first_per_class(labels).tolist() == [3, 2, 5, 0]  # classes 0, 1, 2, 3
    right = np.array([False, True, False, True, True, False, True])
    assert first_per_class(labels, right, k=2).tolist() == [3, 4]  # classes 0 and 1
    assert len(first_per_class(labels, np.zeros(7, bool))) == 0


def test_cam_layer_is_the_deepest_with_four_pixels_a_side():
    assert cam_layer({"stem": 8, "layer1": 8, "layer2": 4, "layer3": 2, "layer4": 1})[0] == "layer2"
    assert cam_layer({"stem": 32, "layer1": 32, "layer2": 16, "layer3": 8})[0] == "layer3"
    assert cam_layer({"stem": 2, "layer1": 2, "layer2": 1})[0] == "layer1"  # none has 4x4


@pytest.mark.parametrize("damage, message", [
    ("not a run", "is not a run directory (no config.json)"),
    ("no checkpoint", "no checkpoint at"),
    ("unknown architecture", "family must be resnet18, cifar-resnet or a network of your own "
                             "as module:callable, not 'densenet'"),
    ("another architecture's checkpoint", "does not fit"),
])
def test_bad_input_is_refused_and_nothing_is_written(damage, message, tmp_path, capsys):
    run = write_run(tmp_path / "run", "resnet18-lr0.01")
    config = json.loads((run / "config.json").read_text())
    if damage == "not a run":
        (run / "config.json").unlink()
    elif damage == "no checkpoint":
        (run / "checkpoint.pt").unlink()
    elif damage == "unknown architecture":
        config["model"]["family"] = "densenet"
        (run / "config.json").write_text(json.dumps(config))
    else:
        (run / "config.json").write_text(json.dumps(
            EXPERIMENTS["wrn-16-8"].replace(data="synthetic").to_dict()))
    before = sorted(p.name for p in run.iterdir())
    assert main(["inspect", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in run.iterdir()) == before  # no inspect/ folder
