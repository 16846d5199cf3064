"""Tests of lib/digit_metrics.py: the Fréchet distance and k-NN precision/recall against closed
forms and constructed point clouds, the feature net's accuracy, real digits against broken ones, the
cache (reused, retrained on a wrong key) and every bad-input error.

The feature net is trained once per session (seconds, one thread) into a temporary cache.
Run: pytest tests/test_digit_metrics.py
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import digit_metrics, runs  # noqa: E402


@pytest.fixture(scope="session")
def heldout():
    return digit_metrics.heldout_digits()


@pytest.fixture(scope="session")
def floor(trained):
    return digit_metrics.real_floor(250, repeats=3, net=trained[0])


def one_line_error(fn, *args, match=None, **kwargs):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Fréchet distance: closed forms
# ---------------------------------------------------------------------------------------------

def test_frechet_distance_of_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = digit_metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_gaussians_with_a_shared_rotated_eigenbasis():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so sqrtm(S1 S2) = Q diag(sqrt(ab)) Q^T.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.2, 2, 5), rng.uniform(0.2, 2, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = digit_metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    full_rank = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    stats = digit_metrics.feature_stats(full_rank)
    assert abs(digit_metrics.frechet_distance(*stats, *stats)) < 1e-6
    # Fewer samples than dimensions and a constant feature: singular, the eps guard must keep it ~0.
    singular = np.concatenate([rng.normal(size=(20, 40)), np.zeros((20, 3))], axis=1)
    stats = digit_metrics.feature_stats(singular)
    assert abs(digit_metrics.frechet_distance(*stats, *stats)) < 1e-3


def test_frechet_distance_of_samples_approaches_the_closed_form():
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, size=(20000, 3))
    y = rng.normal(1.0, 2.0, size=(20000, 3))
    expected = 3 * 1.0 + 3 * (1.0 - 2.0) ** 2
    stats = digit_metrics.feature_stats
    got = digit_metrics.frechet_distance(*stats(x), *stats(y))
    assert got == pytest.approx(expected, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Precision and recall: constructed point clouds
# ---------------------------------------------------------------------------------------------

def test_precision_recall_identical_sets():
    x = np.random.default_rng(4).normal(size=(200, 5))
    assert digit_metrics.precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_far_apart_clusters():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(200, 5)), rng.normal(size=(150, 5)) + 100.0
    assert digit_metrics.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_of_a_subset():
    real = np.random.default_rng(6).normal(size=(400, 2))
    fake = real[real[:, 0] < 0]  # half the support: everything it makes is real, half is missed
    precision, recall = digit_metrics.precision_recall(real, fake)
    assert precision == 1.0
    assert 0.3 < recall < 0.8


def test_precision_recall_by_hand():
    # k = 1 on a line. Real radii (distance to the nearest other real point): 0:1, 1:1, 3:2, 10:7.
    # Fake radii: -1:1.5, 0.5:1.5, 20:19.5.
    real = np.array([[0.0], [1.0], [3.0], [10.0]])
    fake = np.array([[-1.0], [0.5], [20.0]])
    # fake -1 lies on the boundary of real 0's ball (inside: the paper's test is <=); 0.5 is
    # inside; 20 is 10 from real 10 (radius 7): out. Real 0 and 1 are within 1.5 of fake 0.5,
    # 3 and 10 within 19.5 of fake 20.
    assert digit_metrics.precision_recall(real, fake, k=1) == (pytest.approx(2 / 3), 1.0)


# ---------------------------------------------------------------------------------------------
# The feature net and the scores of real and broken digits
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_classifier_is_accurate_on_heldout_digits(trained, heldout):
    net, info, _ = trained
    images, labels = heldout
    assert info["trained"] and info["accuracy"] >= 0.95
    assert digit_metrics.class_accuracy(net, images, labels) == pytest.approx(info["accuracy"])


@pytest.mark.slow
def test_training_is_deterministic():
    (a, _), (b, _) = [digit_metrics.train_feature_net(epochs=1) for _ in range(2)]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_real_digits_score_far_better_than_broken_ones(trained, heldout, floor):
    net = trained[0]
    images, labels = heldout
    train_images, train_labels, train_idx, _ = digit_metrics.digits_split()
    pick = np.random.default_rng(0).choice(train_idx, 500, replace=False)
    real = digit_metrics.evaluate(train_images[pick], train_labels[pick], net=net)
    noise = np.random.default_rng(1).integers(0, 256, images.shape, dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()                   # (B, 3, 32, 32)
    blurred = F.avg_pool2d(F.pad(x, (1,) * 4, mode="replicate"), 3, stride=1)   # (B, 3, 32, 32)
    blurred = blurred.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()      # (B, 32, 32, 3)
    shifted = np.roll(images, (4, 4), axis=(1, 2))
    assert real["fd"] < 2 * floor["fd"] and real["precision"] > 0.8 and real["recall"] > 0.8
    for broken in (noise, blurred, shifted):
        scores = digit_metrics.evaluate(broken, labels, net=net)
        assert scores["fd"] > 10 * real["fd"] and scores["recall"] < 0.3, scores


@pytest.mark.slow
def test_class_accuracy_of_true_and_shuffled_labels(trained, heldout):
    net = trained[0]
    images, labels = heldout
    shuffled = np.random.default_rng(0).permutation(labels)
    assert digit_metrics.evaluate(images, labels, net=net)["class_accuracy"] > 0.95
    assert digit_metrics.evaluate(images, shuffled, net=net)["class_accuracy"] < 0.25
    assert digit_metrics.evaluate(images, net=net)["class_accuracy"] is None


@pytest.mark.slow
def test_heldout_digits_against_themselves(trained, heldout):
    scores = digit_metrics.evaluate(heldout[0], heldout[1], net=trained[0])
    assert abs(scores["fd"]) < 1e-2 and scores["precision"] == scores["recall"] == 1.0
    assert scores["n"] == scores["n_reference"] == 500 and scores["k"] == digit_metrics.K


@pytest.mark.slow
def test_real_floor_is_small_and_disjoint(floor):
    assert floor["n"] == floor["n_reference"] == 250 and floor["repeats"] == 3
    assert 0 < floor["fd"] < 30, floor  # disjoint halves: above 0, far below broken digits
    assert 0.8 < floor["precision"] < 1 and 0.8 < floor["recall"] < 1
    assert floor["class_accuracy"] > 0.95


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cache_is_reused(trained, monkeypatch):
    net, _, cache = trained

    def retrain(*args, **kwargs):
        pytest.fail("retrained a valid cache")
    monkeypatch.setattr(digit_metrics, "train_feature_net", retrain)
    again, info = digit_metrics.load_feature_net(cache)
    assert not info["trained"]
    for x, y in zip(net.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_cache_with_a_wrong_key_is_retrained(trained, tmp_path, monkeypatch):
    net, info, cache = trained
    saved = runs.read_torch_file(cache, "cache", "")
    stale = tmp_path / "stale.pt"
    runs.atomic_save(dict(saved, key=dict(saved["key"], arch=-1)), stale)
    calls = []

    def retrain(*args, **kwargs):
        calls.append(1)
        return net, dict(info)
    monkeypatch.setattr(digit_metrics, "train_feature_net", retrain)
    assert digit_metrics.load_feature_net(stale)[1]["trained"] and len(calls) == 1
    # rewritten with the right key: read, not retrained
    assert not digit_metrics.load_feature_net(stale)[1]["trained"] and len(calls) == 1
    another_recipe = digit_metrics.load_feature_net(stale, epochs=digit_metrics.EPOCHS + 1)[1]
    assert another_recipe["trained"] and len(calls) == 2


def test_corrupt_cache_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    one_line_error(digit_metrics.load_feature_net, bad, match="delete")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bad_input_is_one_line_value_error(trained, heldout):
    net = trained[0]
    images, labels = heldout
    one_line_error(digit_metrics.evaluate, images.astype(np.float32), net=net, match="uint8")
    one_line_error(digit_metrics.evaluate, images.transpose(0, 3, 1, 2), net=net, match="shape")
    one_line_error(digit_metrics.evaluate, images[:5], net=net, match="at least")
    one_line_error(digit_metrics.evaluate, images, labels[:-1], net=net, match="one per image")
    one_line_error(digit_metrics.evaluate, images, labels + 1, net=net, match=r"\[0, 10\)")
    one_line_error(digit_metrics.evaluate, images, labels - 1, net=net, match=r"\[0, 10\)")
    one_line_error(digit_metrics.evaluate, images, labels.astype(np.float32), net=net,
                   match="integers")
    one_line_error(digit_metrics.evaluate, images, reference=images[:, :16], net=net,
                   match="reference")
    one_line_error(digit_metrics.evaluate, images[:20], k=20, net=net, match="k must")
    one_line_error(digit_metrics.real_floor, 495, net=net, match="disjoint")
    one_line_error(digit_metrics.real_floor, 250, repeats=0, net=net, match="repeats")
    one_line_error(digit_metrics.frechet_distance, np.zeros(3), np.eye(3), np.zeros(4), np.eye(4),
                   match="shape")
    one_line_error(digit_metrics.precision_recall, np.zeros((10, 3)), np.zeros((10, 4)),
                   match="same D")


# --- the sampling sweep -------------------------------------------------------------------------

def test_best_sampling_is_the_lowest_fd_among_accurate_settings():
    rows = [{"fd": 10.0, "class_accuracy": 0.90}, {"fd": 30.0, "class_accuracy": 0.97},
            {"fd": 20.0, "class_accuracy": 0.96}, {"fd": 25.0, "class_accuracy": 0.99}]
    # 10 is lower, but 90% accurate
    assert digit_metrics.best_sampling(rows) is rows[2]
    # none reaches 99.5%: the most accurate
    assert digit_metrics.best_sampling(rows, min_accuracy=0.995) is rows[3]
    assert digit_metrics.ranked_sampling(rows) == [rows[2], rows[3], rows[1], rows[0]]
    ranked = digit_metrics.ranked_sampling(rows, min_accuracy=0.97)
    assert ranked == [rows[3], rows[1], rows[2], rows[0]]


@pytest.mark.slow
def test_sweep_ranks_the_grid_on_few_samples_then_rescores_its_finalists(trained, perturb):
    import tokenbridge as tb
    from lib import data
    torch.manual_seed(0)
    model = tb.TokenBridge(tb.TokenBridgeConfig.preset("digits"))
    model = perturb(model.calibrate(torch.randn(8, 16, 4, 4)))
    vae = data.build_small_vae(8, 16, width=8).eval()
    rows, best = digit_metrics.sweep_sampling(model.train(), vae, cfgs=(1.0, 2.0, 3.0),
                                        temperatures=(1.0,), steps=(16, 4), n=20, coarse_n=10,
                                        finalists=2, net=trained[0])

    def settings(sampled):  # (cfg, samples, steps) of each row
        return [(r["cfg"], r["n"], r["num_iter"]) for r in sampled]
    coarse, final = rows[:3], rows[3:]
    assert settings(coarse) == [(1.0, 10, 16), (2.0, 10, 16), (3.0, 10, 16)]
    finalists = digit_metrics.ranked_sampling(coarse)[:2]
    assert settings(final[:2]) == [(f["cfg"], 20, 16) for f in finalists]
    best_finalist = digit_metrics.best_sampling(final[:2])
    assert final[2]["num_iter"] == 4 and final[2]["cfg"] == best_finalist["cfg"]
    assert best is digit_metrics.best_sampling(final) and best["n"] == 20  # at the full count only
    assert model.training                                            # the caller's mode is restored
