"""Benchmark the post-hoc corrections with `blda compare` on synthetic UDA cases.

Each case is a model of its own (width, training length, seed; one self-trained on unlabelled
target scenes with pseudo-labels, as DAFormer-style UDA models are) on the same synthetic street
scenes (a data seed of their own). Everything is built with the real commands and cached under
``--workdir``, so a rerun only runs `compare` again:

    .venv/bin/python scripts/bench_methods.py                 # build what is missing, compare
    .venv/bin/python scripts/bench_methods.py --build-only    # cases only (no compare)

The demo (``blda demo``'s data and shipped network, statistics as in the quickstart) is a fifth
case unless ``--no-demo``.

Prints one table, method × case, of held-out mIoU: every method at the strength chosen on the
``--select-on`` images, what ``--tau auto`` chose, compare's selection and the best held-out row;
then the label-free default's checks (docs/methods.md, "How the label-free default is chosen"):
every method at its default strength against ``none - 2`` (PASS/FAIL per case), each
``--tau auto`` rule against ``none`` and the best fixed τ of its method, the leave-one-case-out
choice of the default (max-min gain over ``none`` on the other cases), each method's default τ by
the same rule (with its leave-one-out), every fixed row's regret (largest shortfall to a case's
best row) and the default's gain per case (with its 95 % bootstrap interval). Writes it all to
WORKDIR/results.md and, with every figure, WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from blda_posthoc.core.methods import DEFAULT_TAUS, METHODS
from blda_posthoc.demo.cases import (
    DEFAULT_CASES,
    BenchData,
    CaseFiles,
    bench_table,
    build_case,
    command_has_option,
    run_compare,
    summarise_compare,
)
from blda_posthoc.demo.data import DEFAULT_COUNT, DEFAULT_SEED, write_domain
from blda_posthoc.demo.run import CHECKPOINT, MODEL, Runner
from blda_posthoc.demo.synthesize import DEMO_CLASSES, DOMAINS
from blda_posthoc.pipelines.corrections import LABEL_FREE_DEFAULTS

Key = tuple[str, Any, bool]
"""A candidate row: ``(method, tau, auto)``."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-methods"))
    names = ",".join(c.name for c in DEFAULT_CASES)
    parser.add_argument("--cases", default=names, help=f"comma-separated subset of {names}")
    parser.add_argument("--select-on", default="10", help="compare --select-on (images)")
    parser.add_argument("--seed", type=int, default=0, help="compare --seed")
    parser.add_argument("--tau", default=None, help="compare --tau grid [default: its own]")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="compare --methods [default: every method, also those compare leaves out of its "
        "default grid: the rule of docs/methods.md scores every label-free candidate]",
    )
    parser.add_argument("--device", default="auto", help="--device of every command")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--plot", action="store_true", help="compare --plot per case")
    parser.add_argument("--refit", action="store_true", help="fit statistics again")
    parser.add_argument("--build-only", action="store_true", help="build the cases, no compare")
    parser.add_argument("--no-demo", action="store_true", help="leave the demo case out")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep a case's compare.json when it is newer than its statistics (score only)",
    )
    return parser.parse_args()


