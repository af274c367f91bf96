"""Issue 20's presets: the improved ResNet-18s within their budgets, and the ablation group that
takes one part of the base-cost one away at a time."""

import pytest

from resnet_study.catalogue import PRESETS
from resnet_study.config import RECIPE_SECTIONS, differences
from resnet_study.labels import settings_cell
from resnet_study.models import training_flops

EXPERIMENTS, GROUPS = PRESETS.experiments, PRESETS.groups()

BASE, IMPROVED = EXPERIMENTS["resnet18-lr0.01"], EXPERIMENTS["improved-resnet18"]
EVALUATION_ONLY = {"tta"}  # changes no training: Table 1 gives it a column, not a row


def changes(old, new) -> dict:
    return {name: now for name, _, now in differences(old, new, RECIPE_SECTIONS)}


@pytest.mark.parametrize("name, budget", [("improved-resnet18", 0.25),
                                          ("improved-resnet18-wide", 0.92)])
def test_each_improved_preset_is_within_its_budget_and_protocol(name, budget):
    exp = EXPERIMENTS[name]
    assert training_flops(exp.model, 100) / 1e9 <= budget
    assert exp.row.endswith("(this study)")
    assert (exp.train.epochs, exp.train.batch_size) == (25, 256)  # the paper's protocol
    assert exp.train.tta  # tested with flips too, in a column of its own
    assert settings_cell(name, exp.extends, "paper") == "this study's preset" + (
        f", extends {exp.extends}" if exp.extends else "")


def test_the_new_wide_cost_preset_spends_its_budget():
    wide = EXPERIMENTS["improved-resnet18-wide"]
    assert training_flops(wide.model, 100) > 3 * training_flops(IMPROVED.model, 100)


def test_each_ablation_row_puts_back_the_base_models_values_of_one_part():
    """Every row is the improved preset with some of its departures from the base model taken
    back; no departure is taken back twice, and none is never taken back."""
    departures = set(changes(BASE, IMPROVED)) - EVALUATION_ONLY
    taken_back = []
    for name in GROUPS["improved-ablation"]:
        row = EXPERIMENTS[name]
        assert row.extends == "improved-resnet18" and row.row.startswith("Improved ResNet-18")
        removed = changes(IMPROVED, row)
        assert removed and set(removed) <= departures, (name, removed)
        assert removed == {k: v for k, v in changes(IMPROVED, BASE).items() if k in removed}
        taken_back += removed
    assert sorted(taken_back) == sorted(departures)
