"""Synthetic UDA cases for benchmarking corrections: data, models, logits stores, statistics.

A *case* is one frozen model on one synthetic source → target shift, prepared the way a user
prepares a real one, with the real ``blda`` commands:

* data (shared by all cases of one :class:`BenchData`): labelled source scenes, a larger set
  of unlabelled target scenes (for target statistics and self-training), and a labelled target
  validation set (for ``blda compare``), all from a data seed of their own;
* a model: :class:`~blda_posthoc.demo.net.DemoSegNet` trained on the source scenes
  (:class:`~blda_posthoc.demo.train.SourceTraining`: width, steps, seed), optionally then
  self-trained on the unlabelled target scenes with pseudo-labels
  (:class:`~blda_posthoc.demo.train.SelfTraining`), as DAFormer-style UDA models are;
* ``blda dump-logits`` → ``src.h5``, ``tgt_train.h5``, ``tgt_val.h5``; ``blda fit-stats`` →
  ``src_stats.h5`` (source ground truth) and ``tgt_stats.h5`` (target pseudo-labels; also of
  the logits calibrated by ``src_stats.h5`` where ``fit-stats`` takes ``--calibration``);
  ``blda evaluate`` → ``plain_val.json`` and ``plain_src.json`` (the plain argmax).

Everything is cached under a work folder; a change reruns only what depends on it::

    WORKDIR/data/seed<S>-<H>x<W>/source-<N>/{images,labels}/      one folder per scene set
                                target_train-<N>/images/          (unlabelled)
                                target_val-<N>/{images,labels}/
    WORKDIR/models/<settings>-<digest>.pt   pickled networks (dump-logits takes them as they are)
    WORKDIR/cases/<name>/                   stores, statistics, reports, commands.log, and
                                            case.json (the finished steps)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.demo.data import scene_name
from blda_posthoc.demo.net import DemoSegNet
from blda_posthoc.demo.run import Runner
from blda_posthoc.demo.synthesize import DEFAULT_SIZE, DEMO_CLASSES, render_indexed
from blda_posthoc.demo.train import SelfTraining, SourceTraining, self_train, train_source
from blda_posthoc.io.images import IMAGE_EXTENSIONS, find_files, read_label, read_rgb, write_png
from blda_posthoc.io.stats import VERSION as stats_version
from blda_posthoc.io.store import VERSION as store_version

Log = Callable[[str], None]
"""Receives one progress line (e.g. ``print``)."""

DATA_SEED = 2025
"""Seed of the benchmark scenes: the demo's data use 0 and the shipped model's training 1000."""

VAL_OFFSET = 1_000_000
"""Validation scenes are target scenes ``VAL_OFFSET + i``: never among the training scenes."""

MODEL_FACTORY = "blda_posthoc.demo.net:DemoSegNet"
"""``dump-logits --model``; the checkpoint holds the whole network, so any width loads."""

FORMAT_VERSION = 1
"""Version of the cache layout; a change retrains every model."""


@dataclass(frozen=True)
class BenchData:
    """The scenes of a benchmark (shared by its cases).

    Attributes:
        seed: Data seed.
        size: ``(H, W)`` of a scene.
        source: Labelled source scenes (model training and source statistics).
        target_train: Unlabelled target scenes (target statistics, self-training).
        target_val: Labelled target scenes (``compare``).
    """

    seed: int = DATA_SEED
    size: tuple[int, int] = DEFAULT_SIZE
    source: int = 300
    target_train: int = 300
    target_val: int = 100

    @property
    def key(self) -> str:
        """Folder name of the scenes of this seed and size."""
        h, w = self.size
        return f"seed{self.seed}-{h}x{w}"


SETS = ("source", "target_train", "target_val")
"""The three scene sets; only ``target_train`` is written without labels."""


@dataclass(frozen=True)
class SceneSet:
    """One set of rendered scenes: ``images/`` and (except unlabelled ones) ``labels/``."""

    root: Path
    labelled: bool

    @property
    def images(self) -> Path:
        """The images folder."""
        return self.root / "images"

    @property
    def labels(self) -> Path | None:
        """The labels folder, or None for an unlabelled set."""
        return self.root / "labels" if self.labelled else None


@dataclass(frozen=True)
class Case:
    """One benchmark case: a model trained on the source, optionally self-trained on the target.

    Attributes:
        name: Short name (a folder name, a table column).
        source: Source-only training settings.
        self_training: Self-training settings applied to the source model, or None.
        note: One line for the report (what makes the case differ).
    """

    name: str
    source: SourceTraining
    self_training: SelfTraining | None = None
    note: str = ""


DEFAULT_CASES: tuple[Case, ...] = (
    Case("w8", SourceTraining(width=8, iters=600, seed=11), note="narrow"),
    Case(
        "w16",
        SourceTraining(width=16, iters=800, seed=12),
        note="the demo's width, longer training",
    ),
    Case("w24-long", SourceTraining(width=24, iters=1000, seed=13), note="wide, long training"),
    Case(
        "w16-selftrained",
        SourceTraining(width=16, iters=800, seed=12),
        SelfTraining(iters=800, seed=14, threshold=0.9, class_balanced=True),
        note="w16 self-trained on target pseudo-labels (mean teacher, class-balanced)",
    ),
)
"""The benchmark's cases: three source-only models that differ in width, steps and seed, and
one self-trained on unlabelled target scenes."""


@dataclass
class CaseFiles:
    """What :func:`build_case` leaves in a case folder (paths are absolute).

    Attributes:
        folder: The case folder.
        model: The network file.
        stores: ``{"src", "tgt_train", "tgt_val"}`` → logits store.
        stats: ``{"src", "tgt"}`` → statistics file.
        plain: ``{"val", "src"}`` → ``evaluate`` JSON of the plain argmax.
        seconds: Seconds spent per step in this call (cached steps are absent).
    """

    folder: Path
    model: Path
    stores: dict[str, Path]
    stats: dict[str, Path]
    plain: dict[str, Path]
    seconds: dict[str, float] = field(default_factory=dict)

    def plain_miou(self, which: str = "val") -> float:
        """The mIoU (%) of the plain argmax on ``which`` (``val``: target validation, ``src``)."""
        return float(json.loads(self.plain[which].read_text())["miou"])


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def write_data(workdir: Path, data: BenchData, *, log: Log | None = None) -> dict[str, SceneSet]:
    """Render the scene sets of ``data`` under ``workdir/data/<key>/<set>-<count>``.

    A set already there is kept (a ``done.json`` written last marks it complete), so sets of
    other sizes are rendered on their own: a larger validation set does not touch the others.
    Scenes are named ``scene_0000``... within each set; validation scenes are target scenes
    ``VAL_OFFSET + i``, disjoint from the unlabelled ones.

    Args:
        workdir: Benchmark work folder.
        data: What to render.
        log: Receives one line per set rendered.

    Returns:
        ``{"source", "target_train", "target_val"}`` → the set's folders.
    """
    plan = {
        "source": ("source", 0, data.source),
        "target_train": ("target", 0, data.target_train),
        "target_val": ("target", VAL_OFFSET, data.target_val),
    }
    sets: dict[str, SceneSet] = {}
    for name, (domain, offset, count) in plan.items():
        scenes = SceneSet(workdir / "data" / data.key / f"{name}-{count}", name != "target_train")
        sets[name] = scenes
        marker = scenes.root / "done.json"
        if marker.is_file():
            continue
        start = time.perf_counter()
        for local in range(count):
            image, label = render_indexed(data.seed, domain, offset + local, data.size)
            write_png(scenes.images / f"{scene_name(local)}.png", image)
            if scenes.labels is not None:
                write_png(scenes.labels / f"{scene_name(local)}.png", label)
        marker.write_text(json.dumps({"domain": domain, "offset": offset, "count": count}) + "\n")
        if log is not None:
            log(f"rendered {count} {name} scenes in {time.perf_counter() - start:.1f} s")
    return sets


def read_images(folder: Path) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 RGB of every image in ``folder``, in name order."""
    return np.stack([read_rgb(p) for p in find_files(folder, IMAGE_EXTENSIONS).values()])


