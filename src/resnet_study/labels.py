"""The protocol label of runs shown together: what a table, figure or page says of the runs it
holds. A run's own label is `Experiment.profile` and `.settings` (recorded in its config.json);
every output that shows several runs names their protocol from here."""

from __future__ import annotations

from collections.abc import Iterable

from .catalogue import PRESETS
from .config import PAPER, Experiment

PROTOCOL_NOTES = {
    "quick": "QUICK profile: few epochs on a subset. A smoke test of the pipeline, not the "
             "paper's protocol; do not compare with the paper's numbers.",
    "custom": "Rows whose settings are not 'paper' ran with settings other than their "
              "experiment's preset (named in the Settings column): not the paper's protocol, "
              "so no difference from the paper's number is given for them."}
TITLE_MARKS = {"paper": "", "quick": " [QUICK profile]",
               "custom": " [custom settings, not the paper's protocol]"}
# The literature row each literature experiment re-measures, and under which recipe.
LITERATURE = {lit[recipe]: (lit, label) for lit in PAPER["literature"]
              for recipe, label in (("published", "published recipe"),
                                    ("paper_recipe", "paper's protocol"))}


def combined_profile(profiles: Iterable[str]) -> str:
    """The profile of several runs shown together: quick if any is, else custom if any is."""
    profiles = set(profiles)
    return "quick" if "quick" in profiles else "custom" if "custom" in profiles else "paper"


def combined_settings(experiments: Iterable[Experiment]) -> str:
    """The settings of an experiment's runs (normally one; several if the runs disagree)."""
    return "; ".join(sorted({e.settings for e in experiments}))


def title_mark(profiles: Iterable[str]) -> str:
    """The suffix of a figure's title drawn from runs off the paper's protocol."""
    return TITLE_MARKS[combined_profile(profiles)]


def protocol_notes(profiles: Iterable[str]) -> list[str]:
    """The warnings a table or page of runs with these profiles carries."""
    profiles = set(profiles)
    return [note for profile, note in PROTOCOL_NOTES.items() if profile in profiles]


def settings_cell(experiment: str, extends: str, settings: str) -> str:
    """Table 1's Settings cell. An experiment run as its preset says is named by what that
    preset is rather than "paper": a literature experiment by the recipe it re-measures, one of
    this study's presets (the improved ResNet-18 and its ablation) as such, a user's own by the
    experiment it extends."""
    if settings != "paper":
        return settings
    if experiment in LITERATURE:
        return LITERATURE[experiment][1]
    preset = PRESETS.experiments.get(experiment)
    if preset is not None and preset.group != "paper":
        return "this study's preset" + (f", extends {extends}" if extends else "")
    return f"own, extends {extends}" if extends else settings
