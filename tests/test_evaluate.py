"""Tests of tools/evaluate.py: the FID, Inception Score and precision/recall formulas against closed
forms, naive numpy and brute-force k-NN (ADM's float16 distance arithmetic included), the
streamed .npz reading, every bad-input and offline error, and the command end to end on tiny
.npz files with torch-fidelity's real InceptionV3 architecture under random weights.

All offline: the Inception weights are a random state dict written to a temp folder, and the
download is replaced by an error. The 2048-d matrix square root of the end-to-end FID would take
minutes on a small CPU, so there frechet_distance is a recorder (its formula is tested alone).
Run: pytest tests/test_evaluate.py
"""
import ast
import json
import runpy
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import evaluate  # noqa: E402


def one_line_error(fn, *args, match=None, **kwargs):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# FID: closed forms, and ADM's guard
# ---------------------------------------------------------------------------------------------

def test_frechet_distance_of_gaussians_with_commuting_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so sqrtm(S1 S2) = Q diag(sqrt(ab)) Q^T.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.2, 2, 6), rng.uniform(0.2, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_equals_adms_matrix_square_root():
    """ADM takes the trace of scipy.linalg.sqrtm(S1 S2); the eigenvalues give the same number."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 12)), rng.normal(size=(30, 12)) @ rng.normal(size=(12, 12))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu1, mu2 = x.mean(0), y.mean(0)
    adm = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm, rel=1e-9)
    # a singular product: the root is zero, nothing is added to the diagonals
    zero = np.zeros(2)
    assert evaluate.frechet_distance(zero, np.diag([1.0, 0]), zero, np.diag([0, 1.0])) == 2.0


# ---------------------------------------------------------------------------------------------
# Inception Score: a naive formula, closed forms
# ---------------------------------------------------------------------------------------------

def naive_inception_score(logits, split_size):
    scores = []
    for start in range(0, len(logits), split_size):
        part = logits[start:start + split_size]
        p = np.exp(part - part.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True)
        py = p.mean(0)
        kl = [sum(p[i, c] * np.log(p[i, c] / py[c]) for c in range(p.shape[1]))
              for i in range(len(p))]
        scores.append(np.exp(np.mean(kl)))
    return scores


def test_adms_inception_score_is_the_mean_over_splits_of_a_naive_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(11, 7)) * np.array([[3.0]] * 4 + [[0.3]] * 7)  # splits differ
    scores = naive_inception_score(logits, 4)                 # splits of 4, 4 and 3 rows
    got = evaluate.inception_score_adm(logits, split_size=4)
    assert got == pytest.approx(np.mean(scores), rel=1e-10)
    assert abs(got - scores[0]) > 0.1                         # the mean, not the first split


def fidelity_inception_score(logits):
    """torch-fidelity's own function, on the same logits."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    return isc_features_to_metric(torch.from_numpy(logits))["inception_score_mean"]


def test_inception_score_is_torch_fidelitys():
    logits = np.random.default_rng(1).normal(size=(53, 7)) * 2.0     # 53: chunks of 5 and 6
    assert evaluate.inception_score(logits) == pytest.approx(fidelity_inception_score(logits),
                                                             rel=1e-10)


def test_cycled_labels_raise_adms_score_not_the_papers():
    """sample.py cycles the classes: ADM's consecutive chunks then each hold every class equally
    often, a higher score than torch-fidelity's shuffled splits give (the paper's definition)."""
    classes, n = 100, 2000
    rng = np.random.default_rng(2)
    logits = 10.0 * np.eye(classes)[np.arange(n) % classes] + rng.normal(size=(n, classes))
    paper, adm = evaluate.inception_score(logits), evaluate.inception_score_adm(logits, 200)
    assert paper == pytest.approx(fidelity_inception_score(logits), rel=1e-10)
    assert adm > 1.1 * paper, (adm, paper)


def test_inception_score_closed_forms():
    for score in (evaluate.inception_score, evaluate.inception_score_adm):
        assert score(np.zeros((16, 5))) == pytest.approx(1.0)               # uniform p(y|x)
    confident = 60.0 * np.eye(5)[np.arange(10) % 5]           # 5 classes, each certain and equal
    assert evaluate.inception_score_adm(confident) == pytest.approx(5.0, rel=1e-9)
    # the same in 10 shuffled chunks of one sample: each chunk certain of its one class
    assert evaluate.inception_score(confident) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Precision / recall: brute-force k-NN over full distance matrices
# ---------------------------------------------------------------------------------------------

def adm_sq_distances(u, v):
    """ADM's DistanceBlock in numpy: float16 ops (float32 sums), float32 when that overflows."""
    def block(u, v, dtype):
        u, v = u.astype(dtype), v.astype(dtype)
        norm_u = (u * u).astype(np.float32).sum(1).astype(dtype)
        norm_v = (v * v).astype(np.float32).sum(1).astype(dtype)
        dots = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
        return norm_u[:, None] - 2 * dots + norm_v[None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        d = block(u, v, np.float16)
    d = d if np.isfinite(d).all() else block(u, v, np.float32)
    return np.maximum(d.astype(np.float32), 0)


def exact_sq_distances(u, v):
    return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)


def brute_force_pr(ref, samples, k, distances):
    ref_radii = np.sort(distances(ref, ref), axis=1)[:, k]      # column 0: the point itself
    sample_radii = np.sort(distances(samples, samples), axis=1)[:, k]
    d = distances(samples, ref)                                  # (M, N)
    precision = (d <= ref_radii[None, :]).any(1).mean()
    recall = (d.T <= sample_radii[None, :]).any(1).mean()
    return precision, recall, ref_radii


def clouds(high, seed, n=23, m=17, dim=6):
    # Integer features: float32 sums of their products are exact, so the float16 rounding is the
    # only rounding, and ties (d == radius, inside) are common.
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, high, (n, dim)).astype(np.float32)
    samples = (rng.integers(0, high, (m, dim)) + high // 3).astype(np.float32)   # shifted
    return ref, samples


@pytest.mark.parametrize("block", [2, 5, 1000])
def test_precision_recall_match_brute_force_knn(block):
    ref, samples = clouds(high=4, seed=0)    # |u|^2 <= 96: float16 is exact here
    precision, recall, _ = brute_force_pr(ref, samples, 3, exact_sq_distances)
    assert 0 < precision < 1 and 0 < recall < 1 and precision != recall
    got = evaluate.precision_recall(ref, samples, k=3, block=block)
    assert got == (precision, recall)
    assert evaluate.precision_recall(ref, samples, k=1, block=block) == \
        brute_force_pr(ref, samples, 1, exact_sq_distances)[:2]


def test_precision_recall_follow_adms_float16_distances():
    # ADM's float16 arithmetic: 150^2 and 151^2 round to steps of 16, so the distance is 0, not 1
    d = evaluate.pairwise_sq_distances(torch.tensor([[150.0]]), torch.tensor([[151.0]]))
    assert d.item() == 0.0
    # 300^2 overflows float16: the block is computed in float32 (exactly 1)
    d = evaluate.pairwise_sq_distances(torch.tensor([[300.0]]), torch.tensor([[301.0]]))
    assert d.item() == 1.0

    ref, samples = clouds(high=30, seed=3)    # |u|^2 up to 5046: float16 rounds to steps of 4
    precision, recall, radii = brute_force_pr(ref, samples, 3, adm_sq_distances)
    exact_radii = brute_force_pr(ref, samples, 3, exact_sq_distances)[2]
    assert not np.array_equal(radii, exact_radii)            # float16 matters in this cloud
    assert 0 < precision < 1 and 0 < recall < 1
    np.testing.assert_array_equal(evaluate.manifold_radii(torch.from_numpy(ref), 3, 4), radii)
    assert evaluate.precision_recall(ref, samples, k=3, block=4) == (precision, recall)


# ---------------------------------------------------------------------------------------------
# Reading .npz files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", ["savez", "savez_compressed", "fortran"])
def test_image_batches_stream_arr_0_in_order(tmp_path, save):
    arr = images(7, 5, seed=0)
    path = tmp_path / "s.npz"
    if save == "fortran":
        np.savez(path, arr_0=np.asfortranarray(arr), labels=np.arange(7))
    else:
        getattr(np, save)(path, arr_0=arr, labels=np.arange(7))
    assert evaluate.image_count(str(path), "samples") == 7
    batches = list(evaluate.image_batches(str(path), 3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), arr)


def write_bad(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    if kind == "not-a-zip":
        path.write_text("hello")
    elif kind == "no-arr_0":
        np.savez(path, images=images(5, 4, 0))
    elif kind == "float":
        np.savez(path, arr_0=images(5, 4, 0).astype(np.float32))
    elif kind == "grey":
        np.savez(path, arr_0=images(5, 4, 0)[..., 0])
    elif kind == "too-few":
        np.savez(path, arr_0=images(evaluate.MIN_IMAGES - 1, 4, 0))
    elif kind == "truncated":
        np.savez(path, arr_0=images(5, 4, 0))
        path.write_bytes(path.read_bytes()[:200])
    return str(path)


@pytest.mark.parametrize("kind, match", [
    ("missing", "no samples file"), ("not-a-zip", "not a readable .npz"),
    ("no-arr_0", "has no arr_0 .it holds images"), ("float", "must be uint8"),
    ("grey", r"\(N, H, W, 3\)"), ("too-few", "need at least 4 images"),
    ("truncated", "not a readable .npz")])
def test_bad_images_are_one_line_errors(tmp_path, kind, match):
    one_line_error(evaluate.image_count, write_bad(tmp_path, kind), "samples", match=match)


def test_reference_statistics(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=2048).astype(np.float32), np.eye(2048, dtype=np.float32)
    np.savez(tmp_path / "a.npz", arr_0=images(5, 4, 0), mu=mu, sigma=sigma)
    got_mu, got_sigma = evaluate.reference_statistics(str(tmp_path / "a.npz"))
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu)
    assert np.array_equal(got_sigma, sigma)
    np.savez(tmp_path / "b.npz", arr_0=images(5, 4, 0))
    assert evaluate.reference_statistics(str(tmp_path / "b.npz")) is None
    np.savez(tmp_path / "c.npz", arr_0=images(5, 4, 0), mu=mu[:10], sigma=sigma)
    one_line_error(evaluate.reference_statistics, str(tmp_path / "c.npz"), match="pool_3")


# ---------------------------------------------------------------------------------------------
# The Inception network: lazy import, offline download, weights files
# ---------------------------------------------------------------------------------------------

def test_torch_fidelity_is_imported_lazily(monkeypatch):
    tree = ast.parse((ROOT / "tools" / "evaluate.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module for n in top
                                                      if isinstance(n, ast.ImportFrom)]
    assert not any(str(name).startswith("torch_fidelity") for name in names)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)       # not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    one_line_error(evaluate.load_inception, match="pip install torch-fidelity")


def test_offline_download_is_one_line_error(monkeypatch, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))          # an empty cache: it must download
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    text = one_line_error(evaluate.load_inception, None, "cpu", match="could not be fetched")
    assert URL_INCEPTION_V3 in text and "--inception-weights PATH" in text


