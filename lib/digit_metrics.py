"""Sample quality on the built-in digits: our FID analogue (docs/findings.md#the-measure).

    net, info = load_feature_net()          # trained once (seconds), then cached
    scores = evaluate(images, labels)       # images: uint8 (B, 32, 32, 3), labels: (B,)
    floor = real_floor(250)                 # what real digits score: a perfect generator
    print(scores["fd"], scores["class_accuracy"], scores["precision"], scores["recall"])
    print(info["accuracy"], floor["fd"])    # the feature net's held-out accuracy

The feature network is a small CNN trained as a 10-way classifier on the training split of the
5,000 built-in MNIST digits (the 4,500 that train.py trains on); its penultimate layer (64
ReLU units) plays the role of Inception-v3's pool3 in FID (Heusel et al. 2017). The reference
set is the 500 held-out digits (data.split_validation, as in train.py), which neither the
classifier nor the generator has seen. Four numbers:
  - fd: Fréchet distance between Gaussians fitted to the features of the two sets (pytorch-fid's
    formula and its guard for singular covariance products);
  - class_accuracy: share of class-conditional samples the classifier assigns to the class they
    were sampled for ("does a 3 look like a 3");
  - precision / recall: k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019, "Improved
    precision and recall metric for assessing generative models", k = 3): precision is the share
    of generated features within the k-NN radius of some real feature, recall the converse.

Sample sizes: the reference has only 500 digits, so a generated set of any size (1,000-2,000
is typical) is compared with those 500, and its score depends on both sizes (FD is biased
upwards by small sets). A report should print the real-vs-real floor beside its scores:
real_floor(n) scores n held-out digits against the other 500 - n (disjoint; a real digit never
meets itself), averaged over a few random splits. The default, 250 vs 250, is the largest
disjoint split; both sides are smaller than in an evaluation of >= 500 samples against all 500,
so its FD is, if anything, above what a perfect generator would score there. Its precision and
recall are below 1: k-NN balls around one sample do not cover every point of another.

Read precision with recall and FD: a set that collapses to one point scores precision 1 when
that point falls in the ball of a single atypical real digit (uniform noise does), but recall 0.

These numbers do NOT compare with ImageNet FIDs (or any published FID): another feature network,
another data set, and samples of hundreds rather than 50,000.
"""
import contextlib
import functools
import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib import data, runs

CACHE = "runs/.quality/digits_features.pt"
ARCH_VERSION = 1      # bump when FeatureNet or its training changes: old caches are then retrained
SEED = 0
EPOCHS = 10
VAL_SIZE = 500        # the held-out digits train.py also holds out
K = 3                 # Kynkäänniemi et al.'s default neighbourhood size
MIN_IMAGES = 10       # fewer than this cannot give a meaningful covariance or k-NN radius
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)


# ---------------------------------------------------------------------------------------------
# Inputs: uint8 (B, 32, 32, 3) images, labels in [0, 10)
# ---------------------------------------------------------------------------------------------

def check_images(images, what="images"):
    """uint8 (B, 32, 32, 3) with B >= MIN_IMAGES, as a numpy array; else one ValueError."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{what} must have shape (B, 32, 32, 3), got {images.shape}")
    if len(images) < MIN_IMAGES:
        raise ValueError(f"{what}: need at least {MIN_IMAGES} images, got {len(images)}")
    return images


def check_labels(labels, num_images):
    """Integer class labels (B,) in [0, 10), one per image."""
    labels = np.asarray(labels)
    if labels.shape != (num_images,):
        raise ValueError(f"labels must have shape ({num_images},), one per image, "
                         f"got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), "
                         f"got values in [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def to_input(images):
    """uint8 (B, H, W, 3) -> float (B, 1, H, W) in [-1, 1]: one grey channel (generated digits'
    channels are only near-equal, so their mean, not an arbitrary one)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().mean(-1)      # (B, H, W)
    return (x / 127.5 - 1.0).unsqueeze(1)                                    # (B, 1, H, W)


def digits_split():
    """The built-in digits: uint8 images (N, 32, 32, 3), labels (N,), train_idx, val_idx (numpy)."""
    images, labels, _ = data.load_digits()
    train_idx, val_idx = data.split_validation(len(images), VAL_SIZE)
    images = images.permute(0, 2, 3, 1).contiguous().numpy()                # (N, 32, 32, 3)
    return images, labels.numpy(), train_idx.numpy(), val_idx.numpy()


def heldout_digits():
    """The 500 held-out digits, the reference set: (uint8 (500, 32, 32, 3), labels (500,))."""
    images, labels, _, val_idx = digits_split()
    return images[val_idx], labels[val_idx]


