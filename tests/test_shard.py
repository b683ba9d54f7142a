"""``--shard K/N`` on the commands that read stores: one folder, the same bytes as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner
from conftest import fitted_case

from blda_posthoc.cli import main
from blda_posthoc.io.store import LogitStore

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source and target stores (7 target images: shards of unequal size) with statistics."""
    return fitted_case(tmp_path_factory.mktemp("shard"), tgt_images=7)


def sub_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_all(commands: list[list[str]], envs: list[dict[str, str]] | None = None) -> None:
    """Start every command at once (the shards run side by side) and wait for all."""
    envs = envs or [sub_env() for _ in commands]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "blda_posthoc", *cmd],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd, env in zip(commands, envs, strict=True)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


def correct_args(case: dict[str, Path], out: Path) -> list[str]:
    return [
        "correct",
        str(case["tgt"]),
        "--stats",
        str(case["tgt_stats"]),
        "--anchors",
        str(case["src_stats"]),
        "--tau",
        "0.5",
        "--color",
        "--out-dir",
        str(out),
    ]


def relabel_args(case: dict[str, Path], out: Path) -> list[str]:
    return [
        "relabel",
        str(case["tgt"]),
        "--stats",
        str(case["tgt_stats"]),
        "--anchors",
        str(case["src_stats"]),
        "--tau",
        "0.5",
        "--min-confidence",
        "0.6",
        "--out-dir",
        str(out),
    ]


def test_shard_rule_is_every_nth_sorted_name(case: dict[str, Path]) -> None:
    with LogitStore([case["tgt"]]) as store:
        names = sorted(store.names)
    parts = []
    for k in (1, 2, 3):
        with LogitStore([case["tgt"]]) as store:
            store.select_shard((k, 3))
            assert store.names == names[k - 1 :: 3]
            parts.append(store.names)
    assert sorted(n for part in parts for n in part) == names  # a partition
    with LogitStore([case["tgt"]]) as store:
        store.select_shard((1, 1))
        assert store.names == names


@pytest.mark.parametrize("command", ["correct", "relabel"])
def test_shards_write_the_same_pngs_as_one_process(
    case: dict[str, Path], tmp_path: Path, command: str
) -> None:
    build = correct_args if command == "correct" else relabel_args
    run_all([build(case, tmp_path / "one")])
    expected = pngs(tmp_path / "one")
    assert len(expected) == (14 if command == "correct" else 7)
    for n in (1, 2, 3):
        out = tmp_path / f"n{n}"
        run_all([[*build(case, out), "--shard", f"{k}/{n}"] for k in range(1, n + 1)])
        assert pngs(out) == expected, n
        manifest = "correct" if command == "correct" else "manifest"
        if n == 1:
            assert (out / f"{manifest}.json").is_file()
            continue
        images = 0
        for k in range(1, n + 1):
            part = json.loads((out / f"{manifest}-{k}-of-{n}.json").read_text())
            images += part["images"] if command == "correct" else part["num_images"]
            record = json.loads((out / f".blda-run-{k}-of-{n}.json").read_text())
            assert record["complete"] is True and record["shard"] == [k, n]
        assert images == 7
        assert not list(out.glob("*.lock")) and not (out.parent / f"{out.name}.partial").exists()
        # The shards' manifests add up to the one-process manifest.
        merged = invoke(command, "--merge", *sorted(out.glob(f"{manifest}-*-of-{n}.json")))
        assert merged.exit_code == 0, merged.output
        one = json.loads((tmp_path / "one" / f"{manifest}.json").read_text())
        assert json.loads((out / f"{manifest}.json").read_text()) == one