def test_bad_weights_files_are_one_line_errors(tmp_path):
    one_line_error(evaluate.load_inception, str(tmp_path / "none.pth"),
                   match="no torch file of Inception weights")
    (tmp_path / "text.pth").write_text("not a pickle")
    one_line_error(evaluate.load_inception, str(tmp_path / "text.pth"),
                   match="is not a torch file of Inception weights")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    one_line_error(evaluate.load_inception, str(tmp_path / "other.pth"),
                   match="not torch-fidelity's InceptionV3 state dict")


# ---------------------------------------------------------------------------------------------
# The command, end to end
# ---------------------------------------------------------------------------------------------

def test_command_end_to_end(tmp_path, monkeypatch, capsys, random_inception):
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    samples, reference = images(6, 48, seed=1), images(5, 40, seed=2)
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=2048), np.diag(rng.uniform(0.5, 1, 2048))
    np.savez(tmp_path / "fid.npz", arr_0=samples, labels=np.arange(6))
    np.savez(tmp_path / "ref.npz", arr_0=reference, mu=mu, sigma=sigma, mu_s=mu[:10],
             sigma_s=sigma[:10, :10])

    # 75^2, the smallest input the architecture takes, instead of 299^2: 16x less compute, the
    # same resize and layers (the test would otherwise spend most of its time in convolutions)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)

    # Record what the network saw and gave, and what FID was asked
    seen, forward = [], fe.FeatureExtractorInceptionV3.forward
    def recording(self, x):
        out = forward(self, x)
        seen.append((x.clone(), *(o.numpy().copy() for o in out)))
        return out
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "forward", recording)
    asked = []
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *a: asked.append(a) or 12.5)

    argv = ["--samples", str(tmp_path / "fid.npz"), "--reference", str(tmp_path / "ref.npz"),
            "--device", "cpu", "--batch-size", "3", "--inception-weights", random_inception]
    returned = evaluate.main(evaluate.get_parser().parse_args(argv))
    written = (tmp_path / "fid.metrics.json").read_text()
    assert returned == json.loads(written)

    # The images went in whole, in order, channel-first, in batches of 3; reference (40 px) first
    assert [(len(x), x.shape[-1]) for x, _, _ in seen] == [(3, 40), (2, 40), (3, 48), (3, 48)]
    ref_in, sample_in = torch.cat([s[0] for s in seen[:2]]), torch.cat([s[0] for s in seen[2:]])
    assert torch.equal(ref_in, torch.from_numpy(reference).permute(0, 3, 1, 2))
    assert torch.equal(sample_in, torch.from_numpy(samples).permute(0, 3, 1, 2))
    ref_pool = np.concatenate([s[1] for s in seen[:2]])
    pool = np.concatenate([s[1] for s in seen[2:]])
    logits = np.concatenate([s[2] for s in seen[2:]])
    assert ref_pool.shape == (5, 2048) and logits.shape == (6, 1008) and pool.std() > 1e-3

    # Each number from what the network gave
    (mu1, sigma1, mu2, sigma2), = asked
    np.testing.assert_allclose(mu1, pool.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma1, np.cov(pool.astype(np.float64), rowvar=False), atol=1e-9)
    assert np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)   # the stored statistics
    precision, recall, _ = brute_force_pr(ref_pool, pool, 3, adm_sq_distances)
    assert returned["fid"] == 12.5
    assert returned["inception_score"] == pytest.approx(evaluate.inception_score(logits))
    assert returned["inception_score_adm"] == pytest.approx(naive_inception_score(logits, 5000)[0])
    assert (returned["precision"], returned["recall"]) == (precision, recall)
    assert returned["fid_reference_statistics"] == "mu/sigma stored in the reference .npz"
    assert (returned["num_samples"], returned["num_reference"]) == (6, 5)

    # One line each on stdout
    lines = {line[:16].strip(): line[16:] for line in capsys.readouterr().out.splitlines()}
    for name, key in (("FID", "fid"), ("Inception Score", "inception_score"),
                      ("IS (ADM's)", "inception_score_adm"),
                      ("Precision", "precision"), ("Recall", "recall")):
        assert float(lines[name]) == pytest.approx(returned[key], abs=1e-4)