def read_labels(folder: Path) -> np.ndarray:
    """``(N, H, W)`` uint8 trainIds of every PNG in ``folder``, in name order."""
    return np.stack([read_label(p) for p in find_files(folder, (".png",)).values()])


def save_network(model: torch.nn.Module, path: Path, *, whole_module: bool = True) -> None:
    """Save a network atomically: the whole pickled module, or only its state dict.

    A whole module is what ``dump-logits --model blda_posthoc.demo.net:DemoSegNet
    --checkpoint PATH`` uses as is (any width); a state dict is what ``net.build`` loads.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    model = model.eval()
    if whole_module:
        torch.save(model, tmp)
    else:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)


def load_network(path: Path, *, width: int = 16) -> DemoSegNet:
    """Load a network saved by :func:`save_network` (a state dict needs the right ``width``)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, DemoSegNet):
        return obj.eval()
    if isinstance(obj, dict):
        model = DemoSegNet(len(DEMO_CLASSES), width=width)
        model.load_state_dict(obj)
        return model.eval()
    raise ValueError(f"{path}: neither a DemoSegNet nor a state dict ({type(obj).__name__})")


def model_key(data: BenchData, source: SourceTraining, self_training: SelfTraining | None) -> str:
    """File stem of a cached model: readable settings and a digest of what it was trained on."""
    stem = f"w{source.width}-i{source.iters}-s{source.seed}"
    scenes = {"seed": data.seed, "size": list(data.size), "source": data.source}
    tuned = None
    if self_training is not None:
        stem += f"-st{self_training.iters}-s{self_training.seed}"
        scenes["target_train"] = data.target_train
        tuned = asdict(self_training)
    return f"{stem}-{_digest([FORMAT_VERSION, scenes, asdict(source), tuned])}"