def test_torchrun_environment_picks_the_shard(case: dict[str, Path], tmp_path: Path) -> None:
    run_all([correct_args(case, tmp_path / "one")])
    out = tmp_path / "torchrun"
    envs = [sub_env(RANK=str(r), WORLD_SIZE="2") for r in (0, 1)]
    run_all([correct_args(case, out), correct_args(case, out)], envs)
    assert pngs(out) == pngs(tmp_path / "one")
    assert (out / "correct-1-of-2.json").is_file() and (out / "correct-2-of-2.json").is_file()


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, *fragments: str) -> None:
    """Exit status 1 with one line ``error: ...`` holding every fragment."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_shard_folder_safety(case: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pred"
    first = invoke(*correct_args(case, out), "--shard", "1/2")
    assert first.exit_code == 0, first.output
    # The same shard again: refused without --resume/--overwrite; both work.
    again = invoke(*correct_args(case, out), "--shard", "1/2")
    assert again.exit_code == 1 and "shard 1/2 ran here already" in again.output
    assert invoke(*correct_args(case, out), "--shard", "1/2", "--resume").exit_code == 0
    assert invoke(*correct_args(case, out), "--shard", "1/2", "--overwrite").exit_code == 0
    # Another shard count, or other settings, may not join the folder.
    other_n = invoke(*correct_args(case, out), "--shard", "2/3")
    assert other_n.exit_code == 1 and "shard 1/2 of another run" in other_n.output
    args = correct_args(case, out)
    args[args.index("0.5")] = "0.7"
    other_tau = invoke(*args, "--shard", "2/2")
    assert other_tau.exit_code == 1 and "shard 1/2 of another run" in other_tau.output
    # An unsharded run does not write into the shards' folder, nor shards into its folder.
    whole = invoke(*correct_args(case, out))
    assert whole.exit_code == 1 and "already exists" in whole.output
    single = tmp_path / "single"
    assert invoke(*correct_args(case, single)).exit_code == 0
    into = invoke(*correct_args(case, single), "--shard", "1/2")
    assert into.exit_code == 1 and "unsharded run" in into.output


def test_shard_usage_errors(case: dict[str, Path], tmp_path: Path) -> None:
    bad = invoke(*correct_args(case, tmp_path / "a"), "--shard", "3/2")
    assert bad.exit_code == 2 and "need 1 <= K <= N" in bad.output
    portion = invoke(*relabel_args(case, tmp_path / "b"), "--count-only", "--shard", "1/2")
    assert portion.exit_code == 2 and "give --keep-portion" in portion.output
    empty = invoke(*correct_args(case, tmp_path / "c"), "--shard", "8/8")
    assert empty.exit_code == 1 and "shard 8/8 holds no image" in empty.output
    assert not (tmp_path / "b").exists()


def evaluate_args(case: dict[str, Path], json_path: Path) -> list[object]:
    return [
        "evaluate",
        case["tgt"],
        "--stats",
        case["tgt_stats"],
        "--anchors",
        case["src_stats"],
        "--tau",
        "0.5",
        "--json",
        json_path,
    ]


@pytest.mark.parametrize("labels", ["store", "dir"])
def test_evaluate_shards_merge_to_one_pass(case: dict[str, Path], tmp_path: Path, labels) -> None:
    extra: list[object] = [] if labels == "store" else ["--labels", case["labels"]]
    one = invoke(*evaluate_args(case, tmp_path / "one.json"), *extra)
    assert one.exit_code == 0, one.output
    md = invoke(
        *evaluate_args(case, tmp_path / "one-md.json"), *extra, "--markdown", tmp_path / "one.md"
    )
    assert md.exit_code == 0, md.output
    expected = json.loads((tmp_path / "one.json").read_text())
    assert "partial" not in expected
    for n in (1, 2, 3):
        shards = [
            [*evaluate_args(case, tmp_path / f"e{n}.json"), *extra, "--shard", f"{k}/{n}"]
            for k in range(1, n + 1)
        ]
        if n == 3:  # real processes, side by side
            run_all([[str(a) for a in args] for args in shards])
        for args in shards if n < 3 else []:
            part = invoke(*args)
            assert part.exit_code == 0, part.output
        if n == 1:  # one shard is the whole run
            assert json.loads((tmp_path / "e1.json").read_text()) == expected
            continue
        parts = sorted(tmp_path.glob(f"e{n}-*-of-{n}.json"))
        assert len(parts) == n
        first = json.loads(parts[0].read_text())
        assert first["partial"]["shard"] == [1, n]
        assert first["num_images"] < expected["num_images"]
        given = [str(tmp_path / f"e{n}-*-of-{n}.json")] if n == 3 else parts  # a quoted glob
        merged = invoke("evaluate", "--merge", *given, "--json", tmp_path / f"all{n}.json")
        assert merged.exit_code == 0, merged.output
        assert json.loads((tmp_path / f"all{n}.json").read_text()) == expected
        md = invoke("evaluate", "--merge", *parts, "--markdown", tmp_path / f"all{n}.md")
        assert md.exit_code == 0, md.output
        assert (tmp_path / f"all{n}.md").read_text() == (tmp_path / "one.md").read_text()
        # A missing or repeated part is refused.
        short = invoke("evaluate", "--merge", *parts[1:], "--json", tmp_path / "x.json")
        assert short.exit_code == 1 and f"shard 1/{n} is missing" in short.output


def test_evaluate_merge_refuses_mixed_runs(case: dict[str, Path], tmp_path: Path) -> None:
    for k in (1, 2):
        assert invoke(*evaluate_args(case, tmp_path / "a.json"), "--shard", f"{k}/2").exit_code == 0
    args = evaluate_args(case, tmp_path / "b.json")
    args[args.index("0.5")] = "0.7"
    assert invoke(*args, "--shard", "2/2").exit_code == 0
    mixed = invoke(
        "evaluate",
        "--merge",
        tmp_path / "a-1-of-2.json",
        tmp_path / "b-2-of-2.json",
        "--json",
        tmp_path / "m.json",
    )
    assert mixed.exit_code == 1 and "not of the same run" in mixed.output, mixed.output
    plain = invoke(*evaluate_args(case, tmp_path / "plain.json"))
    assert plain.exit_code == 0
    notpart = invoke("evaluate", "--merge", tmp_path / "plain.json", "--json", tmp_path / "n.json")
    assert notpart.exit_code == 1 and "no partial block" in notpart.output
    nojson = invoke(*evaluate_args(case, tmp_path / "c.json")[:-2], "--shard", "1/2")
    assert nojson.exit_code == 2 and "give --json" in nojson.output


def compare_args(case: dict[str, Path], json_path: Path, *extra: object) -> list[object]:
    return [
        "compare",
        case["tgt"],
        "--stats",
        case["tgt_stats"],
        "--anchors",
        case["src_stats"],
        "--tau",
        "0.2,0.5,1",
        "--json",
        json_path,
        *extra,
    ]


@pytest.mark.parametrize("select", [[], ["--select-on", "3"]])
def test_compare_shards_merge_to_one_pass(case: dict[str, Path], tmp_path: Path, select) -> None:
    one = invoke(*compare_args(case, tmp_path / "one.json", *select))
    assert one.exit_code == 0, one.output
    expected = json.loads((tmp_path / "one.json").read_text())
    for n in (2, 3):
        shards = [
            [*compare_args(case, tmp_path / f"c{n}.json", *select, "--shard", f"{k}/{n}")]
            for k in range(1, n + 1)
        ]
        if n == 3:  # real processes, side by side
            run_all([[str(a) for a in args] for args in shards])
        for k, args in enumerate(shards if n < 3 else [], start=1):
            part = invoke(*args)
            assert part.exit_code == 0, part.output
            hint = f"blda compare --merge '{tmp_path / f'c{n}-*-of-{n}.json'}' --json"
            assert f"shard {k}/{n} would select" in part.stderr and hint in part.stderr
        parts = sorted(tmp_path.glob(f"c{n}-*-of-{n}.json"))
        # A shard's choice saw its images only: correct refuses it and names the merge.
        apply = invoke("correct", case["tgt"], "--from-compare", parts[0], "--out-dir", tmp_path)
        assert_error(apply, "the report of one shard (1/", "merge the shards first")
        assert len(parts) == n
        splits = {json.dumps(json.loads(p.read_text())["split"]) for p in parts}
        assert splits == {json.dumps(expected["split"])}  # every shard drew the same split
        merged = invoke("compare", "--merge", *parts, "--json", tmp_path / f"all{n}.json")
        assert merged.exit_code == 0, merged.output
        assert json.loads((tmp_path / f"all{n}.json").read_text()) == expected
        assert "selected: --method" in merged.output
    damaged = json.loads(parts[0].read_text())  # a negative count is refused, not added up
    damaged["partial"]["rows"][0]["held"][0][0] = -1
    broken = tmp_path / "broken" / parts[0].name
    broken.parent.mkdir()
    broken.write_text(json.dumps(damaged))
    refused = invoke("compare", "--merge", broken, *parts[1:], "--json", tmp_path / "b.json")
    assert_error(refused, "damaged partial block (row 0 held: holds a negative count)")
    copy = tmp_path / "copy.json"
    copy.write_bytes(parts[0].read_bytes())
    dup = invoke("compare", "--merge", *parts, copy, "--json", tmp_path / "d.json")
    assert dup.exit_code == 1 and "given twice" in dup.output
    bad = invoke(
        "compare", "--merge", *parts, "--stats", case["tgt_stats"], "--json", tmp_path / "x.json"
    )
    assert bad.exit_code == 2 and "--merge" in bad.output


@pytest.mark.parametrize("anchors", [False, True])
def test_diagnose_shards_merge_to_one_pass(case: dict[str, Path], tmp_path: Path, anchors) -> None:
    extra: list[object] = ["--stats", case["tgt_stats"]]
    if anchors:
        extra += ["--anchors", case["src_stats"]]
    one = invoke("diagnose", case["tgt"], *extra, "--json", tmp_path / "one.json")
    assert one.exit_code == 0, one.output
    expected = json.loads((tmp_path / "one.json").read_text())
    run_all(  # real processes, side by side
        [
            ["diagnose", str(case["tgt"]), *map(str, extra), "--json", str(tmp_path / "d.json")]
            + ["--shard", f"{k}/3"]
            for k in (1, 2, 3)
        ]
    )
    first = json.loads((tmp_path / "d-1-of-3.json").read_text())
    assert first["num_images"] == 3 and first["partial"]["shard"] == [1, 3]
    merged = invoke(
        "diagnose", "--merge", str(tmp_path / "d-*-of-3.json"), "--json", tmp_path / "all.json"
    )
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "all.json").read_text()) == expected
    first["partial"]["predicted"][0] = -5  # a damaged part is refused, not added up
    (tmp_path / "d-1-of-3.json").write_text(json.dumps(first))
    damaged = invoke(
        "diagnose", "--merge", str(tmp_path / "d-*-of-3.json"), "--json", tmp_path / "bad.json"
    )
    assert_error(damaged, "d-1-of-3.json: damaged partial block (predicted: holds a negative")
    nostats = invoke("diagnose", case["tgt"], "--json", tmp_path / "x.json", "--shard", "1/3")
    assert nostats.exit_code == 2 and "--shard needs --stats" in nostats.output


def portion_args(case: dict[str, Path], out: Path, tau: str = "0.5") -> list[str]:
    args = relabel_args(case, out)
    args[args.index("0.5")] = tau
    return [*args, "--keep-portion", "0.5"]


def test_keep_portion_shards_equal_one_process(case: dict[str, Path], tmp_path: Path) -> None:
    one = invoke(*portion_args(case, tmp_path / "one"))
    assert one.exit_code == 0, one.output
    expected = pngs(tmp_path / "one")
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert all(t["portion_logodds"] is not None for t in manifest["thresholds"].values())
    assert manifest["quality"] is not None  # the merge adds up the labelled pixels too
    # Three processes side by side, no barrier: step 1 every shard counts, step 2 relabels.
    three = [[*portion_args(case, tmp_path / "n3"), "--shard", f"{k}/3"] for k in (1, 2, 3)]
    run_all([[*args, "--count-only"] for args in three])
    assert not list((tmp_path / "n3").glob("*.png"))
    run_all(three)
    # Two shards picked by torchrun's environment.
    for step in (["--count-only"], []):
        for rank in ("0", "1"):
            env = {"RANK": rank, "WORLD_SIZE": "2"}
            done = CliRunner().invoke(main, [*portion_args(case, tmp_path / "n2"), *step], env=env)
            assert done.exit_code == 0, done.output
    for n in (2, 3):
        out = tmp_path / f"n{n}"
        assert pngs(out) == expected, n
        for k in range(1, n + 1):
            part = json.loads((out / f"manifest-{k}-of-{n}.json").read_text())
            assert part["thresholds"] == manifest["thresholds"]
            assert (out / f"relabel-counts-{k}-of-{n}.h5").is_file()
        merged = invoke("relabel", "--merge", out / f"manifest-*-of-{n}.json")
        assert merged.exit_code == 0, merged.output
        assert json.loads((out / "manifest.json").read_text()) == manifest
    # One shard: nothing to count first; the relabel step counts itself.
    single = [*portion_args(case, tmp_path / "n1"), "--shard", "1/1"]
    counted = invoke(*single, "--count-only")
    assert counted.exit_code == 0 and "nothing to count first" in counted.output
    assert not (tmp_path / "n1").exists()
    assert invoke(*single).exit_code == 0
    assert pngs(tmp_path / "n1") == expected
    assert json.loads((tmp_path / "n1" / "manifest.json").read_text()) == manifest


def test_keep_portion_shards_refuse_missing_or_foreign_counts(
    case: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "pseudo"
    missing = invoke(*portion_args(case, out), "--shard", "2/2")
    assert_error(missing, "relabel-counts-1-of-2.h5: missing", "--count-only --shard 1/2")
    first = invoke(*portion_args(case, out), "--count-only", "--shard", "1/2")
    assert first.exit_code == 0, first.output
    assert (out / "relabel-counts-1-of-2.h5").is_file()
    again = invoke(*portion_args(case, out), "--count-only", "--shard", "1/2")
    assert_error(again, "relabel-counts-1-of-2.h5: already exists", "--resume")
    kept = invoke(*portion_args(case, out), "--count-only", "--shard", "1/2", "--resume")
    assert kept.exit_code == 0 and "kept the counts of shard 1/2" in kept.output
    # Shard 2 counted with another tau: not the same run.
    other = invoke(*portion_args(case, out, tau="0.7"), "--count-only", "--shard", "2/2")
    assert other.exit_code == 0, other.output
    foreign = invoke(*portion_args(case, out), "--shard", "1/2")
    assert_error(foreign, "relabel-counts-2-of-2.h5: counts of another run (other settings)")
    assert not list(out.glob("*.png"))
    recount = invoke(*portion_args(case, out), "--count-only", "--shard", "2/2", "--overwrite")
    assert recount.exit_code == 0, recount.output
    # Counts that do not add up to the images' pixels (negative, or moved) are refused.
    good = (out / "relabel-counts-2-of-2.h5").read_bytes()
    for damage in ("negative", "added"):
        with h5py.File(out / "relabel-counts-2-of-2.h5", "a") as f:
            counts = f["counts"][()]
            if damage == "negative":
                counts = -counts
            else:
                counts[0, 0] += 5
            f["counts"][...] = counts
        tampered = invoke(*portion_args(case, out), "--shard", "1/2")
        assert_error(tampered, "relabel-counts-2-of-2.h5: damaged count file", "do not add up")
        (out / "relabel-counts-2-of-2.h5").write_bytes(good)
    # A few KB declaring (40000, 65536) counts (19.5 GiB): refused by its shape, before reading.
    for key, shape in (("counts", (40000, 65536)), ("names", (1 << 30,))):
        with h5py.File(out / "relabel-counts-2-of-2.h5", "a") as f:
            dtype = h5py.string_dtype() if key == "names" else "int64"
            del f[key]
            f.create_dataset(key, shape, dtype, chunks=(1, 4096)[-len(shape) :], compression="gzip")
        assert (out / "relabel-counts-2-of-2.h5").stat().st_size < 64 * 1024
        huge = invoke(*portion_args(case, out), "--shard", "1/2")
        assert_error(huge, "relabel-counts-2-of-2.h5: damaged count file", str(shape[0]))
        (out / "relabel-counts-2-of-2.h5").write_bytes(good)
    assert not list(out.glob("*.png"))
    for k in (1, 2):
        done = invoke(*portion_args(case, out), "--shard", f"{k}/2")
        assert done.exit_code == 0, done.output
    resumed = invoke(*portion_args(case, out), "--shard", "1/2", "--resume")
    assert resumed.exit_code == 0 and "kept 4 existing" in resumed.output
    # A merge needs every shard's manifest once.
    short = invoke("relabel", "--merge", out / "manifest-2-of-2.json")
    assert_error(short, "shard 1/2 is missing")
    # --count-only needs a shard (and --keep-portion).
    whole = invoke(*portion_args(case, tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output
    into = invoke(*portion_args(case, tmp_path / "whole"), "--count-only", "--shard", "1/2")
    assert_error(into, "holds the output of an unsharded run")
    alone = invoke(*portion_args(case, tmp_path / "x"), "--count-only")
    assert alone.exit_code == 2 and "give --shard K/N" in alone.output
    assert not (tmp_path / "x").exists()


def test_sharded_scores_stores_evaluate_as_one(case: dict[str, Path], tmp_path: Path) -> None:
    scores = tmp_path / "scores.h5"
    one = invoke(*correct_args(case, tmp_path / "one"), "--scores-out", scores)
    assert one.exit_code == 0, one.output
    for k in (1, 2, 3):
        part = invoke(
            *correct_args(case, tmp_path / "three"), "--scores-out", scores, "--shard", f"{k}/3"
        )
        assert part.exit_code == 0, part.output
    with h5py.File(tmp_path / "scores-2-of-3.h5", "r") as f:
        assert len(f["images"]) == 2 and all(g.attrs["has_label"] for g in f["images"].values())
    alone = invoke("evaluate", tmp_path / "scores-2-of-3.h5", "--json", tmp_path / "x.json")
    assert_error(alone, "shard 1/3 of its run is missing")  # one shard is not the dataset
    figures = []
    for given in (scores, tmp_path / "scores-*-of-3.h5"):
        done = invoke("evaluate", given, "--json", tmp_path / "e.json", "--overwrite")
        assert done.exit_code == 0, done.output
        report = json.loads((tmp_path / "e.json").read_text())
        figures.append({key: report[key] for key in ("miou", "macc", "per_class", "num_images")})
    assert figures[0] == figures[1] and figures[0]["num_images"] == 7


def test_correct_merge_refuses_missing_foreign_or_damaged_parts(
    case: dict[str, Path], tmp_path: Path
) -> None:
    out, other = tmp_path / "pred", tmp_path / "other"
    run_all([[*correct_args(case, out), "--shard", f"{k}/3"] for k in (1, 2, 3)])
    run_all([[*correct_args(case, other), "--tau", "0.7", "--shard", "3/3"]])
    parts = [out / f"correct-{k}-of-3.json" for k in (1, 2, 3)]
    assert_error(invoke("correct", "--merge", *parts[:2]), "shard 3/3 is missing")
    foreign = out / "foreign-3-of-3.json"
    foreign.write_text((other / "correct-3-of-3.json").read_text())
    assert_error(invoke("correct", "--merge", *parts[:2], foreign), "not of the same run")
    damaged = json.loads(parts[2].read_text())
    damaged["flow"] = [[1, 2]]
    foreign.write_text(json.dumps(damaged))
    assert_error(invoke("correct", "--merge", *parts[:2], foreign), "damaged partial block (flow: ")
    damaged = json.loads(parts[2].read_text())
    damaged["pixels_after"][0] = -1
    foreign.write_text(json.dumps(damaged))
    assert_error(invoke("correct", "--merge", *parts[:2], foreign), "a negative count")
    usage = invoke("correct", "--merge", *parts, "--out-dir", out)
    assert usage.exit_code == 2 and "--merge takes" in usage.output
    assert not (out / "correct.json").exists()
    done = invoke("correct", "--merge", str(out / "correct-*-of-3.json"))
    assert done.exit_code == 0, done.output
    assert "merged 3 shard summaries: 7 predictions" in done.stderr
    again = invoke("correct", "--merge", *parts)
    assert_error(again, "correct.json", "already exists")


# ---------------------------------------------------------------- forged parts


@pytest.fixture(scope="module")
def two_part_runs(case: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The two parts (``--shard K/2``) of a run of every command that merges, and how to merge."""
    root = tmp_path_factory.mktemp("parts")
    stats = ["--stats", case["tgt_stats"], "--anchors", case["src_stats"]]
    runs: dict[str, tuple[list[Path], list[object]]] = {}
    for k in (1, 2):
        shard = ["--shard", f"{k}/2"]
        for args in (
            [*evaluate_args(case, root / "e.json"), *shard],
            [*compare_args(case, root / "c.json"), *shard],
            ["diagnose", case["tgt"], *stats, "--json", root / "d.json", *shard],
            [*correct_args(case, root / "pred"), *shard],
            [*relabel_args(case, root / "pl"), *shard],
        ):
            done = invoke(*args)
            assert done.exit_code == 0, done.output
    runs["evaluate"] = ([root / f"e-{k}-of-2.json" for k in (1, 2)], ["--json", root / "E.json"])
    runs["compare"] = ([root / f"c-{k}-of-2.json" for k in (1, 2)], ["--json", root / "C.json"])
    runs["diagnose"] = ([root / f"d-{k}-of-2.json" for k in (1, 2)], ["--json", root / "D.json"])
    runs["correct"] = ([root / "pred" / f"correct-{k}-of-2.json" for k in (1, 2)], [])
    runs["relabel"] = ([root / "pl" / f"manifest-{k}-of-2.json" for k in (1, 2)], [])
    return runs


