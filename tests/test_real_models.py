"""Real architectures as users have them: a Hugging Face ``transformers`` SegFormer.

The model is randomly initialised from a small ``SegformerConfig`` (no download) and handed to
``dump-logits`` the ways users do: a ``package.module:factory`` plus checkpoint (the model returns
a ``SemanticSegmenterOutput``), a TorchScript trace (returns ``{"logits": ...}``) and an ONNX
export (output named ``logits``). Each store then goes through ``fit-stats`` and
``correct --tau 0``, whose predictions must be the argmax of the model's direct forward pass
upsampled to the image size, as the model's own users compute it.

``segmentation_models_pytorch`` is not tested: it imports timm, which imports torchvision, and
the torchvision releases on PyPI do not import beside the CPU build of torch this project tests
with (see the README, "Models").
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from click.testing import CliRunner
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.core.infer import Preprocess, normalize
from blda_posthoc.io.store import LogitStore

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'blda-posthoc[models]')"
)

NUM_CLASSES = 5
SIZE = (64, 96)
CONFIG = {
    "num_labels": NUM_CLASSES,
    "depths": [1, 1, 1, 1],
    "hidden_sizes": [8, 16, 24, 32],
    "num_attention_heads": [1, 1, 1, 1],
    "decoder_hidden_size": 16,
}
FACTORY = f'''
"""Build the SegFormer the test trained: ``--model hf_segformer:build``."""

from transformers import SegformerConfig, SegformerForSemanticSegmentation


def build():
    return SegformerForSemanticSegmentation(SegformerConfig(**{CONFIG!r}))
'''


def segformer(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.SegformerConfig(**CONFIG)
    return transformers.SegformerForSemanticSegmentation(config).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im{i}.png")
    return folder


def direct(model: torch.nn.Module, images: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per image: the model's own logits and the argmax of them upsampled to the image size."""
    out = {}
    for path in sorted(images.glob("*.png")):
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB")))[None]
        with torch.no_grad():
            logits = model(normalize(pixels, Preprocess())).logits  # ImageNet mean/std
        up = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False)[0]
        out[path.stem] = (logits[0].numpy(), up.numpy())
    return out


def dump_fit_correct(tmp_path: Path, images: Path, model_args: list[str]) -> Path:
    runner = CliRunner()
    store, stats, pred = tmp_path / "s.h5", tmp_path / "stats.h5", tmp_path / "pred"
    steps = [
        ["dump-logits", *model_args, "--images", str(images), "--out", str(store)]
        + ["--dtype", "float32", "--workers", "0", "--device", "cpu"],
        ["fit-stats", str(store), "--labels", "pseudo", "--min-pixels", "1", "--out", str(stats)],
        ["correct", str(store), "--stats", str(stats), "--tau", "0", "--out-dir", str(pred)],
    ]
    for args in steps:
        result = runner.invoke(main, args)
        assert result.exit_code == 0, f"{args[0]}: {result.output}"
    return store


def assert_parity(tmp_path: Path, store: Path, expected: dict, atol: float) -> None:
    with LogitStore([store]) as s:
        assert s.num_classes == NUM_CLASSES and s.names == sorted(expected)
        for name, (logits, up) in expected.items():
            stored = s.read(name).logits
            assert stored.shape == logits.shape == (NUM_CLASSES, SIZE[0] // 4, SIZE[1] // 4)
            np.testing.assert_allclose(stored, logits, atol=atol, rtol=0)
            pred = np.asarray(Image.open(tmp_path / "pred" / f"{name}.png")).astype(np.int64)
            assert (pred == up.argmax(0)).mean() > 0.99
            # where they differ, float noise decided a near tie: pred is a maximum up to atol
            chosen = np.take_along_axis(up, pred[None], 0)[0]
            assert (chosen >= up.max(0) - 2 * atol).all()


def test_segformer_factory_with_checkpoint(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hf_segformer.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = segformer(seed=1)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "segformer.pth")
    model_args = ["--model", "hf_segformer:build", "--checkpoint", str(tmp_path / "segformer.pth")]
    store = dump_fit_correct(tmp_path, images, model_args)  # SemanticSegmenterOutput.logits
    assert_parity(tmp_path, store, direct(trained, images), atol=1e-5)


def test_segformer_torchscript_trace_and_output_key(tmp_path: Path, images: Path) -> None:
    model = segformer(seed=2)
    example = torch.zeros(1, 3, *SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, strict=False)  # returns {"logits": ...}
    traced.save(str(tmp_path / "segformer.pt"))
    model_args = ["--model", str(tmp_path / "segformer.pt"), "--output-key", "logits"]
    store = dump_fit_correct(tmp_path, images, model_args)
    assert_parity(tmp_path, store, direct(model, images), atol=1e-5)
    bad = CliRunner().invoke(
        main,
        ["dump-logits", "--model", str(tmp_path / "segformer.pt"), "--output-key", "seg"]
        + ["--images", str(images), "--out", str(tmp_path / "bad.h5"), "--workers", "0"],
    )
    assert bad.exit_code == 1
    assert "--output-key seg: not found" in bad.output and "['logits']" in bad.output


def test_segformer_onnx_export(tmp_path: Path, images: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnx", reason="onnx is not installed")
    model = segformer(seed=3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, *SIZE),),
            str(tmp_path / "segformer.onnx"),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "n", 2: "h", 3: "w"}},
            dynamo=False,
        )
    store = dump_fit_correct(tmp_path, images, ["--model", str(tmp_path / "segformer.onnx")])
    assert_parity(tmp_path, store, direct(model, images), atol=1e-4)
