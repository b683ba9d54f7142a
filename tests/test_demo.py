"""`blda demo` end to end on a handful of scenes (the full-size run is in the README)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from blda_posthoc.cli import main


def test_demo_runs_every_step_and_writes_its_outputs(tmp_path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(
        main, ["demo", "--workdir", str(workdir), "--images", "4", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "| **mIoU**" in result.stdout and "demo finished in" in result.stdout
    log = (workdir / "commands.log").read_text()
    for step in (
        "dump-logits",
        "fit-stats src.h5 --labels gt",
        "fit-stats tgt.h5 --labels pseudo",
        "diagnose",
        "correct tgt.h5 --stats tgt_stats.h5 --anchors src_stats.h5",
        "correct tgt.h5 --stats src_stats.h5",
        "evaluate --pred-dir pred_paper",
    ):
        assert f"$ blda {step}" in log
    for key in ("plain", "paper", "source"):
        report = json.loads((workdir / f"eval_{key}.json").read_text())
        assert report["num_images"] == 4
    assert len(list((workdir / "pred_paper").glob("*.png"))) == 4
    assert Image.open(workdir / "iou.png").size[0] > 300
    assert Image.open(workdir / "examples" / "scene_0000.png").mode == "RGB"
    assert "| **mIoU**" in (workdir / "report.md").read_text()
    # A second run refuses to replace the first one's outputs.
    again = CliRunner().invoke(main, ["demo", "--workdir", str(workdir), "--images", "4"])
    assert again.exit_code == 1 and "already exists" in again.stderr
