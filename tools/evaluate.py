"""FID, Inception Score, precision and recall of a samples .npz against ADM's ImageNet reference.

    python -m tools.evaluate --samples fid.npz --reference VIRTUAL_imagenet256_labeled.npz
    python -m tools.evaluate --samples fid.npz --reference REF.npz \\
        --inception-weights weights.pth --device cuda --batch-size 200 --out metrics.json

The metrics are those of ADM's evaluator (Dhariwal & Nichol 2021, guided-diffusion's
evaluations/evaluator.py), which the TokenBridge paper's ImageNet tables follow:
  - FID: Fréchet distance of Gaussians fitted to Inception pool_3 features (2048-d); the
    reference side is the mu/sigma stored in the reference .npz when it has them (ADM's files do,
    computed by ADM's TensorFlow graph), else the statistics of its images' features;
  - Inception Score: exp(E KL(p(y|x) || p(y))) over 10 chunks of the samples shuffled by
    numpy's RandomState(2020), the mean of the chunks' scores: torch-fidelity's definition, which
    the official code reports (the paper's IS). ADM's (consecutive chunks of 5,000, no shuffle)
    comes beside it: sample.py cycles the classes, so each such chunk holds every class equally
    often, which raises the score. p(y|x) is the softmax of pool_3 @ W without the bias;
  - precision / recall: Kynkäänniemi et al. 2019 with k = 3, as ADM's ManifoldEstimator computes
    them (squared distances in float16 arithmetic, blocks of 10,000 x 10,000). They need the
    reference images: a reference of mu/sigma only gives FID and IS.

The features come from torch-fidelity's FeatureExtractorInceptionV3: the official MAR/TokenBridge
code takes its FID and IS from torch-fidelity (calculate_metrics with ADM's statistics), and that
network reproduces the TF Inception graph ADM uses, TF1's bilinear resize to 299 included. Its
weights download once into the torch hub cache; offline, pass the file with --inception-weights.

Both .npz files are ADM's layout: arr_0 (N, H, W, 3) uint8 (sample.py --npz writes it), read a
batch at a time. Writes the four numbers (and what they were computed from) to a JSON file.
"""
import argparse
import contextlib
import os
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch
from tqdm import tqdm

from lib import runs
from lib.cli import DefaultsHelpFormatter, unwritable

K = 3                   # ADM's nhood_sizes=(3,): the k-th nearest neighbour sets a ball's radius
SPLIT_SIZE = 5000       # ADM's compute_inception_score(split_size=5000)
IS_SPLITS, IS_SEED = 10, 2020   # torch-fidelity's isc: RandomState(2020) permutation, 10 splits
BLOCK = 10000           # ADM's row_batch_size and col_batch_size of pairwise distances
MIN_IMAGES = K + 1      # a k-th neighbour other than the point itself
FEATURE_DIM = 2048      # Inception pool_3
INCEPTION_NAME = "inception-v3-compat"                   # torch-fidelity's name for the network
INCEPTION_FEATURES = ["2048", "logits_unbiased"]         # pool_3 and pool_3 @ W (no bias)
LAYOUT = "arr_0 (N, H, W, 3) uint8, ADM's layout"


# ---------------------------------------------------------------------------------------------
# Inputs: arr_0 of an .npz, streamed from the archive a batch at a time
# ---------------------------------------------------------------------------------------------

def read_npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, left at the start of its data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy format version {version} (numpy writes 1.0 or 2.0 for plain arrays)")


def image_count(path, what):
    """Number of images in arr_0 of the .npz at path, after checking it is uint8 (N, H, W, 3)
    with N >= MIN_IMAGES; reads the header only."""
    if not os.path.isfile(path):
        raise ValueError(f"no {what} file at {path}; give an .npz with {LAYOUT}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "arr_0.npy" in names:
                with archive.open("arr_0.npy") as f:
                    shape, _, dtype = read_npy_header(f)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
        why = " ".join(str(e).split())  # numpy's header errors span lines
        raise ValueError(f"{what} {path} is not a readable .npz ({why}); need {LAYOUT}") from None
    if "arr_0.npy" not in names:
        held = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
        raise ValueError(f"{what} {path} has no arr_0 (it holds {held}); need {LAYOUT}")
    if dtype != np.uint8:
        raise ValueError(f"{what} {path}: arr_0 must be uint8 in [0, 255], got {dtype}")
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"{what} {path}: arr_0 must be (N, H, W, 3) RGB images, got {shape}")
    if shape[0] < MIN_IMAGES:
        raise ValueError(f"{what} {path}: need at least {MIN_IMAGES} images (a {K}-th nearest "
                         f"neighbour besides each image itself), got {shape[0]}")
    return shape[0]


