"""The benchmark's case builder (blda_posthoc.demo.cases, .train) on a tiny case."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.demo.cases import (
    BenchData,
    Case,
    bench_table,
    build_case,
    load_network,
    read_images,
    run_compare,
    save_network,
    summarise_compare,
    write_data,
)
from blda_posthoc.demo.net import DemoSegNet
from blda_posthoc.demo.train import SelfTraining, SourceTraining, pseudo_labels, train_source

TINY_DATA = BenchData(seed=7, size=(64, 128), source=5, target_train=4, target_val=3)
TINY_SOURCE = SourceTraining(width=4, iters=3, seed=1, batch=2, crop=(32, 64))
TINY_SELF = SelfTraining(iters=3, seed=2, batch=2, crop=(32, 64), class_balanced=True)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: much faster than two on a small, busy CPU (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_case_builds_with_the_real_commands_is_cached_and_compares(tmp_path: Path):
    case = Case("tiny", TINY_SOURCE, TINY_SELF)
    files = build_case(tmp_path, case, TINY_DATA, device="cpu")
    counts = {"src": 5, "tgt_train": 4, "tgt_val": 3}
    for key, store in files.stores.items():
        with h5py.File(store) as f:
            assert len(f["images"]) == counts[key]
            has_labels = ["label" in f["images"][n] for n in f["images"]]
        assert all(has_labels) == (key != "tgt_train") and any(has_labels) == (key != "tgt_train")
    assert all(path.is_file() for path in files.stats.values())
    assert 0.0 <= files.plain_miou("val") <= 100.0 and 0.0 <= files.plain_miou("src") <= 100.0
    log = (files.folder / "commands.log").read_text()
    assert log.count("$ blda dump-logits") == 3 and log.count("$ blda fit-stats") == 2
    assert "--label-source gt" in log and "--label-source pseudo" in log
    assert f"--calibration {files.stats['src']}" in log
    # Both the source model and the self-trained one are cached, and they differ.
    models = sorted((tmp_path / "models").glob("*.pt"))
    assert len(models) == 2 and files.model in models
    source_model = next(p for p in models if p != files.model)
    assert not _same(_weights(load_network(source_model)), _weights(load_network(files.model)))
    # A second call runs nothing.
    stamps = {p: p.stat().st_mtime_ns for p in [*models, *files.stores.values()]}
    again = build_case(tmp_path, case, TINY_DATA, device="cpu")
    assert again.seconds == {}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Another validation set: only its store and its evaluation are made again.
    bigger = build_case(tmp_path, case, replace(TINY_DATA, target_val=4), device="cpu")
    assert set(bigger.seconds) == {"dump tgt_val", "plain val"}
    # Another model: every step again, in the same case folder.
    changed = build_case(tmp_path, Case("tiny", TINY_SOURCE), TINY_DATA, device="cpu")
    assert changed.model == source_model
    assert set(changed.seconds) == set(files.seconds)
    assert json.loads((files.folder / "case.json").read_text())["case"]["self_training"] is None
    # compare on the case: held-out figures that the benchmark's table reads.
    files = changed
    methods = "none,blda,vector-scaling,logit-adjust"
    path = run_compare(files, select_on="1", taus="0,0.5", methods=methods, device="cpu")
    report = json.loads(path.read_text())
    assert report["format"] == "blda-compare" and len(report["split"]["held_out"]) == 2
    summary = summarise_compare(report)
    assert set(summary["methods"]) == set(methods.split(","))
    assert summary["none"] == next(r["miou"] for r in report["rows"] if r["method"] == "none")
    assert summary["best"]["miou"] == max(r["miou"] for r in report["rows"])
    assert summary["selected"]["miou"] <= summary["best"]["miou"]
    assert "blda" in summary["auto"] and summary["auto"]["blda"]["criterion"]
    table = bench_table({"tiny": {"plain_src": 1.0, "plain_val": 2.0, "summary": summary}})
    assert "| vector-scaling" in table and "| blda, τ auto" in table
    assert "$ blda compare" in (files.folder / "commands.log").read_text()


def test_scenes_of_the_three_sets_are_distinct_and_only_the_unlabelled_set_lacks_labels(
    tmp_path: Path,
):
    sets = write_data(tmp_path, TINY_DATA)
    assert sets["target_train"].labels is None
    assert not (sets["target_train"].root / "labels").exists()
    for name, count in (("source", 5), ("target_val", 3)):
        labels = sets[name].labels
        assert labels is not None and len(list(labels.glob("*.png"))) == count
    train = read_images(sets["target_train"].images)
    val = read_images(sets["target_val"].images)
    assert not any(np.array_equal(a, b) for a in train for b in val)
    assert read_images(sets["source"].images).shape == (5, 64, 128, 3)
    # Finished sets are kept; a larger validation set is rendered beside them, and its
    # first scenes are the smaller set's.
    stamps = {k: (v.root / "done.json").stat().st_mtime_ns for k, v in sets.items()}
    more = write_data(tmp_path, replace(TINY_DATA, target_val=4))
    assert {k: (sets[k].root / "done.json").stat().st_mtime_ns for k in sets} == stamps
    assert more["source"] == sets["source"] and more["target_val"] != sets["target_val"]
    assert np.array_equal(read_images(more["target_val"].images)[:3], val)


def test_source_training_is_deterministic_and_depends_on_the_seed(tmp_path: Path):
    images = read_images(write_data(tmp_path, TINY_DATA)["source"].images)
    labels = np.stack([np.zeros(images.shape[1:3], np.uint8) + i for i in range(len(images))])
    first = _weights(train_source(images, labels, 10, TINY_SOURCE))
    second = _weights(train_source(images, labels, 10, TINY_SOURCE))
    other = SourceTraining(**{**TINY_SOURCE.__dict__, "seed": 2})
    assert _same(first, second)
    assert not _same(first, _weights(train_source(images, labels, 10, other)))


def test_saved_networks_load_back_as_whole_modules_or_state_dicts(tmp_path: Path):
    model = DemoSegNet(10, width=4).eval()
    save_network(model, tmp_path / "whole.pt")
    save_network(model, tmp_path / "state.pt", whole_module=False)
    assert _same(_weights(load_network(tmp_path / "whole.pt")), _weights(model))
    assert _same(_weights(load_network(tmp_path / "state.pt", width=4)), _weights(model))
    with pytest.raises(RuntimeError):
        load_network(tmp_path / "state.pt", width=8)


def test_pseudo_labels_threshold_and_class_balance():
    # Two classes on one 1x10 row: class 0 confident on 4 pixels, class 1 never above 0.7.
    conf0 = torch.tensor([0.99, 0.95, 0.92, 0.91])
    conf1 = torch.tensor([0.7, 0.65, 0.6, 0.55, 0.52, 0.51])
    p0 = torch.cat([conf0, 1 - conf1])
    probs = torch.stack([p0, 1 - p0]).view(1, 2, 1, 10)
    plain = pseudo_labels(probs, threshold=0.9, class_balanced=False, keep=0.5).view(-1)
    assert plain.tolist() == [0, 0, 0, 0] + [IGNORE_INDEX] * 6
    balanced = pseudo_labels(probs, threshold=0.9, class_balanced=True, keep=0.5).view(-1)
    # Class 0 keeps all four (its median is above the threshold: never raised); class 1 keeps
    # its more confident half.
    assert balanced[:4].tolist() == [0, 0, 0, 0]
    assert balanced[4:].tolist() == [1, 1, 1] + [IGNORE_INDEX] * 3


def _report() -> dict:
    def row(method, tau, miou, select, auto=False):
        return {
            "method": method,
            "tau": tau,
            "auto": auto,
            "miou": miou,
            "macc": miou,
            "selection_miou": select,
            "per_class": {},
        }

    return {
        "format": "blda-compare",
        "version": 1,
        "rows": [
            row("none", None, 50.0, 52.0),
            row("blda", 0.5, 58.0, 54.0),  # best held out, not best on the selection images
            row("blda", 0.2, 53.0, 55.0),
            row("blda", 0.31, 55.5, 54.5, auto=True),
            row("vector-scaling", None, 57.0, 56.0),
        ],
        "selected": {"method": "vector-scaling", "tau": None, "miou": 57.0},
        "tau_auto": {"blda": {"tau": 0.31, "criterion": "entropy"}},
    }


def test_summary_picks_each_methods_strength_on_the_selection_images():
    summary = summarise_compare(_report())
    assert summary["methods"]["blda"] == {"tau": 0.2, "miou": 53.0, "selection_miou": 55.0}
    assert summary["methods"]["none"]["miou"] == 50.0
    assert summary["auto"] == {"blda": {"tau": 0.31, "criterion": "entropy", "miou": 55.5}}
    assert summary["best"] == {"method": "blda", "tau": 0.5, "auto": False, "miou": 58.0}
    assert summary["selected"] == {
        "method": "vector-scaling",
        "tau": None,
        "auto": False,
        "miou": 57.0,
    }
    # The single-choice form of tau_auto (no auto row) is read too.
    report = _report()
    report["rows"] = [r for r in report["rows"] if not r["auto"]]
    report["tau_auto"] = {"tau": 0.4, "criterion": "entropy"}
    report["selected"]["method"] = "blda"
    single = summarise_compare(report)
    assert single["auto"] == {"blda": {"tau": 0.4, "criterion": "entropy", "miou": None}}


def test_bench_table_has_a_column_per_case_and_a_row_per_method():
    summary = summarise_compare(_report())
    results = {
        name: {"plain_src": 80.0, "plain_val": 51.0, "summary": summary} for name in ("a", "b")
    }
    lines = bench_table(results).splitlines()
    assert lines[0].split("|")[2].strip() == "a" and lines[0].split("|")[3].strip() == "b"
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[2:]}
    assert cells["blda"] == "53.0 (τ 0.2)"
    assert cells["blda, τ 0.2 fixed"] == "53.0"
    assert cells["vector-scaling"] == "57.0"
    assert cells["blda, τ auto"] == "55.5 (τ 0.31)"
    assert cells["**selected by compare**"] == "57.0 (vector-scaling)"
    assert cells["best row (oracle)"] == "58.0 (blda, τ 0.5)"
    assert cells["plain, all target val"] == "51.0"


def test_bench_table_marks_a_selected_tau_auto_row():
    report = _report()
    report["selected"] = {"method": "blda", "tau": 0.31, "auto": True, "miou": 55.5}
    results = {"a": {"plain_src": 80.0, "plain_val": 51.0, "summary": summarise_compare(report)}}
    lines = bench_table(results).splitlines()
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[2:]}
    assert cells["**selected by compare**"] == "55.5 (blda, τ auto 0.31)"
