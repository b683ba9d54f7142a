"""Benchmark the post-hoc corrections with `blda compare` on synthetic UDA cases.

Each case is a model of its own (width, training length, seed; one self-trained on unlabelled
target scenes with pseudo-labels, as DAFormer-style UDA models are) on the same synthetic street
scenes (a data seed of their own). Everything is built with the real commands and cached under
``--workdir``, so a rerun only runs `compare` again:

    .venv/bin/python scripts/bench_methods.py                 # build what is missing, compare
    .venv/bin/python scripts/bench_methods.py --build-only    # cases only (no compare)

Prints one table, method × case, of held-out mIoU: every method at the strength chosen on the
``--select-on`` images, what ``--tau auto`` chose, compare's selection and the best held-out row;
writes it to WORKDIR/results.md and, with every figure, WORKDIR/results.json.
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

from blda_posthoc.demo.cases import (
    DEFAULT_CASES,
    BenchData,
    bench_table,
    build_case,
    command_has_option,
    run_compare,
    summarise_compare,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-methods"))
    names = ",".join(c.name for c in DEFAULT_CASES)
    parser.add_argument("--cases", default=names, help=f"comma-separated subset of {names}")
    parser.add_argument("--select-on", default="10", help="compare --select-on (images)")
    parser.add_argument("--seed", type=int, default=0, help="compare --seed")
    parser.add_argument("--tau", default=None, help="compare --tau grid [default: its own]")
    parser.add_argument("--methods", default=None, help="compare --methods [default: all]")
    parser.add_argument("--device", default="auto", help="--device of every command")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--plot", action="store_true", help="compare --plot per case")
    parser.add_argument("--refit", action="store_true", help="fit statistics again")
    parser.add_argument("--build-only", action="store_true", help="build the cases, no compare")
    return parser.parse_args()


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
            "note": known[name].note,
            "plain_src": files.plain_miou("src"),
            "plain_val": files.plain_miou("val"),
            "summary": summarise_compare(report),
            "compare_seconds": round(time.perf_counter() - case_start, 1),
            "compare": str(report_path),
        }
    compare_seconds = time.perf_counter() - compare_start
    table = bench_table(results)
    notes = "\n".join(f"- `{n}`: {r['note']}" for n, r in results.items())
    markdown = (
        f"# blda compare on {len(results)} synthetic UDA cases\n\n"
        f"Held-out target mIoU (%): strengths and the selection are chosen on "
        f"{args.select_on} validation images (seed {args.seed}), figures come from the other "
        f"images; `plain` rows use every image of their set.\n\n{notes}\n\n{table}\n"
        f"Build {build_seconds:.0f} s (cached parts skipped), compare {compare_seconds:.0f} s.\n"
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.md").write_text(markdown)
    payload = {
        "data": asdict(data),
        "select_on": args.select_on,
        "seed": args.seed,
        "cases": results,
        "seconds": {"build": round(build_seconds, 1), "compare": round(compare_seconds, 1)},
    }
    (args.workdir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(table, end="")
    print(f"wrote {args.workdir / 'results.md'} and {args.workdir / 'results.json'}")


if __name__ == "__main__":
    main()