def build_model(
    workdir: Path,
    data: BenchData,
    source: SourceTraining,
    self_training: SelfTraining | None = None,
    *,
    log: Log | None = None,
) -> Path:
    """Train (or find in the cache) the network of a case.

    The source model is trained on the labelled source scenes; a self-trained model starts
    from the (cached) source model with the same settings and also sees the unlabelled target
    scenes (never the target labels).

    Args:
        workdir: Benchmark work folder.
        data: The scenes (rendered first when missing).
        source: Source training settings.
        self_training: Self-training settings, or None for the source-only model.
        log: Receives progress lines.

    Returns:
        The saved network (a whole pickled module).
    """
    path = workdir / "models" / f"{model_key(data, source, self_training)}.pt"
    if path.is_file():
        return path
    sets = write_data(workdir, data, log=log)
    labels_dir = sets["source"].labels
    assert labels_dir is not None
    images, labels = read_images(sets["source"].images), read_labels(labels_dir)
    start = time.perf_counter()
    if self_training is None:
        model = train_source(images, labels, len(DEMO_CLASSES), source, log=log)
    else:
        parent = load_network(build_model(workdir, data, source, None, log=log))
        target = read_images(sets["target_train"].images)
        model = self_train(parent, images, labels, target, self_training, log=log)
    save_network(model, path)
    if log is not None:
        log(f"trained {path.name} in {time.perf_counter() - start:.0f} s")
    return path


def command_has_option(command: str, option: str) -> bool:
    """Whether ``blda COMMAND`` takes ``--OPTION`` (for steps that need newer commands)."""
    import click

    from blda_posthoc.cli import main

    cmd = main.get_command(click.Context(main), command)
    return cmd is not None and any(option in p.opts for p in cmd.params)


