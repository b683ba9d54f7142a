"""Metrics against hand-computed confusion matrices and an independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blda_posthoc.core.evaluate import (
    CalibrationError,
    ConfusionMatrix,
    softmax_confidence,
    summarize,
)


def approx(value: float) -> object:
    return pytest.approx(value, abs=1e-9)


def test_hand_case_with_ignore_and_absent_class() -> None:
    # Class 3 occurs only under ignore pixels: absent from both prediction and label.
    label = np.array([0, 0, 0, 1, 1, 2, 255, 255], dtype=np.uint8)
    pred = np.array([0, 0, 1, 1, 2, 2, 3, 0], dtype=np.uint8)
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    expected = np.zeros((4, 5), dtype=np.int64)
    expected[0, :4] = [2, 1, 0, 0]
    expected[1, :4] = [0, 1, 1, 0]
    expected[2, :4] = [0, 0, 1, 0]
    np.testing.assert_array_equal(cm.compute(), expected)

    s = summarize(cm.compute())
    assert s["num_pixels"] == 6
    assert s["iou"][:3] == [approx(200 / 3), approx(100 / 3), approx(50.0)]
    assert s["iou"][3] is None
    assert s["miou"] == approx(50.0)  # mean over 3 classes, not 4 with a zero
    assert s["acc"] == [approx(200 / 3), approx(50.0), approx(100.0), None]
    assert s["macc"] == approx((200 / 3 + 50 + 100) / 3)
    assert s["pixel_acc"] == approx(400 / 6)
    assert s["iou_std"] == approx(np.std([200 / 3, 100 / 3, 50.0]))
    # Bias(l) = mean_c P(pred=l | y=c) - 1/3 over the 3 labelled classes.
    assert s["bias"] == [approx(-100 / 9), approx(-100 / 18), approx(100 / 6), None]
    assert s["pred_true_ratio"] == [approx(2 / 3), approx(1.0), approx(2.0), None]
    assert s["labelled_pixels"] == [3, 2, 1, 0]
    assert s["predicted_pixels"] == [2, 2, 2, 0]
    assert s["out_of_range_pixels"] == 0


def test_class_predicted_but_not_labelled_has_iou_zero() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 2], [1, 1]]), np.array([[0, 0], [1, 1]]))
    s = summarize(cm.compute())
    assert s["iou"] == [approx(50.0), approx(100.0), approx(0.0)]
    assert s["miou"] == approx(50.0)
    assert s["acc"] == [approx(50.0), approx(100.0), None]
    assert s["macc"] == approx(75.0)
    assert s["bias"] == [approx(-25.0), approx(0.0), None]
    assert s["pred_true_ratio"] == [approx(0.5), approx(1.0), None]


def test_out_of_range_prediction_is_a_false_negative() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 7, 1, -1]), torch.tensor([0, 0, 1, 255]))
    np.testing.assert_array_equal(cm.compute(), [[1, 0, 1], [0, 1, 0]])
    s = summarize(cm.compute())
    assert s["iou"] == [approx(50.0), approx(100.0)]
    assert s["acc"] == [approx(50.0), approx(100.0)]
    assert s["bias"] == [approx(-25.0), approx(0.0)]
    assert s["out_of_range_pixels"] == 1


def test_square_matrix_accepted_and_empty_matrix_undefined() -> None:
    s = summarize(np.array([[3, 1], [0, 4]]))
    assert s["iou"] == [approx(75.0), approx(80.0)]
    empty = summarize(np.zeros((3, 4), dtype=np.int64))
    assert empty["miou"] is None and empty["macc"] is None and empty["pixel_acc"] is None
    assert empty["iou"] == [None, None, None]


def test_bad_inputs_raise() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label value 5"):
        cm.update(np.zeros(2, dtype=np.int64), np.array([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros(2), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="confusion matrix"):
        summarize(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(4))


def reference_metrics(pred: np.ndarray, label: np.ndarray, c: int) -> dict[str, list[float]]:
    """Per-class metrics from boolean masks, without any confusion matrix."""
    valid = label != 255
    present = [k for k in range(c) if ((label == k) & valid).any()]
    out: dict[str, list[float]] = {"iou": [], "acc": [], "bias": [], "ratio": []}
    for k in range(c):
        p, y = (pred == k) & valid, label == k
        union = (p | y).sum()
        out["iou"].append(100.0 * (p & y).sum() / union if union else np.nan)
        out["acc"].append(100.0 * (p & y).sum() / y.sum() if y.sum() else np.nan)
        out["ratio"].append(p.sum() / y.sum() if y.sum() else np.nan)
        rates = [((pred == k) & (label == j)).sum() / (label == j).sum() for j in present]
        out["bias"].append(100.0 * (np.mean(rates) - 1 / len(present)) if y.sum() else np.nan)
    return out


def as_float(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = 6
    label = rng.integers(0, c - 1, size=(5, 40, 30)).astype(np.uint8)  # class 5 never labelled
    label[rng.random(label.shape) < 0.1] = 255
    pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, c, label.shape))
    pred = np.where(label == 255, rng.integers(0, c, label.shape), pred).astype(np.int64)
    cm = ConfusionMatrix(c)
    cm.update(pred, label)
    s = summarize(cm.compute())
    ref = reference_metrics(pred, label, c)
    for key, ours in (
        ("iou", "iou"),
        ("acc", "acc"),
        ("bias", "bias"),
        ("ratio", "pred_true_ratio"),
    ):
        np.testing.assert_allclose(as_float(s[ours]), ref[key], atol=1e-9)  # type: ignore[literal-required]
    assert s["miou"] == approx(np.nanmean(ref["iou"]))
    assert s["macc"] == approx(np.nanmean(ref["acc"]))
    assert s["iou_std"] == approx(np.nanstd(ref["iou"]))
    valid = label != 255
    assert s["pixel_acc"] == approx(100.0 * (pred == label)[valid].mean())


def test_chunked_updates_and_merge_equal_one_pass() -> None:
    rng = np.random.default_rng(7)
    label = rng.integers(0, 5, size=(4, 17, 23)).astype(np.uint8)
    label[rng.random(label.shape) < 0.05] = 255
    pred = rng.integers(-1, 7, size=label.shape)
    whole = ConfusionMatrix(5)
    whole.update(pred, label)
    chunked = ConfusionMatrix(5)
    for start in range(0, label.size, 97):
        chunked.update(pred.ravel()[start : start + 97], label.ravel()[start : start + 97])
    np.testing.assert_array_equal(chunked.compute(), whole.compute())
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred[:1], label[:1])
    b.update(torch.from_numpy(pred[1:]), torch.from_numpy(label[1:]))
    np.testing.assert_array_equal(a.merge(b).compute(), whole.compute())
    assert whole.compute().sum() == (label != 255).sum()


def test_resized_folds_high_predictions_into_wrong() -> None:
    cm = ConfusionMatrix(255)
    cm.update(np.array([0, 1, 9, 2]), np.array([0, 1, 1, 255]))
    assert cm.largest_id() == 9 and cm.largest_label() == 1
    small = cm.resized(2)
    np.testing.assert_array_equal(small.compute(), [[1, 0, 0], [0, 1, 1]])
    with pytest.raises(ValueError, match="beyond"):
        cm.resized(1)


def test_ece_hand_case() -> None:
    ece = CalibrationError(num_bins=15)
    ece.update_confidence(np.array([0.05, 0.5, 0.52, 0.95, 1.0]), np.array([0, 1, 0, 1, 1]))
    # bins: {0.05: wrong}, {0.5 right, 0.52 wrong}, {0.95 right, 1.0 right}
    assert ece.compute() == pytest.approx(100 * (0.05 + 2 * 0.01 + 2 * 0.025) / 5)


def test_ece_from_probabilities_skips_ignore_and_merges() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    ece = CalibrationError()
    ece.update(probs, torch.tensor([0, 0, 255]))
    assert ece.compute() == pytest.approx(100 * (0.1 + 0.7) / 2)
    assert CalibrationError().compute() is None
    one, two = CalibrationError(), CalibrationError()
    one.update(probs[:1], np.array([0]))
    two.update(probs[1:], np.array([0, 255]))
    assert one.merge(two).compute() == pytest.approx(ece.compute())


def test_softmax_confidence_matches_torch_softmax() -> None:
    scores = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0)) * 3
    conf, pred = softmax_confidence(scores)
    ref = torch.softmax(scores, dim=0)
    torch.testing.assert_close(conf, ref.max(0).values)
    torch.testing.assert_close(pred, ref.argmax(0))


def test_prediction_of_255_counts_as_wrong_by_default() -> None:
    # Labels 0 0 1 1; the second pixel of each class is predicted 255 (ignore).
    label = np.array([0, 0, 1, 1], dtype=np.uint8)
    pred = np.array([0, 255, 1, 255], dtype=np.uint8)
    cm = ConfusionMatrix(2)
    cm.update(pred, label)
    expected = np.array([[1, 0, 1], [0, 1, 1]], dtype=np.int64)
    np.testing.assert_array_equal(cm.compute(), expected)
    s = summarize(cm.compute())
    assert s["num_pixels"] == 4 and s["out_of_range_pixels"] == 2
    assert s["iou"] == [approx(50.0), approx(50.0)]
    assert s["acc"] == [approx(50.0), approx(50.0)]
    assert s["pixel_acc"] == approx(50.0)
    assert cm.ignored_pred_pixels == 0


def test_prediction_of_255_is_skipped_with_ignore_pred_ignore() -> None:
    label = np.array([0, 0, 1, 1, 255], dtype=np.uint8)
    pred = np.array([0, 255, 1, 255, 255], dtype=np.uint8)
    cm = ConfusionMatrix(2, ignore_pred_ignore=True)
    cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    np.testing.assert_array_equal(cm.compute(), np.array([[1, 0, 0], [0, 1, 0]]))
    s = summarize(cm.compute())
    assert s["num_pixels"] == 2 and s["out_of_range_pixels"] == 0
    assert s["miou"] == approx(100.0) and s["pixel_acc"] == approx(100.0)
    # The pixel whose label is ignore too is not counted as a skipped prediction.
    assert cm.ignored_pred_pixels == 2


def test_ignore_pred_ignore_equals_masking_the_label_where_the_prediction_is_255() -> None:
    # The definition relabel's quality report uses: score only the pixels the set keeps.
    rng = np.random.default_rng(3)
    label = rng.integers(0, 5, size=(40, 30)).astype(np.uint8)
    label[rng.random(label.shape) < 0.1] = 255
    pred = rng.integers(0, 5, size=label.shape).astype(np.uint8)
    pred[rng.random(label.shape) < 0.3] = 255
    pred[rng.random(label.shape) < 0.05] = 7  # out of range: still wrong either way
    skipping = ConfusionMatrix(5, ignore_pred_ignore=True)
    skipping.update(pred, label)
    masked = ConfusionMatrix(5)
    masked.update(pred, np.where(pred == 255, 255, label).astype(np.uint8))
    np.testing.assert_array_equal(skipping.compute(), masked.compute())
    assert skipping.compute()[:, 5].sum() == ((pred == 7) & (label != 255)).sum() > 0
    assert skipping.ignored_pred_pixels == ((pred == 255) & (label != 255)).sum()
    # Merging and resizing keep the setting and the count.
    half = ConfusionMatrix(5, ignore_pred_ignore=True)
    half.update(pred[:20], label[:20])
    rest = ConfusionMatrix(5, ignore_pred_ignore=True)
    rest.update(pred[20:], label[20:])
    merged = half.merge(rest)
    np.testing.assert_array_equal(merged.compute(), skipping.compute())
    assert merged.ignored_pred_pixels == skipping.ignored_pred_pixels
    assert skipping.resized(5).ignored_pred_pixels == skipping.ignored_pred_pixels
    with pytest.raises(ValueError, match="ignore settings differ"):
        ConfusionMatrix(5).merge(skipping)


def test_ece_confidence_on_an_inner_bin_edge_falls_in_the_lower_bin() -> None:
    """Bins are ``((b-1)/B, b/B]``: 0.5 with 2 bins is in the lower bin, with 0.25."""
    ece = CalibrationError(num_bins=2)
    ece.update_confidence(np.array([0.25, 0.5, 0.75]), np.array([1, 0, 1]))
    np.testing.assert_array_equal(ece.count, [2, 1])
    # lower bin: accuracy 1/2, mean confidence 0.375; upper: accuracy 1, confidence 0.75.
    assert ece.compute() == pytest.approx(100 * (2 * 0.125 + 1 * 0.25) / 3)
