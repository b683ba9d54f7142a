import numpy as np
import pytest
import torch

from blda_posthoc.core.priors import (
    bbse_priors,
    bbse_weights,
    em_iterate,
    em_priors,
    em_step,
    logit_adjustment,
    prior_shift,
    smooth_counts,
)

SOURCE = np.array([0.4, 0.3, 0.2, 0.1])
TARGET = np.array([0.1, 0.2, 0.3, 0.4])
MEANS = 1.5 * np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


def gaussian_case(seed: int, n: int, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels y ~ prior, x ~ N(MEANS[y], I); exact posteriors under SOURCE (a calibrated model)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(prior), size=n, p=prior)
    x = MEANS[y] + rng.normal(size=(n, 2))
    log_lik = -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(-1)
    log_post = log_lik + np.log(SOURCE)
    post = np.exp(log_post - log_post.max(1, keepdims=True))
    return post / post.sum(1, keepdims=True), y


def reference_em(probs, source, max_iter=1000, tol=1e-8):
    """A direct loop in log space."""
    est = source.copy()
    for it in range(1, max_iter + 1):
        log_q = np.log(probs) + np.log(est) - np.log(source)
        log_q -= log_q.max(1, keepdims=True)
        q = np.exp(log_q)
        new = (q / q.sum(1, keepdims=True)).mean(0)
        done = np.abs(new - est).max() < tol
        est = new
        if done:
            return est, it
    return est, max_iter


def test_em_matches_direct_loop():
    probs, _ = gaussian_case(0, 5000, TARGET)
    est, iterations = em_priors(probs, SOURCE)
    ref, ref_iterations = reference_em(probs, SOURCE)
    np.testing.assert_allclose(est, ref, atol=1e-12)
    assert iterations == ref_iterations and 1 < iterations < 1000
    assert est.dtype == np.float64 and est.sum() == pytest.approx(1.0)


def test_em_recovers_target_priors():
    probs, y = gaussian_case(1, 100_000, TARGET)
    est, _ = em_priors(torch.from_numpy(probs).float(), SOURCE)
    np.testing.assert_allclose(est, TARGET, atol=0.01)
    # and is a real improvement over the plain mean of the posteriors
    assert np.abs(probs.mean(0) - TARGET).max() > 0.05


def test_em_stays_put_when_target_equals_source():
    probs, _ = gaussian_case(2, 100_000, SOURCE)
    est, _ = em_priors(probs, SOURCE)
    np.testing.assert_allclose(est, SOURCE, atol=0.01)
    # posteriors whose mean is exactly the source prior: a fixed point after one pass
    exact = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.3, 0.1], [0.4, 0.3, 0.2, 0.1]])
    exact = np.concatenate([exact, [4 * SOURCE - exact.sum(0)]])
    est, iterations = em_priors(exact, SOURCE)
    np.testing.assert_allclose(est, SOURCE, atol=1e-12)
    assert iterations == 1


def test_em_chunked_equals_unchunked():
    probs, _ = gaussian_case(3, 10_000, TARGET)
    current = np.array([0.25, 0.25, 0.3, 0.2])
    whole = em_step(probs, SOURCE, current)
    chunks = np.array_split(probs, [1, 777, 5000])
    np.testing.assert_allclose(sum(em_step(c, SOURCE, current) for c in chunks), whole, rtol=1e-12)
    np.testing.assert_allclose(whole.sum(), len(probs), rtol=1e-12)

    def chunked_pass(est):
        return sum(em_step(torch.from_numpy(c), SOURCE, est) for c in chunks)

    est, iterations = em_iterate(chunked_pass, SOURCE)
    ref, ref_iterations = em_priors(probs, SOURCE)
    np.testing.assert_allclose(est, ref, atol=1e-12)
    assert iterations == ref_iterations


def test_em_stops_at_max_iter_and_tol():
    probs, _ = gaussian_case(4, 2000, TARGET)
    est, iterations = em_priors(probs, SOURCE, max_iter=3)
    ref, _ = reference_em(probs, SOURCE, max_iter=3)
    assert iterations == 3
    np.testing.assert_allclose(est, ref, atol=1e-12)
    _, loose = em_priors(probs, SOURCE, tol=1e-2)
    _, tight = em_priors(probs, SOURCE, tol=1e-10)
    assert loose < tight


def test_em_step_skips_pixels_with_no_weighted_mass():
    probs = np.array([[0.0, 1.0], [0.5, 0.5]])
    np.testing.assert_allclose(em_step(probs, [0.5, 0.5], [1.0, 0.0]), [1.0, 0.0])


