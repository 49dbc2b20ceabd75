"""Label-free contribution shares (leave-one-out over the UME fusion) and confidence/entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamfuse.inference.contributions import confidence_entropy, leave_one_out_shares


def dirichlet(rng: np.random.Generator, b: int, m: int, c: int, dtype=np.float64) -> np.ndarray:
    return rng.dirichlet(np.ones(c), size=(b, m)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_shares_sum_to_one_over_present_and_zero_for_absent(dtype) -> None:
    rng = np.random.default_rng(0)
    probs = dirichlet(rng, 200, 4, 5, dtype)
    present = rng.random((200, 4)) < 0.7
    shares = leave_one_out_shares(probs, present)
    assert shares.shape == (200, 4)
    assert np.all(shares >= 0) and np.all(shares <= 1 + 1e-6)
    assert np.all(shares[~present] == 0)
    rows = present.any(axis=1)
    np.testing.assert_allclose(shares[rows].sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(shares[~rows] == 0)


def test_row_with_nothing_present_is_all_zero() -> None:
    probs = np.full((2, 3, 2), 0.5)
    present = np.array([[False, False, False], [True, False, True]])
    shares = leave_one_out_shares(probs, present)
    assert shares[0].tolist() == [0.0, 0.0, 0.0]
    assert shares[1].tolist() == [0.5, 0.0, 0.5]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_single_present_modality_gets_everything(which: int) -> None:
    probs = np.array([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]])
    present = np.zeros((1, 3), dtype=bool)
    present[0, which] = True
    shares = leave_one_out_shares(probs, present)
    expected = [0.0, 0.0, 0.0]
    expected[which] = 1.0
    assert shares[0].tolist() == expected


def test_equal_split_when_nobody_raises_the_fused_label() -> None:
    same = np.array([0.25, 0.5, 0.25])  # exact in binary: every leave-one-out difference is exactly 0
    probs = np.stack([same, same, same])[None]  # identical views: removing any changes nothing
    shares = leave_one_out_shares(probs, np.array([[True, True, True]]))
    np.testing.assert_allclose(shares, [[1 / 3, 1 / 3, 1 / 3]])
    shares = leave_one_out_shares(probs, np.array([[True, False, True]]))
    np.testing.assert_allclose(shares, [[0.5, 0.0, 0.5]])
    # same probability for the fused label, different elsewhere: still nobody raises it
    probs = np.array([[[0.5, 0.5, 0.0], [0.5, 0.25, 0.25]]])
    shares = leave_one_out_shares(probs, np.array([[True, True]]))
    np.testing.assert_allclose(shares, [[0.5, 0.5]])


def test_dominating_modality_gets_the_largest_share() -> None:
    probs = np.array([[[0.98, 0.01, 0.01], [0.40, 0.35, 0.25], [0.30, 0.45, 0.25]]])
    shares = leave_one_out_shares(probs, np.ones((1, 3), dtype=bool))
    assert shares[0].argmax() == 0
    assert shares[0, 0] > 0.8
    # the modality that votes against the fused label gets nothing
    assert shares[0, 2] == 0.0


def test_values_by_hand() -> None:
    # UME: fused = (1.7, 1.3) / 3, label 0 with p 0.5667.
    # without image (0.6 + 0.2) / 2 = 0.4 -> 0.1667; without audio (0.9 + 0.2) / 2 = 0.55 -> 0.0167;
    # without series (0.9 + 0.6) / 2 = 0.75 -> negative -> 0.
    probs = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])
    shares = leave_one_out_shares(probs, np.array([[True, True, True]]))
    c = np.array([1.7 / 3 - 0.4, 1.7 / 3 - 0.55, 0.0])
    np.testing.assert_allclose(shares[0], c / c.sum())
    assert shares[0].round(3).tolist() == [0.909, 0.091, 0.0]
    # two modalities agreeing on the label: the stronger one explains the decision
    shares = leave_one_out_shares(probs, np.array([[True, True, False]]))
    np.testing.assert_allclose(shares[0], [1.0, 0.0, 0.0])


def test_absent_modality_probs_do_not_matter() -> None:
    rng = np.random.default_rng(1)
    probs = dirichlet(rng, 10, 3, 4)
    present = np.array([[True, True, False]] * 10)
    noisy = probs.copy()
    noisy[:, 2] = rng.dirichlet(np.ones(4), size=10)
    np.testing.assert_array_equal(leave_one_out_shares(probs, present), leave_one_out_shares(noisy, present))


def test_rows_are_independent() -> None:
    rng = np.random.default_rng(2)
    probs = dirichlet(rng, 16, 3, 3)
    present = rng.random((16, 3)) < 0.8
    batch = leave_one_out_shares(probs, present)
    for i in range(16):
        np.testing.assert_allclose(batch[i], leave_one_out_shares(probs[i:i + 1], present[i:i + 1])[0])


def test_present_accepts_int_mask() -> None:
    probs = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])
    a = leave_one_out_shares(probs, np.array([[1, 1, 0]]))
    b = leave_one_out_shares(probs, np.array([[True, True, False]]))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- confidence / entropy


def test_confidence_entropy_values() -> None:
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.7, 0.2, 0.1, 0.0]])
    conf, ent = confidence_entropy(probs)
    np.testing.assert_allclose(conf, [0.25, 1.0, 0.5, 0.7])
    expected = [math.log(4), 0.0, math.log(2), -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))]
    np.testing.assert_allclose(ent, expected, atol=1e-9)
    assert np.all(np.isfinite(ent))  # zeros are clipped, never log(0)


def test_confidence_entropy_keeps_leading_shape() -> None:
    rng = np.random.default_rng(3)
    probs = dirichlet(rng, 5, 3, 7)
    conf, ent = confidence_entropy(probs)
    assert conf.shape == ent.shape == (5, 3)
    assert np.all(ent >= 0) and np.all(ent <= math.log(7) + 1e-9)
    np.testing.assert_allclose(conf, probs.max(axis=-1))
