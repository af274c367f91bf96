"""The search folder's page (issue 30, part 4): a title taken from the search, a parallel-
coordinates figure a reader can follow whatever the space's size, and a trials table that fits
the page. The study is built in memory, as a search of the default space leaves it, and the
page is written through `write_outputs`, as `resnet-study search` writes it."""

import random
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from resnet_study.catalogue import PRESETS
from resnet_study.data.sources import ImageSet
from resnet_study.search.outputs import write_outputs
from resnet_study.search.space import load_space
from resnet_study.search.trials import Search

BASE = "resnet18-lr0.01"
# Knobs of the default space that every trial below draws, and their values: lr, optimizer,
# weight_decay and block decide the value; the other varying ones are noise.
VARYING = {"lr": None, "optimizer": ["sgd", "adam"], "weight_decay": None, "block": ["post", "pre"],
           "width": [1, 2], "shortcut_kernel": [1, 3], "batch_norm": [True, False],
           "batch_size": [64, 128, 256], "fc_dropout": None, "label_smoothing": None,
           "stem": ["imagenet", "imagenet-nopool"], "mixing": ["none", "mixup"]}
CONSTANT = {"clipping": ([False, True], False), "ema_horizon": ([0.0, 0.1], 0.0),  # never vary
            "decay_norms_and_biases": ([True, False], True)}
RANGES = {"lr": (0.001, 0.3, True), "weight_decay": (1e-5, 1e-3, True),
          "fc_dropout": (0.0, 0.5, False), "label_smoothing": (0.0, 0.2, False)}
LONG_FAILURE = ("failed: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB "
                "total capacity; 75.31 GiB already allocated; 1.02 GiB free; 76.80 GiB "
                "reserved in total by PyTorch) If reserved memory is >> allocated memory try "
                "setting max_split_size_mb to avoid fragmentation")


def _trial(rng: random.Random, state: TrialState = TrialState.COMPLETE, **attrs):
    """One trial of the default space: the knobs above, nesterov only where SGD draws it."""
    params = {k: value for k, (_, value) in CONSTANT.items()}
    dists = {k: CategoricalDistribution(choices) for k, (choices, _) in CONSTANT.items()}
    for knob, choices in VARYING.items():
        if choices is None:
            low, high, log = RANGES[knob]
            dists[knob] = FloatDistribution(low, high, log=log)
            params[knob] = (np.exp(rng.uniform(np.log(low), np.log(high))) if log
                            else rng.uniform(low, high))
        else:
            dists[knob] = CategoricalDistribution(choices)
            params[knob] = rng.choice(choices)
    if params["optimizer"] == "sgd":
        dists["nesterov"] = CategoricalDistribution([False, True])
        params["nesterov"] = rng.choice([False, True])
    value = (0.5 - abs(np.log10(params["lr"]) + 2) / 4 + 0.1 * (params["optimizer"] == "adam")
             - abs(np.log10(params["weight_decay"]) + 4) / 10 + 0.1 * (params["block"] == "pre"))
    done = state == TrialState.COMPLETE
    return create_trial(state=state, params=params, distributions=dists,
                        value=float(value) if done else None,
                        intermediate_values={1: float(value)} if done else {},
                        user_attrs={"outcome": "completed" if done else LONG_FAILURE,
                                    "epochs": 1 if done else None, "seconds": 3.25, **attrs})


