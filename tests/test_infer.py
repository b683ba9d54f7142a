"""Preprocessing, output selection and sliding-window inference (blda_posthoc.core.infer)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import pytest
import torch
from tiny_models import HalfRes, Pointwise, TinyNet

from blda_posthoc.core.infer import (
    OutputKey,
    Preprocess,
    autocast,
    forward_slide,
    forward_whole,
    logits_size,
    normalize,
    predict_logits,
    select_output,
    window_starts,
)


def pixels(n: int = 2, h: int = 21, w: int = 35, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=generator, dtype=torch.uint8)


def test_normalize_applies_mean_std_per_channel() -> None:
    images = pixels(1, 4, 5)
    pre = Preprocess(mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    x = normalize(images, pre)
    assert x.shape == (1, 3, 4, 5) and x.dtype == torch.float32
    for c, (m, s) in enumerate(zip(pre.mean, pre.std, strict=True)):
        expected = (images[0, :, :, c].float() - m) / s
        torch.testing.assert_close(x[0, c], expected)


def test_normalize_bgr_reverses_channels_before_mean() -> None:
    images = pixels(1, 3, 3)
    x = normalize(images, Preprocess(mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0), bgr=True))
    torch.testing.assert_close(x[0, 0], images[0, :, :, 2].float() - 1.0)
    torch.testing.assert_close(x[0, 2], images[0, :, :, 0].float() - 3.0)


@pytest.mark.parametrize(
    ("pre", "size"),
    [
        (Preprocess(scale=0.5), (10, 18)),
        (Preprocess(size=(16, 32)), (16, 32)),
        (Preprocess(), (21, 35)),
    ],
)
def test_normalize_resizes(pre: Preprocess, size: tuple[int, int]) -> None:
    assert normalize(pixels(), pre).shape[2:] == size


def test_preprocess_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="scale or size"):
        Preprocess(scale=0.5, size=(4, 4))
    with pytest.raises(ValueError, match="std"):
        Preprocess(std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="stride needs a window"):
        Preprocess(stride=(4, 4))
    with pytest.raises(ValueError, match="logits_scale"):
        Preprocess(logits_scale=1.5)


@pytest.mark.parametrize(
    ("length", "window", "stride", "expected"),
    [
        (10, 4, 3, [0, 3, 6]),
        (11, 4, 3, [0, 3, 6, 7]),
        (4, 4, 2, [0]),
        (3, 8, 4, [0]),
        (12, 4, 4, [0, 4, 8]),
    ],
)
def test_window_starts_cover_the_axis(
    length: int, window: int, stride: int, expected: list[int]
) -> None:
    starts = window_starts(length, window, stride)
    assert starts == expected
    covered = set()
    for s in starts:
        covered.update(range(s, min(s + window, length)))
    assert covered == set(range(length))


def test_select_output_kinds() -> None:
    t = torch.zeros(1, 2, 3, 3)
    assert select_output(t) is t
    assert select_output((t, 5)) is t
    assert select_output([t]) is t
    assert select_output({"out": t, "aux": 1}) is t
    assert select_output({"aux": 1, "seg": t}) is t  # the first tensor
    with pytest.raises(ValueError, match="'out' or 'logits'.*--output-key"):
        select_output({"seg": [t]})
    with pytest.raises(ValueError, match="expected a tensor"):
        select_output("x")
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        select_output(torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("window", "stride"), [((8, 8), (5, 6)), ((16, 40), (7, 7)), ((5, 9), None)]
)
def test_slide_equals_whole_for_pointwise_model(
    window: tuple[int, int], stride: tuple[int, int] | None
) -> None:
    model = Pointwise(4).eval()
    x = normalize(pixels(), Preprocess())
    with torch.no_grad():
        whole = forward_whole(model, x)
        slide = forward_slide(model, x, window, stride or window)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)


def test_slide_averages_overlapping_windows() -> None:
    # A model whose output is each window's mean value: overlaps must average these means.
    def window_mean(crop: torch.Tensor) -> torch.Tensor:
        return crop.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *crop.shape[2:])

    x = torch.arange(1 * 3 * 5 * 7, dtype=torch.float32).reshape(1, 3, 5, 7)
    got = forward_slide(window_mean, x, (3, 4), (2, 3))
    total = torch.zeros(5, 7)
    count = torch.zeros(5, 7)
    for top in (0, 2):
        for left in (0, 3):
            total[top : top + 3, left : left + 4] += x[0, :, top : top + 3, left : left + 4].mean()
            count[top : top + 3, left : left + 4] += 1
    torch.testing.assert_close(got[0, 0], total / count)


def test_predict_logits_native_keeps_model_resolution_and_scale_resizes() -> None:
    model = HalfRes(3).eval()
    images = pixels(2, 21, 35)
    native = predict_logits(model, images, Preprocess())
    raw = forward_whole(model, normalize(images, Preprocess()))
    assert native.shape == raw.shape and native.shape[2:] != (21, 35)
    torch.testing.assert_close(native, raw)
    logits = predict_logits(model, images, Preprocess(logits_scale=1.0))
    assert logits.shape == (2, 3, 21, 35) and logits.dtype == torch.float32
    small = predict_logits(model, images, Preprocess(logits_scale=0.5))
    assert small.shape == (2, 3, *logits_size((21, 35), 0.5)) == (2, 3, 10, 18)


def test_predict_logits_does_not_depend_on_batch_size() -> None:
    model = TinyNet(4).eval()
    images = pixels(3)
    together = predict_logits(model, images, Preprocess(window=(8, 8), stride=(6, 6)))
    apart = torch.cat(
        [
            predict_logits(model, images[i : i + 1], Preprocess(window=(8, 8), stride=(6, 6)))
            for i in range(3)
        ]
    )
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)


def test_autocast_refuses_fp16_on_cpu_and_runs_bf16() -> None:
    with pytest.raises(ValueError, match="fp16"), autocast(torch.device("cpu"), "fp16"):
        pass
    model = TinyNet(4).eval()
    images = pixels(1)
    full = predict_logits(model, images, Preprocess())
    half = predict_logits(model, images, Preprocess(), precision="bf16")
    assert half.dtype == torch.float32
    agree = (full.argmax(1) == half.argmax(1)).float().mean()
    assert agree > 0.95


@pytest.mark.parametrize(("device", "precision", "inside"), [
    ("cuda", "fp32", False),  # true float32: TF32 kernels off while the model runs
    ("cuda", "tf32", True),
    ("cpu", "fp32", False),
])  # fmt: skip
def test_precision_sets_tf32_while_the_model_runs_and_restores_it(device, precision, inside):
    # No CUDA call is made for fp32/tf32, so the flags can be checked on any machine.
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    for start in (True, False):
        for f in flags:
            f.allow_tf32 = start
        with autocast(torch.device(device), precision):
            assert [f.allow_tf32 for f in flags] == [inside, inside]
        assert [f.allow_tf32 for f in flags] == [start, start]
    for f, value in zip(flags, before, strict=True):
        f.allow_tf32 = value


class FakeModelOutput(OrderedDict):
    """Like a Hugging Face ``ModelOutput``: an ordered dict whose entries are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class Pair(NamedTuple):
    aux: torch.Tensor
    logits: torch.Tensor