def image_batches(path, batch_size):
    """arr_0 of an .npz (checked by image_count) as uint8 (b, H, W, 3) batches in order. Read from
    the archive like ADM's StreamingNpzArrayReader: np.load cannot mmap an .npz member, and
    50,000 images at 256^2 are 9.8 GB, so they never sit in memory whole, compressed or not."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        shape, fortran_order, dtype = read_npy_header(f)
        if fortran_order:  # rare: its bytes are not image after image; load it whole, as ADM
            images = np.load(path)["arr_0"]
            for start in range(0, len(images), batch_size):
                yield np.ascontiguousarray(images[start:start + batch_size])
            return
        for start in range(0, shape[0], batch_size):
            batch = np.empty((min(batch_size, shape[0] - start), *shape[1:]), dtype)
            try:
                got = f.readinto(memoryview(batch).cast("B"))
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise ValueError(f"{path}: arr_0 could not be read ({e})") from None
            if got != batch.nbytes:
                raise ValueError(f"{path}: arr_0 ends after {start} + {got // batch[0].nbytes} "
                                 f"of {shape[0]} images (a truncated file)")
            yield batch


def holds(path, name):
    """Whether the .npz at path has an array `name` (False for a file that is not a readable
    .npz: image_count then says what is wrong with it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{name}.npy" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def reference_statistics(path):
    """The pool_3 (mu, sigma) stored in the reference .npz (ADM's files hold those of its TF
    graph over the whole reference set), float64; None when it has no "mu", as ADM decides."""
    try:
        with np.load(path) as npz:
            stored = {name: npz[name] for name in ("mu", "sigma") if name in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"reference {path}: mu/sigma could not be read ({e})") from None
    if "mu" not in stored:
        return None
    if "sigma" not in stored:
        raise ValueError(f"reference {path} has mu but no sigma (ADM's files hold both)")
    mu, sigma = stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64)
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"reference {path}: mu and sigma must be ({FEATURE_DIM},) and "
                         f"({FEATURE_DIM}, {FEATURE_DIM}) pool_3 statistics, got {mu.shape} "
                         f"and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"reference {path}: mu or sigma holds NaN or inf")
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# Inception features: torch-fidelity's port of the TF graph
# ---------------------------------------------------------------------------------------------

def load_inception(weights=None, device="cpu"):
    """torch-fidelity's InceptionV3 giving (pool_3 (B, 2048), logits without bias (B, 1008)) for
    uint8 (B, 3, H, W); weights: a file of its state dict, None to download it (once, cached)."""
    try:  # lazily: torch-fidelity's package imports torchvision, which the rest does not need
        from torch_fidelity.feature_extractor_inceptionv3 import (
            URL_INCEPTION_V3,
            FeatureExtractorInceptionV3,
        )
    except ImportError as e:
        raise ValueError(f"evaluate.py needs torch-fidelity ({e}); pip install torch-fidelity"
                         ) from None
    fetch = f"download {URL_INCEPTION_V3} by hand and pass --inception-weights PATH"
    if weights is not None:
        # read safely first: torch-fidelity's own torch.load (weights_only=False) would run any
        # code a pickle holds, and says nothing useful about a missing file
        runs.read_torch_file(weights, "torch file of Inception weights", fetch)
    try:
        net = FeatureExtractorInceptionV3(INCEPTION_NAME, INCEPTION_FEATURES,
                                          feature_extractor_weights_path=weights, verbose=True)
    except OSError as e:  # URLError, timeouts, no route: offline
        reason = " ".join(str(e).split())
        raise ValueError(f"the Inception weights could not be fetched from {URL_INCEPTION_V3} "
                         f"({reason}); {fetch}") from None
    except RuntimeError as e:  # load_state_dict: other keys or shapes
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{weights or URL_INCEPTION_V3} is not torch-fidelity's InceptionV3 "
                         f"state dict ({first}); {fetch}") from None
    return net.to(device)