def _study(completed: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    rng = random.Random(0)
    for i in range(completed):
        study.add_trial(_trial(rng, paper_row=BASE if i == 0 else None))
    study.add_trial(_trial(rng, TrialState.FAIL))
    return study


def _write(folder: Path, study: optuna.Study) -> str:
    """The page `write_outputs` leaves in `folder` for `study`, a search around BASE."""
    folder.mkdir(parents=True, exist_ok=True)
    base = PRESETS.get(BASE)
    search = Search(out=folder, base=base, space=load_space(None, base), fixed={}, trials=24)
    empty = np.zeros((0, 3, 32, 32), np.uint8)
    images = ImageSet("synthetic", ["a", "b"], empty, np.zeros(0, np.int64), empty,
                      np.zeros(0, np.int64))
    write_outputs(search, study, images)
    return (folder / "index.html").read_text()


class _Page(HTMLParser):
    """The parts of the page the tests read: its title, its h1, the figure captions, and each
    table's rows of cells, with whether the table sits in a box that scrolls sideways."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.title = self.h1 = ""
        self.captions: list[str] = []
        self.tables: list[dict] = []
        self._open: list[tuple[str, bool]] = []  # (tag, scrolls sideways)
        self._text: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        style = dict(attrs).get("style") or ""
        self._open.append((tag, "overflow-x:auto" in style.replace(" ", "")))
        if tag == "table":
            self.tables.append({"scrolls": any(s for _, s in self._open), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        if tag in ("title", "h1", "figcaption", "td", "th"):
            self._text = ""

    def handle_data(self, data):
        if self._text is not None:
            self._text += data

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass
        if tag in ("td", "th"):
            self.tables[-1]["rows"][-1].append(self._text)
        elif tag == "figcaption":
            self.captions.append(self._text)
        elif tag in ("title", "h1"):
            setattr(self, tag, self._text)
        if tag in ("title", "h1", "figcaption", "td", "th"):
            self._text = None


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> _Page:
    """A search of the default space with 20 completed trials and a failed one."""
    return _Page(_write(tmp_path_factory.mktemp("page") / "search", _study(20)))


@pytest.mark.parametrize("folder", ["search", "Search", "search-2", BASE, "lr-sweep"])
def test_the_title_names_the_searched_experiment_and_never_doubles_a_word(folder, tmp_path):
    p = _Page(_write(tmp_path / folder, _study(0)))
    words = re.findall(r"[\w.]+", p.h1.casefold())
    assert not [w for w, n in zip(words, words[1:], strict=False) if w == n], p.h1
    assert p.h1.count(BASE) == 1 and p.h1.startswith(f"Search around {BASE}")
    assert p.title.startswith(p.h1)
    if folder.casefold() in ("search", BASE):  # the default name, or the experiment's: no more
        assert p.h1 == f"Search around {BASE}"
    else:
        assert p.h1.endswith(folder)


def _parallel(p: _Page) -> tuple[str, list[str]]:
    caption = next(c for c in p.captions if c.startswith("Parallel coordinates"))
    return caption, re.search(r"Left to right: (.*)\.$", caption)[1].split(", ")


def test_the_parallel_coordinates_show_the_most_important_of_the_knobs_that_varied(page):
    caption, drawn = _parallel(page)
    varying = set(VARYING) | {"nesterov"}
    assert len(drawn) == 8 and set(drawn) <= varying and not set(drawn) & set(CONSTANT)
    assert f"the 8 most important (by Optuna's parameter importances) of the {len(varying)} " \
           f"knobs that varied; {len(CONSTANT)} that kept one value are left out" in caption
    assert {"lr", "optimizer"} <= set(drawn)  # the value follows them: importances see that


def test_too_few_trials_to_rank_keeps_the_first_knobs_that_varied_and_says_so(tmp_path):
    study = _study(3)
    done = [t.params for t in study.trials if t.state == TrialState.COMPLETE]
    varying = [k for k in done[0] | done[1] | done[2]
               if len({repr(d.get(k)) for d in done if k in d}) > 1]
    caption, drawn = _parallel(_Page(_write(tmp_path / "search", study)))
    assert len(varying) > 8 and drawn == sorted(varying[:8])
    assert ("the first 8 (only 3 completed trials: too few to rank them by importance) of the "
            f"{len(varying)} knobs that varied") in caption


def test_a_study_where_no_knob_varied_draws_no_parallel_coordinates_and_says_why(tmp_path):
    text = _write(tmp_path / "search", _study(1))
    assert "Parallel coordinates not drawn: no knob took two values among the 1 completed " \
           "trials." in text
    assert not [c for c in _Page(text).captions if c.startswith("Parallel coordinates")]


def test_the_trials_table_has_a_few_columns_and_scrolls_in_its_own_box(page):
    table = page.tables[-1]
    head, *rows = table["rows"]
    assert table["scrolls"] and len(rows) == 21
    assert head == ["number", "state", "value", "epochs", "seconds", "outcome", "paper row",
                    "knobs"]
    assert {len(r) for r in rows} == {len(head)}  # one column a field, never one a knob
    for r in rows:
        knobs = dict(kv.split("=") for kv in r[-1].split(", "))
        assert set(knobs) >= set(CONSTANT) | set(VARYING)
        assert ("nesterov" in knobs) == (knobs["optimizer"] == "sgd")  # only what it drew
    assert rows[0][6] == BASE and rows[-1][1] == "FAIL" and rows[-1][5] == LONG_FAILURE