def _set(data: dict, where: str, value: object) -> None:
    """Set ``data[a][b][0]...`` given ``"a.b.0"`` (numbers index lists)."""
    keys: list = [int(k) if k.lstrip("-").isdigit() else k for k in where.split(".")]
    for key in keys[:-1]:
        data = data[key]
    data[keys[-1]] = value


FORGED = [
    # (command, key path in part 1, forged value, what the error names)
    ("evaluate", "version", "2", "version must be an integer, not a string"),
    ("evaluate", "partial.shard", [1, 10**9], "partial.shard[1]: 1000000000 is above 1024"),
    ("evaluate", "partial.shard", [True, 2], "must be an integer, not a boolean"),
    ("evaluate", "partial.before.confusion.0.0", 0.5, "not a whole count"),
    ("evaluate", "partial.before.confusion.0.0", "2", 'a string ("2"), not a whole count'),
    ("evaluate", "partial.before.confusion.0.0", 2**63, "beyond int64"),
    ("evaluate", "partial.before.confusion.0.0", 2**62, "counts add up to"),
    ("evaluate", "partial.before.ece_bins.confidence_sum.3", -1.0, "below 0"),
    ("evaluate", "partial.before.ece_bins.count.3", -2, "negative count"),
    ("evaluate", "partial.counts.num_images", -47, "-47 is below 0"),
    ("evaluate", "partial.counts", {"num_images": 3}, "num_missing_predictions: missing"),
    ("compare", "partial.rows.1.tau", -7, "tau: -7 is below 0"),
    ("compare", "partial.rows.1.tau", True, "tau: must be a number, not a boolean"),
    ("compare", "partial.rows.1.method", "rm -rf", '"rm -rf" is not one of'),
    ("compare", "partial.rows.1.auto", 1, "must be true or false"),
    ("compare", "partial.rows.0.held.0.0", True, "a boolean (true), not a whole count"),
    ("compare", "partial.names", "abc", "must be a list, not a string"),
    ("diagnose", "partial.num_images", -47, "-47 is below 0"),
    ("diagnose", "partial.predicted.0", 0.5, "not a whole count"),
    ("diagnose", "statistics.fingerprint", 7, "must be a string"),
    ("correct", "images", "2", "images: holds a string"),
    ("correct", "flow.0.0", 2**62, "counts add up to"),
    ("relabel", "partial.num_images", -47, "-47 is below 0"),
    ("relabel", "partial.after.0", 1e300, "not a whole count"),
    ("relabel", "partial.flows", {"rm -rf": [[0]]}, "unknown label set 'rm -rf'"),
]