class WithLogits:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.hidden = [logits]


def test_select_output_default_order() -> None:
    t, u = torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)
    assert select_output(FakeModelOutput(loss=u.sum(), logits=t)) is t
    assert select_output({"logits": u, "out": t}) is t  # out first (torchvision), then logits
    assert select_output(WithLogits(t)) is t
    assert select_output(Pair(u, t)) is t  # a named field, not the first element
    assert select_output((5, u, t)) is u  # the first tensor
    assert select_output(((t, u), 1)) is t  # nested
    with pytest.raises(ValueError, match="none is 'out' or 'logits' or a tensor"):
        select_output({"pred": {"logits": t}, "aux": 1})
    assert select_output({"pred": {"logits": t}, "aux": 1}, "pred") is t
    with pytest.raises(ValueError, match="empty list"):
        select_output(())


def test_select_output_with_key() -> None:
    t, u = torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)
    assert select_output({"out": t, "aux": u}, "aux") is u
    assert select_output({"out": t, "aux": u}, "1") is u  # position in the mapping
    assert select_output((t, u), "1") is u and select_output((t, u), "-2") is t
    assert select_output(WithLogits(t), "hidden") is t  # a list: searched again
    assert select_output(FakeModelOutput(logits=t), "logits") is t
    for bad, key in (({"out": t}, "seg"), ((t, u), "2"), ((t, u), "logits"), (t, "x")):
        with pytest.raises(ValueError, match=f"--output-key {key}: not found"):
            select_output(bad, key)
    with pytest.raises(ValueError, match="expected a tensor"):
        select_output({"n": 3}, "n")
    model = OutputKey(lambda x: {"a": x[:, :1], "b": x}, "b")
    x = torch.zeros(2, 3, 4, 5)
    assert model(x) is x