def case_steps(files: CaseFiles, sets: dict[str, SceneSet]) -> list[tuple[str, list[str | Path]]]:
    """The ``blda`` command lines that build a case, in order, as ``(step name, args)``."""
    names = ",".join(DEMO_CLASSES)
    steps: list[tuple[str, list[str | Path]]] = []
    for key, scenes in (
        ("src", sets["source"]),
        ("tgt_train", sets["target_train"]),
        ("tgt_val", sets["target_val"]),
    ):
        labels: list[str | Path] = [] if scenes.labels is None else ["--labels", scenes.labels]
        steps.append(
            (
                f"dump {key}",
                # Our own checkpoint, written by save_network above: a whole pickled module.
                ["dump-logits", "--model", MODEL_FACTORY, "--checkpoint", files.model,
                 "--trust-checkpoint",
                 "--images", scenes.images, *labels, "--class-names", names,
                 "--out", files.stores[key]],
            )
        )  # fmt: skip
    steps.append(
        (
            "stats src",
            ["fit-stats", files.stores["src"], "--label-source", "gt", "--out", files.stats["src"]],
        )
    )
    calibrate: list[str | Path] = []
    if command_has_option("fit-stats", "--calibration"):
        calibrate = ["--calibration", files.stats["src"]]
    steps.append(
        (
            "stats tgt",
            ["fit-stats", files.stores["tgt_train"], "--label-source", "pseudo", *calibrate,
             "--out", files.stats["tgt"]],
        )
    )  # fmt: skip
    for key, store in (("val", files.stores["tgt_val"]), ("src", files.stores["src"])):
        steps.append((f"plain {key}", ["evaluate", store, "--json", files.plain[key]]))
    return steps


def _step_ids(steps: list[tuple[str, list[str | Path]]], workdir: Path) -> list[str]:
    """One id per step, so that a change reruns the step and every step that reads its output.

    An id is the step's name and a digest of its arguments (the work folder replaced by a
    placeholder), the ids of the steps whose outputs it reads, and the file format versions.
    """
    produced: dict[str, str] = {}
    ids = []
    for name, args in steps:
        words = [str(a).replace(str(workdir), "WORKDIR") for a in args]
        inputs = sorted(produced[w] for w in words if w in produced)
        step_id = f"{name} {_digest([words, inputs, store_version, stats_version])}"
        ids.append(step_id)
        for flag in ("--out", "--json"):
            if flag in words:
                produced[words[words.index(flag) + 1]] = step_id
    return ids


def build_case(
    workdir: Path,
    case: Case,
    data: BenchData = BenchData(),
    *,
    device: str = "auto",
    refit: bool = False,
    log: Log | None = None,
) -> CaseFiles:
    """Prepare a case: data, model, logits stores, statistics and plain-argmax reports.

    Every step is a real ``blda`` command (logged in the case's ``commands.log``) and is
    skipped when an earlier call finished it with the same arguments, inputs and file format
    versions (``case.json`` lists the finished steps), so that changing one setting reruns
    only what depends on it.

    Args:
        workdir: Benchmark work folder.
        case: The case.
        data: The scenes.
        device: ``--device`` for the commands.
        refit: Fit the statistics and evaluate again even when done (the stores are kept).
        log: Receives progress lines.

    Returns:
        The case's files and the seconds each step took in this call.
    """
    workdir = workdir.resolve()
    sets = write_data(workdir, data, log=log)
    folder = workdir / "cases" / case.name
    files = CaseFiles(
        folder=folder,
        model=build_model(workdir, data, case.source, case.self_training, log=log),
        stores={k: folder / f"{k}.h5" for k in ("src", "tgt_train", "tgt_val")},
        stats={"src": folder / "src_stats.h5", "tgt": folder / "tgt_stats.h5"},
        plain={"val": folder / "plain_val.json", "src": folder / "plain_src.json"},
    )
    state_file = folder / "case.json"
    done: list[str] = []
    if state_file.is_file():
        done = list(json.loads(state_file.read_text()).get("done", []))
    if refit:
        done = [step for step in done if step.startswith("dump ")]
    folder.mkdir(parents=True, exist_ok=True)
    record = {"case": asdict(case), "data": asdict(data), "model": files.model.name}
    run = Runner(folder, device)
    steps = case_steps(files, sets)
    finished: list[str] = []
    for (name, args), step_id in zip(steps, _step_ids(steps, workdir), strict=True):
        if step_id not in done:
            start = time.perf_counter()
            run(*args, "--overwrite", device=True)
            files.seconds[name] = time.perf_counter() - start
        finished.append(step_id)
        state = {**record, "done": finished + [d for d in done if d not in finished]}
        state_file.write_text(json.dumps(state, indent=1) + "\n")
    return files