def build_demo(workdir: Path, device: str, refit: bool, log: Any) -> CaseFiles:
    """The demo as a case: its data and shipped network, statistics as in the quickstart.

    The demo fits the target statistics on the images it evaluates (``tgt.h5``, pseudo-labels,
    no target label read), as ``blda demo`` does; ``compare`` then sets 10 images aside.
    """
    folder = (workdir / "cases" / "demo").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if not (data / "done.json").is_file():
        for domain in DOMAINS:
            write_domain(data, domain, DEFAULT_COUNT, DEFAULT_SEED)
        (data / "done.json").write_text(json.dumps({"count": DEFAULT_COUNT}) + "\n")
    files = CaseFiles(
        folder=folder,
        model=CHECKPOINT,
        stores={"src": folder / "src.h5", "tgt_train": folder / "tgt.h5",
                "tgt_val": folder / "tgt.h5"},
        stats={"src": folder / "src_stats.h5", "tgt": folder / "tgt_stats.h5"},
        plain={"val": folder / "plain_val.json", "src": folder / "plain_src.json"},
    )  # fmt: skip
    run = Runner(folder, device)
    names = ",".join(DEMO_CLASSES)
    for domain, key in (("source", "src"), ("target", "tgt_train")):
        if not files.stores[key].is_file():
            run("dump-logits", "--model", MODEL, "--checkpoint", CHECKPOINT,
                "--images", data / domain / "images", "--labels", data / domain / "labels",
                "--class-names", names, "--out", files.stores[key], device=True)  # fmt: skip
    steps: list[tuple[Path, list[Any]]] = [
        (files.stats["src"], ["fit-stats", files.stores["src"], "--label-source", "gt",
                              "--out", files.stats["src"]]),
        (files.stats["tgt"], ["fit-stats", files.stores["tgt_val"], "--label-source", "pseudo",
                              "--calibration", files.stats["src"], "--out", files.stats["tgt"]]),
        (files.plain["val"], ["evaluate", files.stores["tgt_val"], "--json", files.plain["val"]]),
        (files.plain["src"], ["evaluate", files.stores["src"], "--json", files.plain["src"]]),
    ]  # fmt: skip
    for out, args in steps:
        if refit or not out.is_file():
            run(*args, "--overwrite", device=True)
    log("case demo ready")
    return files