@pytest.mark.parametrize(("command", "where", "value", "fragment"), FORGED)
def test_merge_refuses_forged_parts(
    two_part_runs: dict, tmp_path: Path, command: str, where: str, value: object, fragment: str
) -> None:
    """Every ``--merge`` reads its parts through one schema: a forged value is one ``error:``."""
    parts, extra = two_part_runs[command]
    data = json.loads(parts[0].read_text())
    _set(data, where, value)
    forged = tmp_path / parts[0].name
    forged.write_text(json.dumps(data))
    other = tmp_path / parts[1].name
    other.write_text(parts[1].read_text())
    outputs = [tmp_path / Path(str(a)).name if isinstance(a, Path) else a for a in extra]
    result = invoke(command, "--merge", forged, other, *outputs)
    assert_error(result, forged.name, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([forged.name, other.name])


@pytest.mark.parametrize("command", ["evaluate", "compare", "diagnose", "correct", "relabel"])
def test_merge_refuses_nan_and_huge_shard_counts(
    two_part_runs: dict, tmp_path: Path, command: str
) -> None:
    """NaN is not JSON; a part claiming 10^9 shards is refused before anything is sized by N."""
    parts, extra = two_part_runs[command]
    data = json.loads(parts[0].read_text())
    assert data["partial"]["shard"] == [1, 2]
    nan = tmp_path / parts[0].name
    nan.write_text(json.dumps({**data, "x": float("nan")}))  # Python writes NaN; JSON has none
    other = tmp_path / parts[1].name
    other.write_text(parts[1].read_text())
    outputs = [tmp_path / Path(str(a)).name if isinstance(a, Path) else a for a in extra]
    assert_error(invoke(command, "--merge", nan, other, *outputs), "not JSON", "NaN")
    data["partial"]["shard"] = [10**9, 10**9]
    nan.write_text(json.dumps(data))
    assert_error(invoke(command, "--merge", nan, other, *outputs), "is above 1024")


# ---------------------------------------------------------------- shard sets of stores


def _shard_store(path: Path, shard: str, names: list[str], model: str = "m") -> Path:
    import numpy as np

    from blda_posthoc.io.store import StoreWriter

    rng = np.random.default_rng(len(names))
    with StoreWriter(
        path, ["a", "b"], dtype="float32", attrs={"shard": shard}, settings={"model": model}
    ) as w:
        for name in names:
            label = rng.integers(0, 2, (4, 4)).astype(np.uint8)
            w.write(name, rng.normal(size=(2, 4, 4)).astype(np.float32), label)
    return path


def test_store_shards_must_form_one_complete_run(tmp_path: Path) -> None:
    """``x-*-of-N.h5``: every K of one N exactly once, of one run; else one error line."""
    one = _shard_store(tmp_path / "x-1-of-2.h5", "1/2", ["i0", "i2"])
    two = _shard_store(tmp_path / "x-2-of-2.h5", "2/2", ["i1", "i3"])
    with LogitStore([one, two]) as store:
        assert store.names == ["i0", "i1", "i2", "i3"] and len(store.fingerprints) == 2
    stats = ["--out", tmp_path / "s.h5"]
    done = invoke("fit-stats", str(tmp_path / "x-*-of-2.h5"), *stats)
    assert done.exit_code == 0, done.output
    two.rename(tmp_path / "gone.h5")
    missing = invoke("fit-stats", str(tmp_path / "x-*-of-2.h5"), *stats, "--overwrite")
    assert_error(missing, "x-1-of-2.h5: shard 2/2 of its run is missing (1 of 2 given)", "x-*-of-2")
    odd = _shard_store(tmp_path / "y-1-of-3.h5", "1/3", ["i1"])
    assert_error(
        invoke("fit-stats", one, odd, *stats, "--overwrite"),
        "y-1-of-3.h5: shard 1/3 is not of the same run as",
    )
    other_model = _shard_store(tmp_path / "z-2-of-2.h5", "2/2", ["i1", "i3"], model="other")
    assert_error(
        invoke("fit-stats", one, other_model, *stats, "--overwrite"),
        "z-2-of-2.h5: shard 2/2 is not of the same run",
        "other run settings",
    )
    again = _shard_store(tmp_path / "w-1-of-2.h5", "1/2", ["i5"])
    assert_error(
        invoke("evaluate", one, again, "--json", tmp_path / "e.json"),
        "w-1-of-2.h5: shard 1/2 given twice (also",
    )
    with h5py.File(again, "a") as f:
        f.attrs["shard"] = "1/1000000000"
    assert_error(invoke("evaluate", again, "--json", tmp_path / "e.json"), "shard '1/1000000000'")
    assert not (tmp_path / "e.json").exists()