# ---------------------------------------------------------------------------------------------
# The feature network: a small CNN classifier; its penultimate layer is the feature space
# ---------------------------------------------------------------------------------------------

class FeatureNet(nn.Module):
    def __init__(self, width=16, feature_dim=64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # (B, w, 16, 16)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),       # (B, 2w, 8, 8)
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 4w, 4, 4)
            nn.Flatten(), nn.Linear(4 * w * 16, feature_dim), nn.ReLU())         # (B, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def _init_weights(self, gen):
        # Initialised from an explicit generator, so the weights never depend on torch's global RNG.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=gen)
                nn.init.zeros_(m.bias)

    def features(self, x):
        return self.body(x)                                                      # (B, feature_dim)

    def forward(self, x):
        return self.head(self.body(x))                                           # (B, 10)


@contextlib.contextmanager
def one_thread():
    """Run the net on one torch thread: it is tiny, so more threads only add synchronisation
    (and spin against other processes on a busy machine), and one thread gives the same bits
    whatever the caller's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cache_key(images, labels, train_idx, epochs, seed):
    """What the cached weights depend on: architecture, recipe and the exact training data."""
    h = hashlib.sha256()
    for a in (images, labels, train_idx):
        h.update(np.ascontiguousarray(a).tobytes())
    return {"arch": ARCH_VERSION, "epochs": int(epochs), "seed": int(seed), "data": h.hexdigest()}


def shift(x, gen, max_shift=2):
    """Random translation by up to max_shift pixels (one per batch): generated digits are not
    centred as exactly as MNIST's, and their class should not hinge on that."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
    x = F.pad(x, (max_shift,) * 4, value=-1.0)                                  # background is -1
    h, w = x.shape[-2] - 2 * max_shift, x.shape[-1] - 2 * max_shift
    return x[..., max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


def train_feature_net(epochs=EPOCHS, seed=SEED, batch=64, lr=2e-3):
    """Train FeatureNet on the training split only: (net in eval mode, info with the held-out
    accuracy and the training time). Every random draw comes from one generator seeded by `seed`."""
    images, labels, train_idx, val_idx = digits_split()
    gen = torch.Generator().manual_seed(seed)
    net = FeatureNet()
    net._init_weights(gen)

    # AdamW, its learning rate in one cycle over all the steps
    x, y = to_input(images[train_idx]), torch.from_numpy(labels[train_idx])
    steps = epochs * (len(x) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1),
                                                pct_start=0.15)
    start = time.time()
    net.train()
    with one_thread():
        run_epochs(net, x, y, epochs, batch, opt, sched, gen)

    # frozen, and scored on the held-out digits
    net.eval().requires_grad_(False)
    accuracy = class_accuracy(net, images[val_idx], labels[val_idx])
    return net, {"accuracy": accuracy, "seconds": time.time() - start}


