"""Contribution math: the subset table, leave-one-out shares and exact Shapley values."""

from __future__ import annotations

import numpy as np
import pytest

from streamfuse.inference.contributions import (
    confidence_entropy, leave_one_out_shares, shapley_values, subset_masks, subset_table,
)


def ume_game(probs: np.ndarray, players: np.ndarray):
    """The UME fusion over a [B, M, C] tensor, its fused labels and its subset table."""
    c = probs.shape[-1]

    def fuse(use):  # rows are subset-major copies of the B samples
        p = np.tile(probs, (len(use) // len(probs), 1, 1))
        w = use[..., None].astype(float)
        k = w.sum(axis=1)
        return np.where(k > 0, (p * w).sum(axis=1) / np.maximum(k, 1), 1.0 / c)

    fused, values = subset_table(fuse, players)
    np.testing.assert_array_equal(fused, fuse(players))
    return values, fuse, fused.argmax(axis=1)


def random_case(seed: int, b: int = 100, m: int = 3, c: int = 4):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c), size=(b, m))
    players = rng.random((b, m)) < 0.75
    return probs, players


def test_subset_masks_cover_every_subset_once() -> None:
    masks = subset_masks(3)
    assert masks.shape == (8, 3)
    assert len({tuple(r) for r in masks.tolist()}) == 8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loo_shares_sum_to_one_over_players_and_zero_elsewhere(seed: int) -> None:
    probs, players = random_case(seed)
    values, _, _ = ume_game(probs, players)
    shares = leave_one_out_shares(values, players)
    assert np.all(shares >= 0)
    assert np.all(shares[~players] == 0)
    rows = players.any(axis=1)
    np.testing.assert_allclose(shares[rows].sum(axis=1), 1.0)
    assert np.all(shares[~rows] == 0)


def test_single_player_gets_everything() -> None:
    probs = np.array([[[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]]])
    players = np.array([[False, True, False]])
    values, _, _ = ume_game(probs, players)
    assert leave_one_out_shares(values, players).tolist() == [[0.0, 1.0, 0.0]]
    phi = shapley_values(values, players)
    np.testing.assert_allclose(phi, [[0.0, 0.4, 0.0]])  # 0.9 - uniform 0.5


def test_equal_split_when_no_player_raises_the_label() -> None:
    probs = np.array([[[0.6, 0.4], [0.6, 0.4]]])  # identical: removing either changes nothing
    players = np.array([[True, True]])
    values, _, _ = ume_game(probs, players)
    assert leave_one_out_shares(values, players).tolist() == [[0.5, 0.5]]


def test_dominating_modality_gets_the_largest_share() -> None:
    probs = np.array([[[0.99, 0.01], [0.45, 0.55], [0.5, 0.5]]])
    players = np.ones((1, 3), bool)
    values, _, _ = ume_game(probs, players)
    assert leave_one_out_shares(values, players).argmax() == 0
    assert shapley_values(values, players).argmax() == 0


@pytest.mark.parametrize("seed", [3, 4])
def test_shapley_is_efficient(seed: int) -> None:
    probs, players = random_case(seed, m=4)
    values, _, _ = ume_game(probs, players)
    phi = shapley_values(values, players)
    assert np.all(phi[~players] == 0)
    full = (players.astype(int) << np.arange(4)).sum(axis=1)
    np.testing.assert_allclose(phi.sum(axis=1), values[np.arange(len(full)), full] - values[:, 0], atol=1e-12)


def test_shapley_of_an_additive_game_is_each_weight() -> None:
    w = np.array([0.1, 0.3, -0.2])
    values = np.array([[sum(w[i] for i in range(3) if s >> i & 1) for s in range(8)]])
    np.testing.assert_allclose(shapley_values(values, np.ones((1, 3), bool)), [w])


def test_shapley_symmetry_for_identical_modalities() -> None:
    probs = np.array([[[0.8, 0.2], [0.8, 0.2], [0.3, 0.7]]])
    values, _, _ = ume_game(probs, np.ones((1, 3), bool))
    phi = shapley_values(values, np.ones((1, 3), bool))
    assert phi[0, 0] == pytest.approx(phi[0, 1])


def test_shapley_refuses_too_many_modalities() -> None:
    with pytest.raises(ValueError, match="<= 4"):
        shapley_values(np.zeros((1, 32)), np.ones((1, 5), bool))


def test_confidence_and_entropy() -> None:
    c, h = confidence_entropy(np.array([[0.25] * 4, [1.0, 0, 0, 0]]))
    np.testing.assert_allclose(c, [0.25, 1.0])
    np.testing.assert_allclose(h, [np.log(4), 0.0], atol=1e-9)