def test_em_rejects_bad_input():
    with pytest.raises(ValueError, match="zero for class"):
        em_priors(np.full((3, 2), 0.5), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        em_priors(np.full((3, 3), 0.5), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        em_step(np.array([[1.5, -0.5]]), [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="max_iter"):
        em_priors(np.full((3, 2), 0.5), np.array([0.5, 0.5]), max_iter=0)


def test_smooth_counts_adds_alpha():
    counts = np.array([10, 0, 5, 85])
    np.testing.assert_allclose(smooth_counts(counts), (counts + 1) / 104)
    np.testing.assert_allclose(smooth_counts(counts, alpha=0.5), (counts + 0.5) / 102)
    np.testing.assert_allclose(smooth_counts(counts, alpha=0.0), counts / 100)
    np.testing.assert_allclose(smooth_counts(np.zeros(4)), np.full(4, 0.25))
    with pytest.raises(ValueError):
        smooth_counts(np.array([1, -1]))
    with pytest.raises(ValueError):
        smooth_counts(np.zeros(3), alpha=0.0)


def test_prior_shift_is_log_ratio_and_refuses_zeros():
    np.testing.assert_allclose(prior_shift(SOURCE, TARGET), np.log(TARGET / SOURCE), rtol=1e-12)
    # counts are normalised
    np.testing.assert_allclose(prior_shift(SOURCE * 7, TARGET * 3), np.log(TARGET / SOURCE))
    np.testing.assert_allclose(prior_shift(SOURCE, SOURCE), 0.0, atol=1e-15)
    with pytest.raises(ValueError, match=r"zero for class\(es\) \[1\].*smooth_counts"):
        prior_shift(SOURCE, np.array([5, 0, 3, 2]))
    shift = prior_shift(SOURCE, smooth_counts(np.array([5, 0, 3, 2])))
    assert np.isfinite(shift).all()
    with pytest.raises(ValueError, match="shape"):
        prior_shift(SOURCE, TARGET[:3])


def test_prior_shift_turns_source_posteriors_into_target_posteriors():
    # Bayes: p_tgt(c|x) ∝ p_src(c|x) π_tgt(c) / π_src(c)
    probs, _ = gaussian_case(5, 20, SOURCE)
    shifted = torch.softmax(torch.from_numpy(np.log(probs) + prior_shift(SOURCE, TARGET)), 1)
    direct = probs * TARGET / SOURCE
    np.testing.assert_allclose(shifted.numpy(), direct / direct.sum(1, keepdims=True), rtol=1e-10)


def test_logit_adjustment():
    np.testing.assert_array_equal(logit_adjustment(SOURCE, TARGET, 0.0), np.zeros(4))
    np.testing.assert_allclose(
        logit_adjustment(SOURCE, TARGET, 0.5), 0.5 * (np.log(SOURCE) - np.log(TARGET)), rtol=1e-12
    )
    np.testing.assert_allclose(logit_adjustment(SOURCE, TARGET, 1.0), -prior_shift(SOURCE, TARGET))
    # an over-predicted class (target share above its source share) is lowered
    shift = logit_adjustment(SOURCE, TARGET, 1.0)
    assert shift[3] < 0 < shift[0]


def confusion_case(seed: int = 0) -> np.ndarray:
    """M[i, j] = P(pred = i | y = j), columns sum to 1, diagonally dominant (invertible)."""
    rng = np.random.default_rng(seed)
    m = rng.random((4, 4)) + 4 * np.eye(4)
    return m / m.sum(0, keepdims=True)


def test_bbse_recovers_constructed_weights():
    m = confusion_case()
    joint = m * SOURCE[None, :]
    shares = m @ TARGET
    np.testing.assert_allclose(bbse_weights(joint, shares), TARGET / SOURCE, rtol=1e-10)
    # counts give the same weights
    np.testing.assert_allclose(bbse_weights(joint * 1e6, shares * 123), TARGET / SOURCE, rtol=1e-10)
    np.testing.assert_allclose(bbse_priors(joint, shares), TARGET, rtol=1e-10)
    # reference: the explicit inverse
    np.testing.assert_allclose(bbse_weights(joint, shares), np.linalg.inv(joint) @ shares)


def test_bbse_on_sampled_predictions():
    m = confusion_case(1)
    rng = np.random.default_rng(2)

    def predict(y):
        return (m[:, y].cumsum(0) > rng.random(len(y))).argmax(0)

    y_src = rng.choice(4, 200_000, p=SOURCE)
    joint = np.zeros((4, 4))
    np.add.at(joint, (predict(y_src), y_src), 1)
    y_tgt = rng.choice(4, 200_000, p=TARGET)
    shares = np.bincount(predict(y_tgt), minlength=4)
    np.testing.assert_allclose(bbse_priors(joint, shares), TARGET, atol=0.01)


def test_bbse_clips_negative_weights_and_handles_singular_confusion():
    m = confusion_case()
    joint = m * SOURCE[None, :]
    shares = np.array([1.0, 0.0, 0.0, 0.0])  # outside the cone of M: some weight negative
    raw = np.linalg.solve(joint, shares)
    assert raw.min() < 0
    np.testing.assert_allclose(bbse_weights(joint, shares), np.clip(raw, 0, None), atol=1e-12)
    # a class never labelled nor predicted: singular system, minimum-norm weight 0 for it
    joint[:, 2] = 0
    joint[2, :] = 0
    joint /= joint.sum()
    target = np.array([0.5, 0.3, 0.0, 0.2])
    expected = np.divide(target, joint.sum(0), out=np.zeros(4), where=joint.sum(0) > 0)
    weights = bbse_weights(joint, joint @ expected)
    np.testing.assert_allclose(weights, expected, atol=1e-10)
    np.testing.assert_allclose(bbse_priors(joint, joint @ expected), target, atol=1e-10)
    with pytest.raises(ValueError, match="shape"):
        bbse_weights(joint[:3], shares)