def test_a_reference_of_statistics_only_gives_fid_and_is(tmp_path, monkeypatch, capsys,
                                                        random_inception):
    """The official code evaluates against mu/sigma alone (fid_stats/adm_in256_stats.npz): the
    same FID and IS as a reference holding those statistics and images; precision and recall
    are left out, in one line that says why."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=2048), np.diag(rng.uniform(0.5, 1, 2048))
    np.savez(tmp_path / "fid.npz", arr_0=images(12, 48, seed=1))
    np.savez(tmp_path / "full.npz", arr_0=images(5, 40, seed=2), mu=mu, sigma=sigma)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)

    def run(reference):
        argv = ["--samples", str(tmp_path / "fid.npz"), "--reference", str(tmp_path / reference),
                "--device", "cpu", "--inception-weights", random_inception,
                "--out", str(tmp_path / f"{reference}.json")]
        return evaluate.main(evaluate.get_parser().parse_args(argv))
    full, stats = run("full.npz"), run("stats.npz")
    assert "precision and recall need the reference images" in capsys.readouterr().out
    for key in ("fid", "inception_score", "inception_score_adm"):
        assert stats[key] == full[key], key
    assert stats["precision"] is None and stats["recall"] is None and full["precision"] >= 0
    assert stats["num_reference"] == 0


def test_command_bad_input_exits_with_one_line(tmp_path, monkeypatch):
    np.savez(tmp_path / "s.npz", arr_0=images(5, 4, 0).astype(np.float32))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--samples", str(tmp_path / "s.npz"),
                                      "--reference", str(tmp_path / "r.npz")])
    monkeypatch.delitem(sys.modules, "tools.evaluate", raising=False)  # afresh, as python -m does
    with pytest.raises(SystemExit) as e:
        runpy.run_module("tools.evaluate", run_name="__main__", alter_sys=True)
    assert str(e.value.code).startswith("error: samples") and "uint8" in str(e.value.code)
    args = evaluate.get_parser().parse_args(["--samples", "s.npz", "--reference", "r.npz",
                                             "--batch-size", "0"])
    one_line_error(evaluate.main, args, match="--batch-size must be >= 1")
    args = evaluate.get_parser().parse_args(["--samples", "s.npz", "--reference", "r.npz",
                                             "--out", str(tmp_path / "no" / "m.json")])
    one_line_error(evaluate.main, args, match="does not exist")
