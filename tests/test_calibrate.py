import numpy as np
import pytest
import torch

from blda_posthoc.core.calibrate import (
    CALIBRATIONS,
    Calibration,
    fit_calibration,
    sample_pixels,
)


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def draw_case(
    seed: int, n: int, scale: np.ndarray, bias: np.ndarray, spread: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """Logits z ~ N(0, spread) and labels y ~ softmax(scale * z + bias)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, spread, (n, scale.size))
    p = softmax(scale * z + bias)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


def cross_entropy(z: np.ndarray, y: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> float:
    p = softmax(scale * z + bias)
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def reference_fit(
    z: np.ndarray, y: np.ndarray, kind: str, weight_decay: float = 0.0, steps: int = 3000
) -> tuple[np.ndarray, np.ndarray]:
    """Plain full-batch gradient descent on the same objective, biases centred at the end."""
    n, c = z.shape
    onehot = np.eye(c)[y]
    a = np.ones(1 if kind == "temperature" else c)
    b = np.zeros(c)
    for _ in range(steps):
        g = (softmax(a * z + b) - onehot) / n
        grad_a, grad_b = (g * z).sum(0), g.sum(0)
        if kind == "temperature":
            a = a - 0.3 * (grad_a.sum() + weight_decay * (a - 1))
        else:
            b = b - (grad_b + weight_decay * b)
            if kind == "vector":
                a = a - (grad_a + weight_decay * (a - 1))
    return np.broadcast_to(a, (c,)), b - b.mean()


SKEWED = (np.array([0.6, 0.9, 1.3]), np.array([0.5, 0.0, -0.5]))


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_fit_matches_gradient_descent_reference(kind, weight_decay):
    z, y = draw_case(1, 400, *SKEWED)
    cal = fit_calibration(z, y, kind, weight_decay=weight_decay)
    scale, bias = reference_fit(z, y, kind, weight_decay)
    np.testing.assert_allclose(cal.scale, scale, atol=1e-5)
    np.testing.assert_allclose(cal.bias, bias, atol=1e-5)
    assert cal.kind == kind
    assert cal.loss == pytest.approx(cross_entropy(z, y, cal.scale, cal.bias), rel=1e-12)


def test_parameter_layout_per_kind():
    z, y = draw_case(2, 500, *SKEWED)
    temp = fit_calibration(z, y, "temperature")
    assert np.all(temp.scale == temp.scale[0]) and np.all(temp.bias == 0)
    bias = fit_calibration(z, y, "bias")
    assert np.all(bias.scale == 1) and bias.bias.sum() == pytest.approx(0, abs=1e-12)
    vec = fit_calibration(z, y, "vector")
    assert len(set(vec.scale.tolist())) == 3 and vec.bias.sum() == pytest.approx(0, abs=1e-12)
    for cal in (temp, bias, vec):
        assert cal.scale.dtype == cal.bias.dtype == np.float64
        assert cal.scale.shape == cal.bias.shape == (3,)


def test_temperature_recovers_known_scale():
    true = np.full(5, 0.5)
    z, y = draw_case(3, 60_000, true, np.zeros(5))
    cal = fit_calibration(torch.from_numpy(z).float(), torch.from_numpy(y), "temperature")
    assert cal.scale[0] == pytest.approx(0.5, rel=0.03)


def test_vector_scaling_recovers_known_scale_and_bias():
    scale, bias = np.array([0.5, 0.8, 1.0, 1.2, 1.5]), np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    z, y = draw_case(4, 60_000, scale, bias)
    cal = fit_calibration(z, y, "vector")
    np.testing.assert_allclose(cal.scale, scale, atol=0.05)
    np.testing.assert_allclose(cal.bias, bias, atol=0.05)
    bias_only = fit_calibration(*draw_case(5, 60_000, np.ones(5), bias), "bias")
    np.testing.assert_allclose(bias_only.bias, bias, atol=0.05)


@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_calibrated_data_gives_identity(kind):
    z, y = draw_case(6, 40_000, np.ones(4), np.zeros(4))
    cal = fit_calibration(z, y, kind)
    np.testing.assert_allclose(cal.scale, 1.0, atol=0.05)
    np.testing.assert_allclose(cal.bias, 0.0, atol=0.05)


def test_over_confident_logits_get_a_temperature_above_one():
    z, y = draw_case(7, 5000, np.full(4, 0.4), np.zeros(4))
    fitted = fit_calibration(z, y, "temperature")
    assert 1 / fitted.scale[0] > 2.0
    assert fitted.loss < cross_entropy(z, y, np.ones(4), np.zeros(4))


@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_fit_is_deterministic_and_input_type_does_not_matter(kind):
    z, y = draw_case(8, 3000, *SKEWED)
    first = fit_calibration(z, y, kind)
    again = fit_calibration(z, y, kind)
    as_tensor = fit_calibration(torch.from_numpy(z), torch.from_numpy(y).to(torch.uint8), kind)
    for other in (again, as_tensor):
        np.testing.assert_array_equal(first.scale, other.scale)
        np.testing.assert_array_equal(first.bias, other.bias)
        assert first.loss == other.loss


@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_ignored_and_out_of_range_labels_are_dropped(kind):
    z, y = draw_case(9, 2000, *SKEWED)
    junk = np.random.default_rng(0).normal(0, 5, (30, 3))
    z_all = np.concatenate([z[:1000], junk, z[1000:]])
    y_all = np.concatenate([y[:1000], np.repeat([255, 3, -1], 10), y[1000:]])
    clean, noisy = fit_calibration(z, y, kind), fit_calibration(z_all, y_all, kind)
    np.testing.assert_array_equal(clean.scale, noisy.scale)
    np.testing.assert_array_equal(clean.bias, noisy.bias)
    assert clean.loss == noisy.loss


@pytest.mark.parametrize("kind", ["vector", "bias"])
def test_absent_class_keeps_scale_one_and_lowest_present_bias(kind):
    scale, bias = np.array([0.7, 1.0, 1.0, 1.3]), np.array([0.4, -0.2, -9.0, 0.1])
    z, y = draw_case(10, 4000, scale, bias)
    y[y == 2] = 255  # class 2 never labelled
    cal = fit_calibration(z, y, kind)
    present = [0, 1, 3]
    assert np.isfinite(cal.bias).all() and cal.scale[2] == 1.0
    assert cal.bias[2] == cal.bias[present].min()
    # the present classes are fitted as the 3-class problem without class 2
    keep = y != 255
    reduced = fit_calibration(z[keep][:, present], np.searchsorted(present, y[keep]), kind)
    np.testing.assert_allclose(cal.scale[present], reduced.scale, atol=1e-12)
    np.testing.assert_allclose(cal.bias[present], reduced.bias, atol=1e-12)
    assert cal.loss == pytest.approx(cross_entropy(z[keep], y[keep], cal.scale, cal.bias))


def test_temperature_with_absent_class_fits_on_all_classes():
    z, y = draw_case(11, 3000, np.full(4, 0.5), np.zeros(4))
    y[y == 3] = 255
    cal = fit_calibration(z, y, "temperature")
    keep = y != 255
    a, _ = reference_fit(z[keep], y[keep], "temperature")
    np.testing.assert_allclose(cal.scale, a, atol=1e-5)


def test_large_weight_decay_pins_the_identity():
    z, y = draw_case(12, 2000, *SKEWED)
    cal = fit_calibration(z, y, "vector", weight_decay=1e6)
    np.testing.assert_allclose(cal.scale, 1.0, atol=1e-5)
    np.testing.assert_allclose(cal.bias, 0.0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_on_pixels_and_images_agree(dtype):
    cal = Calibration("vector", np.array([0.5, 1.0, 2.0]), np.array([1.0, 0.0, -1.0]), loss=0.0)
    image = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    pixels = image.permute(1, 2, 0).reshape(-1, 3)
    out_image, out_pixels = cal.apply(image, dim=0), cal.apply(pixels)
    assert out_image.dtype == out_pixels.dtype == dtype
    assert out_image.shape == image.shape and out_image.device == image.device
    torch.testing.assert_close(out_image.permute(1, 2, 0).reshape(-1, 3), out_pixels)
    expected = pixels.double().numpy() * cal.scale + cal.bias
    np.testing.assert_allclose(out_pixels.double().numpy(), expected, rtol=1e-6)


def test_apply_of_fitted_map_reproduces_its_loss():
    z, y = draw_case(13, 1000, *SKEWED)
    cal = fit_calibration(z, y, "vector")
    out = cal.apply(torch.from_numpy(z))
    loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(y))
    assert float(loss) == pytest.approx(cal.loss, rel=1e-12)


def test_bad_input_is_rejected():
    z, y = draw_case(14, 50, *SKEWED)
    with pytest.raises(ValueError, match="kind"):
        fit_calibration(z, y, "platt")
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        fit_calibration(z[:, 0], y, "bias")
    with pytest.raises(ValueError, match="integer"):
        fit_calibration(z, y.astype(float), "bias")
    with pytest.raises(ValueError, match=r"shape \(50,\)"):
        fit_calibration(z, y[:10], "bias")
    with pytest.raises(ValueError, match="no labelled pixels"):
        fit_calibration(z, np.full(50, 255), "bias")
    z[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fit_calibration(z, y, "bias")
    with pytest.raises(ValueError, match="max_iter"):
        fit_calibration(z, y, "bias", max_iter=0)
    with pytest.raises(ValueError, match="shape"):
        Calibration("bias", np.ones(3), np.zeros(2), loss=0.0)
    with pytest.raises(ValueError, match="kind"):
        Calibration("platt", np.ones(3), np.zeros(3), loss=0.0)
    cal = Calibration("bias", np.ones(3), np.zeros(3), loss=0.0)
    with pytest.raises(ValueError, match="3 classes"):
        cal.apply(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="floating"):
        cal.apply(torch.zeros(4, 3, dtype=torch.int64))


def test_calibration_arrays_are_read_only_copies():
    scale = np.ones(3)
    cal = Calibration("bias", scale, np.zeros(3), loss=0.0)
    scale[0] = 5.0
    assert cal.scale[0] == 1.0
    with pytest.raises(ValueError):
        cal.bias[0] = 1.0


def test_sample_pixels_is_seeded_sorted_and_unique():
    first = sample_pixels(1_000_000, 5000, seed=3)
    np.testing.assert_array_equal(first, sample_pixels(1_000_000, 5000, seed=3))
    assert first.dtype == np.int64 and first.shape == (5000,)
    assert np.all(np.diff(first) > 0) and first[0] >= 0 and first[-1] < 1_000_000
    assert not np.array_equal(first, sample_pixels(1_000_000, 5000, seed=4))
    # roughly uniform: each tenth of the range gets its share
    shares = np.bincount(first // 100_000, minlength=10) / 5000
    np.testing.assert_allclose(shares, 0.1, atol=0.02)


def test_sample_pixels_takes_all_when_asked_for_as_many_or_more():
    np.testing.assert_array_equal(sample_pixels(7, 7, seed=0), np.arange(7))
    np.testing.assert_array_equal(sample_pixels(7, 100, seed=1), np.arange(7))
    assert sample_pixels(0, 5, seed=0).shape == (0,)
    assert sample_pixels(10, 0, seed=0).shape == (0,)
    with pytest.raises(ValueError):
        sample_pixels(10, -1, seed=0)


def test_label_255_is_ignored_even_with_more_than_255_classes():
    rng = np.random.default_rng(15)
    z = rng.normal(size=(600, 260))
    y = rng.integers(0, 260, 600)
    y[:100] = 255
    cal = fit_calibration(z, y, "bias", max_iter=5)
    keep = y != 255
    assert cal.bias[255] == cal.bias.min()  # class 255 is absent from the fit
    assert cal.loss == pytest.approx(cross_entropy(z[keep], y[keep], cal.scale, cal.bias))


def test_a_fit_with_a_negative_scale_is_fitted_again_with_a_pull_to_the_identity():
    """Class 1's logit ranks it against its labels: the plain vector fit's scale for it is
    below 0, which stats files refuse; fit-stats refits with a pull and keeps every scale > 0."""
    from blda_posthoc.core.fit import PixelSample
    from blda_posthoc.pipelines.fit_stats import fit_calibrations

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=3000)
    logits = rng.normal(size=(3000, 3)).astype(np.float32)
    logits[np.arange(3000), labels] += 2.0
    logits[:, 1] -= 3.0 * (labels == 1)  # anti-correlated with its own class
    plain = fit_calibration(logits, labels, "vector")
    assert (plain.scale <= 0).any()  # the case the refit is for
    fits = fit_calibrations(PixelSample(logits, labels.astype(np.uint8)))
    assert "vector" in fits
    scale, _ = fits["vector"]
    assert (scale > 0).all()