@contextlib.contextmanager
def full_float32():
    """No TF32 in cuDNN's convolutions (on by default on Ampere and later): the features then
    match the float32 TF graph that made the reference statistics, and the CPU's, to rounding."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


@torch.no_grad()
def inception_features(net, path, what, batch_size=200):
    """(pool_3 float32 (N, 2048), logits float32 (N, 1008)) of the images in arr_0 of path."""
    device = next(net.parameters()).device
    count = image_count(path, what)
    pools, logits = [], []
    with full_float32(), tqdm(total=count, desc=f"Inception ({what})", unit="img") as bar:
        for batch in image_batches(path, batch_size):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)          # (B, 3, H, W)
            pool, logit = net(x.contiguous())          # torch-fidelity resizes to 299 inside
            pools.append(pool.cpu().numpy())                                     # (B, 2048)
            logits.append(logit.cpu().numpy())                                   # (B, 1008)
            bar.update(len(batch))
    return np.concatenate(pools), np.concatenate(logits)


# ---------------------------------------------------------------------------------------------
# FID: ADM's FIDStatistics.frechet_distance
# ---------------------------------------------------------------------------------------------

def feature_statistics(features):
    """Mean (D,) and covariance (D, D) in float64, as ADM's compute_statistics."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr sqrtm(S1 S2), in float64.

    Tr sqrtm(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2, which equal those
    of the symmetric S1^1/2 S2 S1^1/2: ADM's number (it takes the trace of scipy.linalg.sqrtm)
    from two symmetric eigendecompositions, seconds where sqrtm takes 90 s at 2048 dimensions on
    2 cores. Round-off leaves tiny negative eigenvalues, which count as 0."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"means and covariances disagree in shape: {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("FID is not finite: the covariances hold NaN or inf")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                              # S1^1/2
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


# ---------------------------------------------------------------------------------------------
# Inception Score: ADM's Evaluator.compute_inception_score
# ---------------------------------------------------------------------------------------------

def inception_score(logits, splits=IS_SPLITS, seed=IS_SEED):
    """torch-fidelity's Inception Score (the official code's, and so the paper's): the samples in
    the order of RandomState(seed).permutation, cut into `splits` near-equal chunks (fewer when
    there are fewer samples), the mean of the chunks' scores."""
    logits = np.asarray(logits, dtype=np.float64)
    n = len(logits)
    shuffled = logits[np.random.RandomState(seed).permutation(n)]
    splits = min(splits, n)
    return float(np.mean([_chunk_score(shuffled[i * n // splits:(i + 1) * n // splits])
                          for i in range(splits)]))


def inception_score_adm(logits, split_size=SPLIT_SIZE):
    """ADM's Inception Score: consecutive chunks of split_size samples (the last may be shorter),
    no shuffling, the mean of the chunks' scores (not the first)."""
    logits = np.asarray(logits, dtype=np.float64)
    return float(np.mean([_chunk_score(logits[start:start + split_size])
                          for start in range(0, len(logits), split_size)]))


def _chunk_score(logits):
    """exp(mean KL(p(y|x) || p(y))) with p(y) the chunk's mean, in float64 from log_softmax (ADM
    takes np.log of a float32 softmax; torch-fidelity works in float64 as here)."""
    log_p = scipy.special.log_softmax(logits, axis=1)                                  # (S, C)
    log_marginal = np.log(np.exp(log_p).mean(0, keepdims=True))                        # (1, C)
    return np.exp((np.exp(log_p) * (log_p - log_marginal)).sum(1).mean())


# ---------------------------------------------------------------------------------------------
# Precision / recall: ADM's ManifoldEstimator
# ---------------------------------------------------------------------------------------------

def _sq_distances(u, v):
    # TF's ops in ADM's _batch_pairwise_distances, each rounding to u's dtype: the squares, their
    # sum and the matmul accumulate in float32 (TF's GPU kernels do so for float16).
    norm_u = (u * u).float().sum(1).to(u.dtype)                                  # (R,)
    norm_v = (v * v).float().sum(1).to(v.dtype)                                  # (C,)
    dots = (u.float() @ v.float().T).to(u.dtype)                                 # (R, C)
    return norm_u[:, None] - 2 * dots + norm_v[None, :]                          # (R, C)


def pairwise_sq_distances(u, v):
    """Squared Euclidean distances (R, C), float32, of float32 u (R, D) and v (C, D), as ADM's
    DistanceBlock: in float16 when all of the block is finite, else in float32; clamped at 0.
    Float16 keeps ~3 digits (|u|^2 ~ 10^3 for pool_3: steps of 0.5), which moves points across
    the k-NN radii, so precision and recall depend on it: done the same way here."""
    d = _sq_distances(u.half(), v.half())
    if not torch.isfinite(d).all():  # a norm over 65504 (ADM's tf.cond, block by block)
        d = _sq_distances(u.float(), v.float())
    return d.float().clamp_min(0)


def manifold_radii(features, k=K, block=BLOCK):
    """Squared radius of each point's k-NN ball (N,): the (k+1)-th smallest squared distance in
    its row of the set's distance matrix, the point itself (0) included, as ADM. Blocks of
    block x block distances; a running k+1 smallest per row stands in for ADM's full rows."""
    radii = torch.empty(len(features), device=features.device)
    for r in range(0, len(features), block):
        nearest = None
        for c in range(0, len(features), block):
            d = pairwise_sq_distances(features[r:r + block], features[c:c + block])  # (R, C)
            d = d if nearest is None else torch.cat([nearest, d], 1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values  # (R, k + 1)
        radii[r:r + block] = nearest[:, k]
    return radii


def precision_recall(ref, samples, k=K, block=BLOCK, device="cpu"):
    """(precision, recall) of float32 features ref (N, D) and samples (M, D): the share of
    samples inside some reference k-NN ball, and of references inside some sample ball; a point
    is inside when its squared distance is <= the ball's squared radius (ADM's evaluate_pr)."""
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float32), device=device)
    samples = torch.as_tensor(np.asarray(samples, dtype=np.float32), device=device)
    if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D, got "
                         f"{tuple(ref.shape)} and {tuple(samples.shape)}")
    if min(len(ref), len(samples)) <= k:
        raise ValueError(f"precision/recall need more than k = {k} points in each set, got "
                         f"{len(ref)} and {len(samples)}")
    ref_radii, sample_radii = manifold_radii(ref, k, block), manifold_radii(samples, k, block)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_in = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block):
        for j in range(0, len(samples), block):
            d = pairwise_sq_distances(ref[i:i + block], samples[j:j + block])    # (R, S)
            ref_in[i:i + block] |= (d <= sample_radii[None, j:j + block]).any(1)
            sample_in[j:j + block] |= (d <= ref_radii[i:i + block, None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def default_out(samples):
    """fid.npz -> fid.metrics.json, next to the samples."""
    return str(Path(samples).with_suffix(".metrics.json"))


def check_args(args):
    """Bad flags and an unwritable output are refused before an image is read."""
    if not args.batch_size >= 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if why := unwritable(args.out):
        raise ValueError(f"--out {args.out}: cannot write there ({why})")


def main(args):
    # Inputs: every file checked before the Inception network loads
    args.out = args.out or default_out(args.samples)
    check_args(args)
    num_samples = image_count(args.samples, "samples")
    # a reference of statistics only (the official code's fid_stats/adm_in256_stats.npz): FID
    stats_only = holds(args.reference, "mu") and not holds(args.reference, "arr_0")
    num_reference = 0 if stats_only else image_count(args.reference, "reference")
    ref_stats = reference_statistics(args.reference)
    device = runs.torch_device(args.device)
    net = load_inception(args.inception_weights, device)

    # Features: the reference first, as ADM (its images give the precision/recall manifold)
    ref_pool = None
    if not stats_only:
        ref_pool, _ = inception_features(net, args.reference, "reference", args.batch_size)
    pool, logits = inception_features(net, args.samples, "samples", args.batch_size)

    # Metrics
    stored = ref_stats is not None
    stats_from = "mu/sigma stored in the reference .npz" if stored else "reference arr_0"
    if ref_stats is None:
        ref_stats = feature_statistics(ref_pool)
    fid = frechet_distance(*feature_statistics(pool), *ref_stats)
    precision = recall = None
    if stats_only:
        print(f"{args.reference} holds mu/sigma only: FID and IS; precision and recall need the "
              "reference images (arr_0, e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    else:
        precision, recall = precision_recall(ref_pool, pool, K, BLOCK, device)
    metrics = {"fid": fid,
               "inception_score": inception_score(logits),
               "inception_score_adm": inception_score_adm(logits),
               "precision": precision,
               "recall": recall,
               "samples": args.samples,
               "reference": args.reference,
               "num_samples": num_samples,
               "num_reference": num_reference,
               "fid_reference_statistics": stats_from,
               "k": K,
               "inception_score_definition": f"torch-fidelity's: {IS_SPLITS} splits after a "
                                     f"RandomState({IS_SEED}) shuffle (the paper's)",
               "inception_score_adm_definition": f"ADM's: consecutive chunks of {SPLIT_SIZE}",
               "inception_weights": args.inception_weights or "torch hub cache (torch-fidelity)",
               "device": device}
    runs.write_json(metrics, args.out)

    # Report
    for name, key in (("FID", "fid"), ("Inception Score", "inception_score"),
                      ("IS (ADM's)", "inception_score_adm"),
                      ("Precision", "precision"), ("Recall", "recall")):
        print(f"{name:<16} " + ("-" if metrics[key] is None else f"{metrics[key]:.4f}"))
    print(f"wrote {args.out} ({num_samples} samples against {num_reference} reference images)")
    return metrics


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--samples", required=True,
                        help=f"samples .npz: {LAYOUT} (sample.py --npz)")
    parser.add_argument("--reference", required=True,
                        help="reference .npz, e.g. ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 "
                             "and optionally mu/sigma (then FID uses those, as ADM)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when it works")
    parser.add_argument("--batch-size", type=int, default=200,
                        help="images per Inception forward pass")
    parser.add_argument("--inception-weights",
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                             "(default: downloaded into the torch hub cache)")
    parser.add_argument("--out",
                        help="metrics JSON (default: next to --samples, fid.metrics.json)")
    return parser


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
