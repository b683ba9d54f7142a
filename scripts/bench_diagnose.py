"""How often do ``blda diagnose``'s label-free verdicts match the labelled ones?

For every case folder given (holding a labelled target store, its target statistics and the
source statistics), runs ``blda diagnose`` twice on the labelled store, with the score alone and
with ``--anchors`` (score and EM-estimated ratio must agree), and counts per class whether the
label-free verdict equals the labelled one (pred/true ratio), or says ``uncertain``.

    .venv/bin/python scripts/bench_diagnose.py CASE_DIR... [--store tgt_val.h5]
        [--stats tgt_stats.h5] [--anchors src_stats.h5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def verdicts(case: Path, args: argparse.Namespace, with_anchors: bool) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "d.json"
        command = [
            sys.executable,
            "-m",
            "blda_posthoc",
            "diagnose",
            str(case / args.store),
            "--stats",
            str(case / args.stats),
            "--json",
            str(out),
        ]
        if with_anchors:
            command += ["--anchors", str(case / args.anchors)]
        subprocess.run(command, check=True, capture_output=True)
        report = json.loads(out.read_text())
    return [(c["verdict"], c["label_free_verdict"]) for c in report["per_class"].values()]


def tally(pairs: list[tuple[str, str]]) -> tuple[int, int, int]:
    decided = [(truth, guess) for truth, guess in pairs if guess not in ("uncertain", "unknown")]
    right = sum(truth == guess for truth, guess in decided)
    return right, len(decided), len(pairs) - len(decided)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--store", default="tgt_val.h5")
    parser.add_argument("--stats", default="tgt_stats.h5")
    parser.add_argument("--anchors", default="src_stats.h5")
    args = parser.parse_args()
    rows = []
    totals = {False: [0, 0, 0], True: [0, 0, 0]}
    for case in args.cases:
        row = [case.name]
        for with_anchors in (False, True):
            right, decided, uncertain = tally(verdicts(case, args, with_anchors))
            for k, v in enumerate((right, decided, uncertain)):
                totals[with_anchors][k] += v
            row.append(f"{right}/{decided} right, {uncertain} uncertain")
        rows.append(row)
    rows.append(
        ["all"] + [f"{t[0]}/{t[1]} right, {t[2]} uncertain" for t in (totals[False], totals[True])]
    )
    print("| case | score alone | score and EM ratio agree (--anchors) |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