def run_compare(
    files: CaseFiles,
    *,
    select_on: str = "10",
    seed: int = 0,
    taus: str | None = None,
    methods: str | None = None,
    device: str = "auto",
    plot: bool = False,
) -> Path:
    """Run ``blda compare`` on the case's target validation store (``compare.json``).

    Target conditionals come from ``tgt_stats.h5`` (pseudo-labels), anchors, calibrations and
    source priors from ``src_stats.h5``; the choice is made on ``select_on`` images and every
    figure comes from the other validation images.

    Args:
        files: The case (see :func:`build_case`).
        select_on: ``--select-on``: a count of images or a fraction.
        seed: ``--seed`` of the selection draw.
        taus: ``--tau`` grid (comma-separated), or None for the command's default.
        methods: ``--methods``, or None for all.
        device: ``--device``.
        plot: Also write ``compare.png``.

    Returns:
        The JSON report.
    """
    out = files.folder / "compare.json"
    args: list[str | Path] = [
        "compare", files.stores["tgt_val"], "--stats", files.stats["tgt"],
        "--anchors", files.stats["src"], "--select-on", select_on, "--seed", str(seed),
        "--json", out, "--overwrite",
    ]  # fmt: skip
    if taus is not None:
        args += ["--tau", taus]
    if methods is not None:
        args += ["--methods", methods]
    if plot:
        args += ["--plot", files.folder / "compare.png"]
    Runner(files.folder, device)(*args, device=True)
    return out


def _row_key(row: dict[str, Any]) -> tuple[Any, Any, bool]:
    return row["method"], row["tau"], bool(row.get("auto", False))