def run_epochs(net, x, y, epochs, batch, opt, sched, gen):
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        # the last partial batch is dropped: every step sees `batch` images
        for i in range(len(x) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(net(shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def load_feature_net(cache=CACHE, epochs=EPOCHS, seed=SEED):
    """The feature net from `cache` when its key matches the current code and data, else trained
    and written there (atomically): (net in eval mode, info: accuracy, seconds, trained)."""
    images, labels, train_idx, _ = digits_split()
    key = cache_key(images, labels, train_idx, epochs, seed)

    # the cache, when its key matches
    cache = Path(cache)
    if cache.is_file():
        saved = runs.read_torch_file(cache, "quality feature-net cache",
                                     f"delete {cache} to retrain it")
        if isinstance(saved, dict) and saved.get("key") == key:
            net = FeatureNet()
            net.load_state_dict(saved["model"])
            return net.eval().requires_grad_(False), dict(saved["info"], trained=False)

    # else trained, and the cache written
    net, info = train_feature_net(epochs, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_save({"key": key, "model": net.state_dict(), "info": info}, cache)
    return net, dict(info, trained=True)


@torch.no_grad()
def features(net, images, batch=500):
    """Penultimate-layer features of uint8 (B, 32, 32, 3) images: float64 (B, feature_dim)."""
    images = check_images(images)
    with one_thread():
        out = [net.features(to_input(images[i:i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(out).double().numpy()


@torch.no_grad()
def predict(net, images, batch=500):
    """The classifier's class for each image: int64 (B,)."""
    images = check_images(images)
    with one_thread():
        out = [net(to_input(images[i:i + batch])).argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------
# The metrics
# ---------------------------------------------------------------------------------------------

def class_accuracy(net, images, labels):
    """Share of images the classifier assigns to their label."""
    images = check_images(images)
    return float((predict(net, images) == check_labels(labels, len(images))).mean())


def feature_stats(feats):
    """Mean (D,) and covariance (D, D) of features (B, D), the Gaussian FD compares."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"features must have shape (B, D) with B >= 2, got {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def sqrtm_or_none(a):
    """scipy's sqrtm(a), or None where scipy finds `a` singular or the root is not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(a)
        except scipy.linalg.LinAlgWarning:
            return None
    return root if np.isfinite(root).all() else None


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), the Fréchet distance of two Gaussians
    (pytorch-fid's calculate_frechet_distance)."""
    mu1 = np.atleast_1d(mu1).astype(np.float64)
    mu2 = np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"means and covariances disagree in shape: {mu1.shape}, "
                         f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}")

    # sqrtm(S1 S2), the cross term
    covmean = sqrtm_or_none(sigma1 @ sigma2)
    if covmean is None:
        # A feature that never fires, or fewer samples than features, makes S1 S2 singular and
        # its square root inaccurate: nudge the diagonals, as pytorch-fid does.
        offset = np.eye(len(mu1)) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))

    # round-off leaves tiny imaginary parts; a large one means a broken input
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.abs(covmean.imag).max()
            raise ValueError(f"sqrtm(S1 S2) has imaginary parts up to {largest:.3g}: "
                             "degenerate covariances")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def knn_radii(feats, k):
    """Distance of each point to its k-th nearest other point: (B,)."""
    d = torch.cdist(feats, feats)                                                # (B, B)
    return d.kthvalue(k + 1, dim=1).values  # k + 1: each point is its own nearest neighbour


def coverage(points, manifold, radii):
    """Share of `points` inside the union of balls (manifold[j], radii[j])."""
    d = torch.cdist(points, manifold)                                            # (P, M)
    return float((d <= radii[None, :]).any(1).double().mean())


def precision_recall(real, fake, k=K):
    """Kynkäänniemi et al. 2019: precision = share of fake features inside the real k-NN manifold,
    recall = share of real features inside the fake one. real (N, D), fake (M, D)."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError("features must be (N, D) and (M, D) with the same D, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    smaller = min(len(real), len(fake))
    if not (isinstance(k, (int, np.integer)) and 1 <= k < smaller):
        raise ValueError(f"k must be an integer in [1, {smaller}) (fewer than each set's size), "
                         f"got {k}")
    precision = coverage(fake, real, knn_radii(real, k))
    recall = coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def compare(net, images, labels, ref_images, k):
    """All four numbers for images (with labels or None) against ref_images."""
    fake, real = features(net, images), features(net, ref_images)
    fd = frechet_distance(*feature_stats(fake), *feature_stats(real))
    precision, recall = precision_recall(real, fake, k)
    acc = None if labels is None else class_accuracy(net, images, labels)
    return {"fd": fd, "class_accuracy": acc, "precision": precision, "recall": recall,
            "n": len(images), "n_reference": len(ref_images), "k": k}


def evaluate(images, labels=None, reference=None, k=K, net=None, cache=CACHE):
    """Scores of uint8 (B, 32, 32, 3) images against `reference` (default: the 500 held-out
    digits): {"fd", "class_accuracy" (None without labels), "precision", "recall", "n",
    "n_reference", "k"}. labels: the class each image was sampled for. net: a loaded feature net
    (default: load_feature_net(cache))."""
    images = check_images(images)
    if labels is not None:
        labels = check_labels(labels, len(images))
    reference = heldout_digits()[0] if reference is None else check_images(reference, "reference")
    if net is None:
        net, _ = load_feature_net(cache)
    return compare(net, images, labels, reference, k)


def real_floor(n=250, repeats=5, k=K, seed=0, net=None, cache=CACHE):
    """What a perfect generator scores: n held-out digits (with their true labels) against the
    other 500 - n, disjoint, averaged over `repeats` random splits; "fd_std" is FD's spread."""
    images, labels = heldout_digits()
    largest = len(images) - MIN_IMAGES
    if not (isinstance(n, (int, np.integer)) and MIN_IMAGES <= n <= largest):
        raise ValueError(f"n must be an integer in [{MIN_IMAGES}, {largest}] (a disjoint split "
                         f"of the {len(images)} held-out digits), got {n}")
    if not (isinstance(repeats, (int, np.integer)) and repeats >= 1):
        raise ValueError(f"repeats must be a positive integer, got {repeats}")
    if net is None:
        net, _ = load_feature_net(cache)

    # n digits against the other 500 - n, for each random split
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(repeats):
        perm = rng.permutation(len(images))
        a, b = perm[:n], perm[n:]
        scores.append(compare(net, images[a], labels[a], images[b], k))

    # each score's mean over the splits, and FD's spread
    keys = ("fd", "class_accuracy", "precision", "recall")
    floor = {key: float(np.mean([s[key] for s in scores])) for key in keys}
    fd_std = float(np.std([s["fd"] for s in scores]))
    return dict(floor, fd_std=fd_std, n=n, n_reference=len(images) - n, k=k, repeats=repeats)


# ---------------------------------------------------------------------------------------------
# The sampling settings a model samples best with
# ---------------------------------------------------------------------------------------------

# the grid every digits run searches: guidance x temperature, then fewer decoding steps
SWEEP_CFG = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
SWEEP_TEMPERATURE = (0.7, 0.9, 1.0)
SWEEP_STEPS = (16, 8, 4)
# the coarse round ranks the grid on fewer samples; its best few are rescored on the full count
SWEEP_COARSE_N, SWEEP_FINALISTS = 250, 3


@torch.no_grad()
def sample_scores(model, vae, n=1000, seed=0, net=None, cache=CACHE, **sampling):
    """Scores (evaluate) of n class-balanced samples of a digits model (labels 0, 1, ..., 9, 0, ...)
    decoded by its VAE, with the sampling settings it is given (generate's keywords; num_iter at
    most the number of positions), and those settings. The 250 samples from offset i draw with
    seed (seed, i): the same seed gives every model the same sampling noise."""
    positions = model.config.seq_len
    sampling["num_iter"] = min(sampling.get("num_iter", positions), positions)
    labels = np.arange(n) % NUM_CLASSES
    latents = [model.generate(torch.as_tensor(labels[i:i + 250]), seed=(seed, i), **sampling)
               for i in range(0, n, 250)]
    images = data.decode(vae, torch.cat(latents).cpu())
    return {**sampling, **evaluate(images, labels, net=net, cache=cache)}


def sweep_sampling(model, vae, cfgs=SWEEP_CFG, temperatures=SWEEP_TEMPERATURE,
                   steps=SWEEP_STEPS, n=1000, coarse_n=SWEEP_COARSE_N, finalists=SWEEP_FINALISTS,
                   min_accuracy=0.95, seed=0, net=None, cache=CACHE):
    """The sampling settings a digits model samples best with, in three rounds of class-balanced
    samples: every cfg x temperature on coarse_n samples (steps[0] decoding steps); the best
    `finalists` of those again on n samples; the best finalist with the other step counts on n.
    Returns (rows of all rounds, best): best is the row of n samples with the lowest FD among
    those with class accuracy >= min_accuracy (the most accurate one when none reaches it).

    Only rows of one sample count are compared: an FD of fewer samples is biased upward."""
    from tqdm import tqdm
    net = net if net is not None else load_feature_net(cache)[0]
    score = functools.partial(sample_scores, model, vae, seed=seed, net=net)
    was_training = model.training
    model.eval()
    try:
        # coarse: the whole grid, cheaply
        grid = [(c, t) for c in cfgs for t in temperatures]
        coarse = [score(n=coarse_n, cfg=c, temperature=t, num_iter=steps[0])
                  for c, t in tqdm(grid, desc="sampling sweep", leave=False)]

        # finalists: the best few again, on the full count
        final = [score(n=n, cfg=r["cfg"], temperature=r["temperature"], num_iter=steps[0])
                 for r in ranked_sampling(coarse, min_accuracy)[:finalists]]

        # fewer decoding steps for the best pair
        best = best_sampling(final, min_accuracy)
        final += [score(n=n, cfg=best["cfg"], temperature=best["temperature"], num_iter=s)
                  for s in steps[1:]]
    finally:
        model.train(was_training)
    return coarse + final, best_sampling(final, min_accuracy)


def ranked_sampling(rows, min_accuracy=0.95):
    """Rows from best to worst: those with class accuracy >= min_accuracy by FD, then the rest
    from the most accurate down."""
    good = sorted((r for r in rows if r["class_accuracy"] >= min_accuracy), key=lambda r: r["fd"])
    rest = sorted((r for r in rows if r["class_accuracy"] < min_accuracy),
                  key=lambda r: -r["class_accuracy"])
    return good + rest


def best_sampling(rows, min_accuracy=0.95):
    """The lowest FD among rows with class accuracy >= min_accuracy, else the most accurate row."""
    return ranked_sampling(rows, min_accuracy)[0]