def gains(report: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    """Held-out mIoU gain over ``none`` of every row (and its ``gain_ci95`` when reported).

    Rows of methods this release no longer has (a kept report of an earlier one) are left out.
    """
    rows = report["rows"]
    none = next(r for r in rows if r["method"] == "none")["miou"]
    out: dict[Key, dict[str, Any]] = {}
    for r in rows:
        if r["method"] == "none" or r["miou"] is None or r["method"] not in METHODS:
            continue
        key = (r["method"], r["tau"], bool(r.get("auto", False)))
        out[key] = {"gain": r["miou"] - none, "ci95": r.get("gain_ci95")}
    return out


def row_name(key: Key) -> str:
    """``method τ 0.5``, ``method τ auto`` or ``method``."""
    method, tau, auto = key
    if auto:
        return f"{method} τ auto"
    return method if tau is None else f"{method} τ {tau:g}"


def max_min(cases: dict[str, dict[Key, dict[str, Any]]], names: list[str]) -> Key:
    """The candidate with the best worst-case gain over ``names`` (docs/methods.md's rule).

    Ties within 0.1 point go to the larger mean gain, then to the smaller τ.
    """
    common = set.intersection(*(set(cases[n]) for n in names))

    def worst(key: Key) -> float:
        return min(cases[n][key]["gain"] for n in names)

    def mean(key: Key) -> float:
        return sum(cases[n][key]["gain"] for n in names) / len(names)

    top = max(worst(k) for k in common)
    close = [k for k in common if worst(k) >= top - 0.1]
    return sorted(close, key=lambda k: (-mean(k), k[1] if k[1] is not None else 0, k[0]))[0]


def default_key(case: dict[Key, dict[str, Any]]) -> Key:
    """The row of the label-free default the files of a case support (first one compare has)."""
    for method, tau in LABEL_FREE_DEFAULTS:
        key = (method, tau, False)
        if key in case:
            return key
    raise KeyError("no default row in this compare report")


def checks(cases: dict[str, dict[Key, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The default's checks as Markdown, and their figures (see the module docstring)."""
    names = list(cases)
    lines: list[str] = []
    figures: dict[str, Any] = {}

    def table(head: list[str], rows: list[list[str]]) -> None:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in rows)
        lines.append("")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1f}"

    # every method at its default strength >= none - 2
    lines.append("### Every method at its default strength vs `none` − 2 (gain, PASS/FAIL)\n")
    methods = sorted({k[0] for c in cases.values() for k in c})
    rows, safety = [], {}
    for method in methods:
        tau = DEFAULT_TAUS.get(method)
        key = (method, tau, False)
        cells = []
        for n in names:
            entry = cases[n].get(key)
            if entry is None:
                cells.append("-")
                continue
            ok = entry["gain"] >= -2
            safety[f"{method}/{n}"] = ok
            cells.append(f"{fmt(entry['gain'])} {'PASS' if ok else 'FAIL'}")
        rows.append([row_name(key), *cells])
    table(["method (default τ)", *names], rows)
    figures["default_strength_check"] = safety

    # --tau auto: >= none and >= best fixed tau of the method - 1
    lines.append("### `--tau auto`: gain, and the gap to the best fixed τ of the method\n")
    rows, auto_ok = [], {}
    for method in sorted({k[0] for c in cases.values() for k in c if k[2]}):
        cells = []
        for n in names:
            auto = cases[n].get((method, None, True)) or next(
                (v for k, v in cases[n].items() if k[0] == method and k[2]), None
            )
            fixed = [v["gain"] for k, v in cases[n].items() if k[0] == method and not k[2]]
            if auto is None or not fixed:
                cells.append("-")
                continue
            gap = auto["gain"] - max(fixed)
            ok = auto["gain"] >= 0 and gap >= -1
            auto_ok[f"{method}/{n}"] = ok
            cells.append(f"{fmt(auto['gain'])} ({gap:+.1f}) {'PASS' if ok else 'FAIL'}")
        rows.append([f"{method} τ auto", *cells])
    table(["rule", *names], rows)
    figures["tau_auto_check"] = auto_ok

    # leave one case out
    lines.append("### Leave-one-case-out choice of the default (max-min gain on the others)\n")
    rows, loco = [], {}
    for held in names if len(names) > 1 else []:
        others = [n for n in names if n != held]
        chosen = max_min(cases, others)
        gain = cases[held][chosen]["gain"]
        worst = min(cases[n][chosen]["gain"] for n in others)
        loco[held] = {"chosen": row_name(chosen), "held_out_gain": round(gain, 2),
                      "worst_on_others": round(worst, 2)}  # fmt: skip
        rows.append([held, row_name(chosen), fmt(worst), fmt(gain)])
    table(["held-out case", "chosen on the others", "worst gain on the others",
           "gain on the held-out case"], rows)  # fmt: skip
    everywhere = max_min(cases, names)
    worst_all = min(cases[n][everywhere]["gain"] for n in names)
    lines.append(
        f"On all {len(names)} cases the rule picks **{row_name(everywhere)}** "
        f"(worst gain {worst_all:+.1f}).\n"
    )
    figures["leave_one_case_out"] = loco
    figures["rule_on_all_cases"] = row_name(everywhere)

    strength_text, figures["strength_rule"] = strength_rule(cases)
    lines.append(strength_text)
    regret_text, figures["regret"] = regrets(cases)
    lines.append(regret_text)

    # the default now
    lines.append("### The default now, against the best label-free fixed row\n")
    acceptance: dict[str, Any] = {}
    rows = []
    for n in names:
        key = default_key(cases[n])
        entry = cases[n][key]
        candidates = {k: v for k, v in cases[n].items() if not k[2]}
        best = max(candidates, key=lambda k: candidates[k]["gain"])
        best_gain = candidates[best]["gain"]
        within = entry["gain"] >= best_gain - 0.5
        plus2 = best_gain < 2 or entry["gain"] >= 2
        acceptance[n] = {"default": row_name(key), "gain": round(entry["gain"], 2),
                         "ci95": entry["ci95"], "best": row_name(best),
                         "best_gain": round(best_gain, 2), "within_0.5": within,
                         "none_plus_2": plus2}  # fmt: skip
        ci = entry["ci95"]
        ci_text = "-" if not ci else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"
        rows.append([n, row_name(key), fmt(entry["gain"]), ci_text, row_name(best), fmt(best_gain),
                     "yes" if within else "NO", "yes" if plus2 else "NO"])  # fmt: skip
    table(["case", "default", "gain", "95 % CI", "best fixed row", "its gain",
           "within 0.5", ">= none + 2 where reachable"], rows)  # fmt: skip
    if not any(v["ci95"] for v in acceptance.values()):
        lines.append("(compare reports no `gain_ci95` in this version: point gains only.)\n")
    figures["default"] = acceptance
    return "\n".join(lines), figures


def fixed_rows(cases: dict[str, dict[Key, dict[str, Any]]]) -> list[Key]:
    """The fixed rows every case has (``--tau auto`` and τ 0 left out)."""
    common = set.intersection(*(set(c) for c in cases.values()))
    return sorted((k for k in common if not k[2] and k[1] != 0), key=lambda k: (k[0], k[1] or 0))


def strength_rule(cases: dict[str, dict[Key, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Each method's default τ by docs/methods.md's second-round rule, and its leave-one-out.

    Per method with a strength (``blda`` keeps the paper's 0.2): the grid τ with the best worst
    gain over the cases, ties within 0.1 to the larger mean, then the smaller τ.
    """
    names = list(cases)
    lines = ["### Each method's default τ by the rule (max-min over the cases)\n"]
    head = "| method | default now | rule's τ | worst | mean | leave-one-out: τ → held-out gain |"
    lines.append(head)
    lines.append("|---|---|---|---|---|---|")
    out: dict[str, Any] = {}
    rows = fixed_rows(cases)
    for method in sorted({k[0] for k in rows if k[1] is not None and k[0] != "blda"}):
        own = {n: {k: v for k, v in cases[n].items() if k in rows and k[0] == method}
               for n in names}  # fmt: skip
        chosen = max_min(own, names)
        worst = min(own[n][chosen]["gain"] for n in names)
        mean = sum(own[n][chosen]["gain"] for n in names) / len(names)
        folds = {}
        for held in names if len(names) > 1 else []:
            pick = max_min(own, [n for n in names if n != held])
            folds[held] = {"tau": pick[1], "held_out_gain": round(own[held][pick]["gain"], 2)}
        loco = ", ".join(f"{n}: {f['tau']:g} → {f['held_out_gain']:+.1f}" for n, f in folds.items())
        now = DEFAULT_TAUS.get(method)
        out[method] = {"default_now": now, "rule_tau": chosen[1], "worst": round(worst, 2),
                       "mean": round(mean, 2), "leave_one_out": folds}  # fmt: skip
        flag = "" if now == chosen[1] else " (differs)"
        now_text = "-" if now is None else f"{now:g}"
        lines.append(f"| {method} | {now_text} | {chosen[1]:g}{flag} | {worst:+.1f} | {mean:+.1f} "
                     f"| {loco} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines), out


def regrets(cases: dict[str, dict[Key, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Every fixed row's largest shortfall to the best fixed row of each case.

    A fixed default can be within 0.5 mIoU of the best label-free row on every case only if
    some row's regret is at most 0.5.
    """
    names = list(cases)
    rows = fixed_rows(cases)
    best = {n: max(cases[n][k]["gain"] for k in rows) for n in names}
    regret = {k: max(best[n] - cases[n][k]["gain"] for n in names) for k in rows}
    ranked = sorted(rows, key=lambda k: regret[k])[:10]
    lines = ["### Regret: each row's largest shortfall to the best fixed row of a case\n"]
    heads = " | ".join(f"{n} (best {best[n]:+.1f})" for n in names)
    lines.append(f"| row | regret | {heads} |")
    lines.append("|---|---|" + "---|" * len(names))
    for k in ranked:
        cells = " | ".join(f"{cases[n][k]['gain'] - best[n]:+.1f}" for n in names)
        lines.append(f"| {row_name(k)} | {regret[k]:.1f} | {cells} |")
    top = ranked[0]
    verdict = "meets" if regret[top] <= 0.5 else "no fixed row meets"
    lines.append(f"\nSmallest regret: {row_name(top)} ({regret[top]:.1f}); {verdict} "
                 "'within 0.5 of the best label-free row on every case'.\n")  # fmt: skip
    out = {row_name(k): round(regret[k], 2) for k in ranked}
    return "\n".join(lines), {"smallest": row_name(top), "rows": out}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
    known = {c.name: c for c in DEFAULT_CASES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    data = BenchData()
    start = time.perf_counter()
    built = {}
    for name in wanted:
        case_start = time.perf_counter()
        built[name] = build_case(
            args.workdir, known[name], data, device=args.device, refit=args.refit, log=log
        )
        log(f"case {name} ready in {time.perf_counter() - case_start:.0f} s")
    build_seconds = time.perf_counter() - start
    if not args.no_demo:
        built["demo"] = build_demo(args.workdir, args.device, args.refit, log)
    log(f"all cases ready in {build_seconds:.0f} s")
    if args.build_only:
        for name, files in built.items():
            print(f"{name}: plain mIoU target val {files.plain_miou('val'):.1f}, "
                  f"source {files.plain_miou('src'):.1f}")  # fmt: skip
        return
    if not command_has_option("compare", "--select-on"):
        raise SystemExit("error: this blda has no `compare --select-on`; use --build-only")
    results: dict[str, dict[str, Any]] = {}
    compare_start = time.perf_counter()
    for name, files in built.items():
        case_start = time.perf_counter()
        cached = files.folder / "compare.json"
        if (
            args.reuse
            and cached.is_file()
            and all(cached.stat().st_mtime > files.stats[k].stat().st_mtime for k in ("src", "tgt"))
        ):
            report_path = cached
        else:
            report_path = run_compare(
                files,
                select_on=args.select_on,
                seed=args.seed,
                taus=args.tau,
                methods=args.methods,
                device=args.device,
                plot=args.plot,
            )
        report = json.loads(report_path.read_text())
        results[name] = {
            "note": known[name].note if name in known else "blda demo: shipped network",
            "plain_src": files.plain_miou("src"),
            "plain_val": files.plain_miou("val"),
            "summary": summarise_compare(report),
            "compare_seconds": round(time.perf_counter() - case_start, 1),
            "compare": str(report_path),
        }
    compare_seconds = time.perf_counter() - compare_start
    table = bench_table(results)
    reports = {n: json.loads(Path(r["compare"]).read_text()) for n, r in results.items()}
    check_text, check_figures = checks({n: gains(rep) for n, rep in reports.items()})
    notes = "\n".join(f"- `{n}`: {r['note']}" for n, r in results.items())
    markdown = (
        f"# blda compare on {len(results)} synthetic UDA cases\n\n"
        f"Held-out target mIoU (%): strengths and the selection are chosen on "
        f"{args.select_on} validation images (seed {args.seed}), figures come from the other "
        f"images; `plain` rows use every image of their set.\n\n{notes}\n\n{table}\n"
        f"{check_text}\n"
        f"Build {build_seconds:.0f} s (cached parts skipped), compare {compare_seconds:.0f} s.\n"
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.md").write_text(markdown)
    payload = {
        "data": asdict(data),
        "select_on": args.select_on,
        "seed": args.seed,
        "cases": results,
        "checks": check_figures,
        "seconds": {"build": round(build_seconds, 1), "compare": round(compare_seconds, 1)},
    }
    (args.workdir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(table, end="")
    print(check_text)
    print(f"wrote {args.workdir / 'results.md'} and {args.workdir / 'results.json'}")


if __name__ == "__main__":
    main()