def summarise_compare(report: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's view of one ``compare`` report.

    Args:
        report: A ``blda-compare`` JSON report made with ``--select-on``.

    Returns:
        ``{"methods": {method: {"tau", "miou", "selection_miou"}}`` (per method, the strength
        best on the selection images and its held-out mIoU), ``"auto": {method: {"tau",
        "criterion", "miou"}}`` (what ``--tau auto`` chose and, when ``compare`` reports its
        row, its held-out mIoU), ``"selected"`` (compare's choice), ``"best"`` (the row best on
        the held-out images: what a perfect choice would give), ``"none"`` (the plain argmax
        on the held-out images), ``"fixed"`` (held-out mIoU of every ``(method, tau)`` row).
    """
    rows = report["rows"]
    plain = [r for r in rows if not r.get("auto", False)]

    def selection_score(row: dict[str, Any]) -> float:
        value = row.get("selection_miou")
        return float(row["miou"] if value is None else value)

    methods: dict[str, dict[str, Any]] = {}
    for row in plain:
        held = methods.get(row["method"])
        if held is None or selection_score(row) > held["selection_miou"]:
            methods[row["method"]] = {
                "tau": row["tau"],
                "miou": row["miou"],
                "selection_miou": selection_score(row),
            }
    raw_auto = report.get("tau_auto") or {}
    if "tau" in raw_auto:  # one choice, for the default method
        raw_auto = {report["selected"].get("method", "blda"): raw_auto}
    auto_rows = {r["method"]: r for r in rows if r.get("auto", False)}
    auto = {
        method: {
            "tau": choice.get("tau"),
            "criterion": choice.get("criterion"),
            "miou": auto_rows[method]["miou"] if method in auto_rows else None,
        }
        for method, choice in raw_auto.items()
    }
    best = max(rows, key=lambda r: r["miou"])
    none = next(r for r in rows if r["method"] == "none")
    selected = report["selected"]
    return {
        "methods": methods,
        "auto": auto,
        "selected": {
            **{k: selected.get(k) for k in ("method", "tau", "miou")},
            "auto": bool(selected.get("auto", False)),
        },
        "best": {
            "method": best["method"],
            "tau": best["tau"],
            "auto": bool(best.get("auto", False)),
            "miou": best["miou"],
        },
        "none": none["miou"],
        "fixed": [{"method": r["method"], "tau": r["tau"], "miou": r["miou"]} for r in plain],
    }


def _tau(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def _cell(miou: Any, tau: Any = None, method: str | None = None, auto: bool = False) -> str:
    if miou is None:
        return "-"
    strength = None if tau is None else f"τ {'auto ' if auto else ''}{_tau(tau)}"
    parts = [p for p in (method, strength) if p]
    return f"{miou:.1f}" + (f" ({', '.join(parts)})" if parts else "")


def bench_table(
    results: dict[str, dict[str, Any]], fixed: tuple[tuple[str, float], ...] = (("blda", 0.2),)
) -> str:
    """Method × case Markdown table of held-out mIoU (%).

    Args:
        results: ``{case name: {"plain_val", "plain_src", "summary"}}`` where ``summary`` is
            :func:`summarise_compare`'s output.
        fixed: ``(method, tau)`` rows shown at that strength too (the default τ).

    Returns:
        The table: the plain argmax (source scenes, all validation scenes), each method at the
        strength chosen on the selection images, the ``fixed`` rows, each ``--tau auto``
        choice, ``compare``'s selection and the best row on the held-out images.
    """
    names = list(results)
    rows: list[list[str]] = [["", *names]]
    rows.append(["plain, source scenes", *(_cell(results[n]["plain_src"]) for n in names)])
    rows.append(["plain, all target val", *(_cell(results[n]["plain_val"]) for n in names)])
    methods: list[str] = []
    for n in names:
        methods += [m for m in results[n]["summary"]["methods"] if m not in methods]
    for method in methods:
        cells = []
        for n in names:
            entry = results[n]["summary"]["methods"].get(method)
            cells.append("-" if entry is None else _cell(entry["miou"], entry["tau"]))
        rows.append([method, *cells])
    for method, tau in fixed:
        cells = []
        for n in names:
            match = [
                r["miou"]
                for r in results[n]["summary"]["fixed"]
                if r["method"] == method and r["tau"] is not None and abs(r["tau"] - tau) < 1e-9
            ]
            cells.append(_cell(match[0]) if match else "-")
        rows.append([f"{method}, τ {tau:g} fixed", *cells])
    auto_methods: list[str] = []
    for n in names:
        auto_methods += [m for m in results[n]["summary"]["auto"] if m not in auto_methods]
    for method in auto_methods:
        cells = []
        for n in names:
            entry = results[n]["summary"]["auto"].get(method)
            cells.append(
                "-"
                if entry is None
                else _cell(entry["miou"], entry["tau"])
                if entry["miou"] is not None
                else f"τ {_tau(entry['tau'])}"
            )
        rows.append([f"{method}, τ auto", *cells])
    for key, title in (("selected", "**selected by compare**"), ("best", "best row (oracle)")):
        rows.append(
            [
                title,
                *(
                    _cell(
                        results[n]["summary"][key]["miou"],
                        results[n]["summary"][key]["tau"],
                        results[n]["summary"][key]["method"],
                        results[n]["summary"][key].get("auto", False),
                    )
                    for n in names
                ),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"
