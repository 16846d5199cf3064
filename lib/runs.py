"""A run folder: what train.py and tools/released.py write, and the scripts and tools read.

    RUN/checkpoint.pt    config, weights (model and EMA), optimizer, step, RNG states, flags
    RUN/vae/             the frozen VAE, a diffusers AutoencoderKL folder
    RUN/onnx/            the graphs export.py writes (deploy.py reads them)

One safe loader for torch files (torch.load with weights_only=True: no code in a file can run),
one VAE loader, and torch files and JSON written whole or not at all (lib/files.py). Everything
here raises ValueError with one line; the scripts print it.
"""
import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path

import torch

import tokenbridge as tb
from lib.files import write_atomic

CHECKPOINT, VAE_DIR = "checkpoint.pt", "vae"


def read_torch_file(path, what, fix, safe_globals=()):
    """torch.load(path, weights_only=True) with every failure as one ValueError: `what` the file
    should have been, `fix` what to do. safe_globals: the only classes it may build."""
    if not os.path.isfile(path):
        raise ValueError(f"no {what} at {path}; {fix}")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(safe_globals)):
            # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            return _load(path)
    except pickle.UnpicklingError:
        # torch's text is a paragraph about its defaults; this is the point
        raise ValueError(f"{path} is not a {what} (torch.load with weights_only=True refused it: "
                         "it holds more than tensors and plain containers, or is not a pickle); "
                         f"{fix}") from None
    except (RuntimeError, EOFError, KeyError, OSError) as e:
        # a truncated zip, an empty or foreign file: torch's first sentence says what
        first = (" ".join(str(e).split()) or type(e).__name__).split(". ")[0]
        raise ValueError(f"{path} is not a {what} (truncated, or not written by torch.save: "
                         f"{first}); {fix}") from None


def _load(path):
    """torch.load memory-mapped: tensors stay in the file until used, so what a caller does not
    read (the optimizer state, when sampling) never reaches memory. Files in torch's legacy
    format (not a zip) cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(run):
    """RUN/checkpoint.pt as a dict with at least "config" and "model"."""
    fix = "give a run folder written by train.py (or tools/released.py, for the released weights)"
    path = Path(run) / CHECKPOINT
    ckpt = read_torch_file(path, "TokenBridge checkpoint", fix)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)
            and isinstance(ckpt.get("model"), dict)):
        raise ValueError(f"{path} is not a TokenBridge checkpoint (it has no \"config\" and "
                         f"\"model\"); {fix}")
    return ckpt


def torch_device(requested, index=0):
    """--device auto is CUDA when torch can use it, else the CPU; an explicit cuda it cannot use
    is refused."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch.cuda.is_available() is False (a CPU build of "
                         "torch, or no GPU/driver); use --device auto (CPU when CUDA does not "
                         "work) or cpu")
    return f"cuda:{index}" if requested != "cpu" and torch.cuda.is_available() else "cpu"


def load_run(run, device="cpu", weights="ema"):
    """RUN -> (model in eval mode, checkpoint dict). weights: "ema", the EMA weights when the run
    has them (else the raw ones), or "raw", the optimizer's own (to look at a young run)."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, got {weights!r}")
    ckpt = load_checkpoint(run)
    model = tb.TokenBridge(tb.TokenBridgeConfig.from_dict(ckpt["config"]))
    state = dict(ckpt["model"])
    if weights == "ema" and ckpt.get("ema") is not None:
        state.update(ckpt["ema"])  # the EMA may hold parameters only; buffers come from `model`
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt


def fingerprint(model):
    """sha256 over the state dict (names, dtypes, shapes, bytes): the identity of the weights,
    unchanged by re-saving the checkpoint; export.py stores it in the JSON and in every graph."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def has_vae(run):
    return (Path(run) / VAE_DIR / "config.json").is_file()


def load_vae(folder, device="cpu"):
    """A diffusers AutoencoderKL folder, frozen, in eval mode."""
    from diffusers import AutoencoderKL
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{folder} is not a diffusers AutoencoderKL folder (no config.json)")
    vae = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


def atomic_save(obj, path):
    """torch.save, written whole or not at all (files.write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
