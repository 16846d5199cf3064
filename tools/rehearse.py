"""Rehearse the released models' path, and training, at the paper's shapes on a CPU.

Random weights, the real command lines (torchrun included), real SIGKILLs half-way.

    python -m tools.rehearse                            # L and H, kl16 (about 20 min, 2 cores)
    python -m tools.rehearse --scale tiny               # the same path, tiny models (minutes)
    python -m tools.rehearse --path train               # training at real shapes (about 20 min)
    python -m tools.rehearse --path train --scale tiny  # the same, tiny models (a minute or two)
    python -m tools.rehearse --out runs/rehearsal --keep    # keep the work folder (default: temp)

Every stage but the first runs what a user types, as a subprocess from the repository root, and
reports its wall time and peak memory: ru_maxrss from os.wait4, the largest single process of the
command's tree. What each stage of --path sample (the default) proves:
  weights   official-format checkpoint-last.pth files for L (with an AdamW state) and H, and MAR's
            kl16.ckpt, written by lib/official.py's inverse converters from random weights
            (in-process)
  convert   tools.released reads both official files (mmap: L's optimizer state is never read)
            and kl16
  sample    torchrun, 2 processes, samples an FID .npz; SIGKILLed (every process of the tree) once 3
            batches are on disk, the same command samples only the missing batches and writes it
  export    export.py writes L's graphs in fp32, fp16 and int8 and H's in fp32 (H's backbone is over
            2 GB: its weights go to backbone.onnx.data)
  onnx      ONNX Runtime samples the same tokens as PyTorch (L); the int8 and H graphs load and run
  evaluate  evaluate.py scores the .npz against a reference batch in ADM's layout (with random
            Inception weights: the numbers mean nothing, the path is the point)
and of --path train:
  data      64 synthetic JPEGs in 4 class folders, a greyscale PNG, a CMYK JPEG and a truncated
            JPEG; a kl16.ckpt with random weights (in-process)
  cache     torchrun, 2 processes: train.py --stop-after 0 builds the latent cache alone; SIGKILLed
            once half its rows are recorded, the same command encodes only the others (the encode
            rate); the corrupt file alone is skipped, with one warning
  train     train.py --preset large, 1 process, 2 steps of 8 images (2 accumulated micro-batches
            of 4) on that cache; SIGKILLed in step 2, resumed with --resume, equal bit for bit to
            the same run straight through (model and EMA)
  ddp       the same with --preset base on 2 processes (torchrun, micro-batches of 2), killed and
            resumed; at real size without the straight twin (time)
  use       sample.py and export.py (fp32) accept the trained L run
--scale tiny runs the same stages and commands with the tiny preset for every model and a tiny LDM
VAE (32 px, stride 4), training runs of 10 steps. The first failing stage ends the run: the stage
table so far, the tail of the command's stderr, and `error: STAGE: ...`.
"""
import argparse
import glob
import io
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from unittest import mock

import numpy as np
import torch
from PIL import Image, ImageDraw

import tokenbridge as tb
from deploy import BACKBONE_FILE, HEAD_FILE, META_FILE, VAE_FILE
from lib import data, official
from lib.cli import DefaultsHelpFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PY = sys.executable
# the torchrun installed beside this python (its workers run this python), else the PATH's
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(PY)) or shutil.which("torchrun")
SCALES = {
    # the paper's models and MAR's kl16: 256 px -> 16x16x16 latents. Training: 2 steps; the
    # killed run dies 10 s into step 2 (a 2-image micro-step of L takes ~30 s on 2 cores)
    "real": dict(large="large", huge="huge", base="base", vae={}, steps=2, kill_delay_s=10,
                 encode_batch=2, ddp_twin=False),
    # the same official layouts, tiny: 32 px through a stride-4 LDM VAE -> 8x8x16 latents (LDM's
    # GroupNorm has 32 groups, so 32 channels is the narrowest VAE). A tiny step takes ~0.2 s:
    # 10 of them, each saved, leave time to kill a run before its end, and a cache encoded one
    # image per batch (~1.5 s in all) leaves time to kill its build half-way
    "tiny": dict(large="tiny", huge="tiny", base="tiny",
                 vae=dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=32,
                          attn_levels=(2,)),
                 steps=10, kill_delay_s=0, encode_batch=1, ddp_twin=True),
}
NUM_IMAGES, KILL_AT = 4, 2      # FID-style sampling: 4 one-image batches, killed once 2 are on disk
# ONNX Runtime vs PyTorch: share of positions whose tokens may differ. A near-tie of the CDF flips
# a token now and then; in one decoding step no position conditions on another, so a flip changes
# its own position only (over several steps it cascades into every later position: measured at
# real size, 4 steps, one flip changed 9% of an image's tokens)
MAX_POSITION_FLIPS = 0.01
POLL_S = 0.2                    # how often a command's peak memory is read (VmHWM only grows)
ADAMW = dict(lr=4e-4, betas=(0.9, 0.95), eps=1e-8)   # official recipe: blr 5e-5 x 2048 / 256


class StageFailed(Exception):
    def __init__(self, stage, message, tail=""):
        super().__init__(message)
        self.stage, self.tail = stage, tail


def gib(kib):
    return kib / 2**20


# --- running and measuring a command ----------------------------------------------------------

class Rehearsal:
    """The work folder, the stage table, and the one way a command is run and measured."""

    def __init__(self, work, scale):
        self.work, self.scale, self.rows, self.log = work, SCALES[scale], [], None
        os.makedirs(self.path("logs"), exist_ok=True)

    def path(self, *names):
        return os.path.join(self.work, *names)

    def start(self, stage, argv):
        """Popen of argv, its stdout and stderr to the log folder: (process, stderr path)."""
        self.log = self.path("logs", f"{len(self.rows):02d}-{stage}")   # the last command's
        print(f"[{stage}] $ {shlex.join(argv)}", flush=True)
        with open(self.log + ".out", "wb") as out, open(self.log + ".err", "wb") as err:
            return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err), self.log + ".err"

    def stdout(self):
        """The last command's stdout (train.py logs there; its progress bars go to stderr)."""
        return read_text(self.log + ".out")

    def record(self, stage, what, wall, peak_kib):
        self.rows.append((stage, what, wall, gib(peak_kib)))
        print(f"[{stage}] {what}: {wall:.1f} s, peak RSS {gib(peak_kib):.2f} GiB", flush=True)

    def amend(self, more):
        """Add to the last row's description what its command's output told."""
        stage, what, wall, peak = self.rows[-1]
        self.rows[-1] = (stage, what + more, wall, peak)
        print(f"[{stage}] {what}{more}", flush=True)

    def run(self, stage, what, argv):
        """Run argv to its end; its stderr text, or StageFailed with its tail. Peak memory: the
        largest VmHWM in its process tree, polled. (Not wait4's ru_maxrss: the child is spawned
        from this process's memory, and Linux starts its ru_maxrss at our own peak, gigabytes
        after this process has compared two L checkpoints.)"""
        begin = time.perf_counter()
        process, err = self.start(stage, argv)
        peak = 0
        while not (ended := os.wait4(process.pid, os.WNOHANG))[0]:
            peak = max(peak, peak_kib(descendants(process.pid)))
            time.sleep(POLL_S)
        process.returncode = os.waitstatus_to_exitcode(ended[1])
        self.record(stage, what, time.perf_counter() - begin, peak)
        text = read_text(err)
        if process.returncode != 0:
            raise StageFailed(stage, f"{what} exited with status {process.returncode}", text)
        return text

    def in_process(self, stage, what, work):
        """work() in this process, timed; peak memory: this process's high-water mark, reset
        first where Linux allows it (else the peak since the rehearsal began)."""
        reset_peak()
        begin = time.perf_counter()
        result = work()
        peak = peak_kib([os.getpid()]) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.record(stage, what, time.perf_counter() - begin, peak)
        return result

    def table(self):
        lines = [("stage", "what ran", "wall s", "peak RSS GiB (largest process)")]
        lines += [(s, w, f"{t:.1f}", f"{m:.2f}") for s, w, t, m in self.rows]
        lines.append(("total", "", f"{sum(r[2] for r in self.rows):.1f}",
                      f"{max((r[3] for r in self.rows), default=0):.2f}"))
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}"
                         for a, b, c, d in lines)


def reset_peak():
    """Reset this process's VmHWM (peak RSS) to its present RSS, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def read_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def tail(text, lines=15):
    """The last lines of a log; progress bars redraw with \\r, so those count as line ends."""
    return "\n".join(re.split(r"[\r\n]+", text.strip())[-lines:])


# --- killing a process tree (torchrun starts its workers in their own sessions) ---------------

def descendants(root):
    """root and every process below it, from the parent ids in /proc/*/stat."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rpartition(")")[2].split()  # the name in (...) may hold spaces
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def signal_each(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def peak_kib(pids):
    """The largest VmHWM (peak RSS) among pids, read before they are killed: a killed worker's
    usage never reaches the launcher's wait4."""
    peak = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f
                                     if line.startswith("VmHWM:")])
        except OSError:
            pass
    return peak


def kill_tree(root):
    """SIGKILL root and all its descendants; returns (their pids, their peak RSS in KiB). They
    are stopped first, so none can start another between the listing and the kill."""
    stopped = set()
    while new := set(descendants(root)) - stopped:   # stopped processes cannot fork: it settles
        signal_each(new, signal.SIGSTOP)
        stopped |= new
    peak = peak_kib(stopped)
    signal_each(stopped, signal.SIGKILL)
    return stopped, peak


def alive(pid):
    """Running or stopped (a zombie runs nothing; its parent, or init, reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pids, timeout_s=10.0):
    """The pids still alive after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def processes(pids):
    return f"{len(pids)} process" + ("es" if len(pids) != 1 else "")


def kill_when(r, stage, argv, ready, waiting, what, delay_s=0.0):
    """Start argv and SIGKILL its whole tree once ready() has held for delay_s; records the row
    what(pids killed). StageFailed if the command ends first or a process outlives the kill."""
    begin = time.perf_counter()
    process, err = r.start(stage, argv)
    ready_at = None
    while ready_at is None or time.monotonic() - ready_at < delay_s:
        pid, status, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            when = f"before {waiting}" if ready_at is None else f"within {delay_s} s of {waiting}"
            raise StageFailed(stage, f"the command ended (status "
                              f"{os.waitstatus_to_exitcode(status)}) {when}: nothing to kill",
                              read_text(err))
        if ready_at is None and ready():
            ready_at = time.monotonic()
        elif ready_at is None or delay_s:
            time.sleep(0.02)
    tree, peak = kill_tree(process.pid)
    os.wait4(process.pid, 0)
    left = wait_gone(tree - {process.pid})
    r.record(stage, what(tree), time.perf_counter() - begin, peak)
    if left:
        raise StageFailed(stage, f"processes {sorted(left)} outlived the SIGKILL of the tree")
    return tree


# --- stage 1: weights -------------------------------------------------------------------------

def wake_adaln(model, std=0.02, seed=1):
    """The model's own init zeroes the head's adaLN (each block starts as the identity); a
    trained model's is not, so give it small random values and every weight takes part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in list(model.head.blocks) + [model.head.final]:
            for p in block.adaLN_modulation[-1].parameters():
                p.copy_(std * torch.randn(p.shape, generator=g))


def adamw_state(state, names, moments=True):
    """The optimizer entry of an official checkpoint: AdamW's two moments of each parameter's
    shape (moments=False: the groups only, as before the first step), decay on >1-D weights."""
    decay = [i for i, k in enumerate(names) if state[k].dim() > 1 and not k.endswith(".bias")]
    plain = [i for i in range(len(names)) if i not in set(decay)]
    return {"state": {i: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(state[k]),
                          "exp_avg_sq": torch.zeros_like(state[k])} for i, k in enumerate(names)}
            if moments else {},
            "param_groups": [dict(params=plain, weight_decay=0.0, **ADAMW),
                             dict(params=decay, weight_decay=0.02, **ADAMW)]}


def write_official_checkpoint(preset, path, moments, seed=0):
    """checkpoint-last.pth as the official code writes it, with random weights (the model's own
    init: the scales training starts from, so sampling stays numerically sane)."""
    torch.manual_seed(seed)
    cfg = official.official_config(preset)
    model = tb.TokenBridge(cfg)
    wake_adaln(model)
    state = official.to_official_state_dict(model)
    names = list(official.official_key_mapping(cfg))            # the official parameters, in order
    args = argparse.Namespace(model=f"tokenbridge_{preset}", img_size=cfg.image_size,
                              vae_stride=cfg.vae_stride, vae_embed_dim=cfg.channels, patch_size=1,
                              class_num=cfg.num_classes, buffer_size=cfg.buffer_size)
    torch.save({"model": state, "model_ema": {k: v.clone() for k, v in state.items()},
                "optimizer": adamw_state(state, names, moments), "epoch": 0, "args": args,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 0}}, path)
    return model.num_params()


def write_ldm_vae(vae_config, stride, path, seed=0):
    """MAR's kl16.ckpt layout ({"model": LDM state dict}) with random weights."""
    from diffusers import AutoencoderKL
    config = official.ldm_vae_config(**vae_config)
    levels = len(config["block_out_channels"])            # each level but the last halves the size
    tb.require(2 ** (levels - 1) == stride, f"the VAE's stride {2 ** (levels - 1)} is not the "
               f"models' {stride}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config)
    torch.save({"model": official.to_ldm_state_dict(vae)}, path)


def write_weights(work, large, huge, vae_config):
    """Official L (with AdamW moments) and H checkpoints and kl16, random, into work."""
    write_official_checkpoint(large, os.path.join(work, "L.pth"), moments=True)
    write_official_checkpoint(huge, os.path.join(work, "H.pth"), moments=False)  # memory
    stride = tb.TokenBridgeConfig.preset(large).vae_stride
    write_ldm_vae(json.loads(vae_config), stride, os.path.join(work, "kl16.ckpt"))


def weights(r):
    # in a child process: its memory goes with it (this process's later in-process rows would
    # show the gigabytes of L and H otherwise), and the row measures it as any command
    large, huge = r.scale["large"], r.scale["huge"]
    code = "import sys; from tools import rehearse; rehearse.write_weights(*sys.argv[1:])"
    r.run("weights", f"official L.pth ({large}, with AdamW moments), H.pth ({huge}), kl16.ckpt, "
          "random", [PY, "-c", code, r.work, large, huge, json.dumps(r.scale["vae"])])


# --- stage 2: convert -------------------------------------------------------------------------

def convert(r):
    for name in ("large", "huge"):
        preset, out = r.scale[name], r.path(f"official-{name}")
        pth, vae = r.path("L.pth" if name == "large" else "H.pth"), r.path("kl16.ckpt")
        r.run("convert", f"tools.released --preset {preset} ({name})",
              [PY, "-m", "tools.released", "--official", pth, "--preset", preset, "--vae", vae,
               "--out", out])


# --- stage 3: sample, killed half-way, resumed --------------------------------------------------

def sample_argv(r):
    # --run-dir, never --run: torchrun reads --run as its own --run-path and stops
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "sample.py",
            "--run-dir", r.path("official-large"), "--num-images", str(NUM_IMAGES),
            "--batch-size", "1", "--num-iter", "4", "--cfg", "3", "--npz", r.path("fid.npz"),
            "--out", r.path("fid.png"), "--device", "cpu", "--threads", "1"]


def batches_on_disk(r):
    return len(glob.glob(r.path("fid.npz.parts", "batch_*.npz")))


def sample_and_kill(r):
    """Start the FID sampling, SIGKILL its whole tree once KILL_AT batches are on disk; returns
    how many batches survived."""
    kill_when(r, "sample", sample_argv(r), lambda: batches_on_disk(r) >= KILL_AT,
              f"{KILL_AT} batches were on disk",
              lambda tree: f"torchrun sample.py, SIGKILL of {processes(tree)} at "
                           f"{batches_on_disk(r)}/{NUM_IMAGES} batches")
    done = batches_on_disk(r)
    if not KILL_AT <= done < NUM_IMAGES:
        raise StageFailed("sample", f"{done} batches on disk after the kill; expected "
                          f"{KILL_AT}..{NUM_IMAGES - 1}", read_text(r.log + ".err"))
    return done


def skipped_images(stderr):
    """Images each rank found on disk, summed: the first count of its progress bar
    (jobs.sample_in_batches starts the bar at the batches it skips)."""
    first = {}
    bars = re.findall(r"sample \(rank (\d+)\):[^|\r\n]*\|[^|\r\n]*\|\s*(\d+)/\d+", stderr)
    for rank, count in bars:
        first.setdefault(rank, int(count))
    return sum(first.values()) if first else None


def check_npz(r, num_classes):
    path, size = r.path("fid.npz"), tb.TokenBridgeConfig.preset(r.scale["large"]).image_size
    with np.load(path) as npz:
        images, labels = npz["arr_0"], npz["labels"]
    want = (NUM_IMAGES, size, size, 3)
    if images.shape != want or images.dtype != np.uint8:
        raise StageFailed("sample", f"{path}: arr_0 is {images.dtype} {images.shape}, "
                          f"not uint8 {want}")
    if not np.array_equal(labels, np.arange(NUM_IMAGES) % num_classes):
        raise StageFailed("sample", f"{path}: labels {labels.tolist()} are not 0, 1, 2, ...")
    if os.path.exists(path + ".parts"):
        raise StageFailed("sample", f"{path}.parts is still there after the npz was written")


def sample(r):
    if TORCHRUN is None:
        raise StageFailed("sample", f"no torchrun beside {PY} or on the PATH (it comes with torch)")
    done = sample_and_kill(r)
    stderr = r.run("sample", f"torchrun sample.py again: {NUM_IMAGES - done} missing batches",
                   sample_argv(r))
    skipped = skipped_images(stderr)
    if skipped != done:  # one image per batch
        raise StageFailed("sample", f"the re-run skipped {skipped} images; {done} batches were on "
                          "disk", stderr)
    check_npz(r, tb.TokenBridgeConfig.preset(r.scale["large"]).num_classes)


# --- stage 4: export ----------------------------------------------------------------------------

def export(r):
    for run, out, flags in (("official-large", "onnx-large", []),
                            ("official-large", "onnx-large-fp16", ["--fp16"]),
                            ("official-large", "onnx-large-int8", ["--int8"]),
                            ("official-huge", "onnx-huge", [])):
        r.run("export", f"export.py {run} {' '.join(flags) or 'fp32'}",
              [PY, "export.py", "--run-dir", r.path(run), "--out", r.path(out)] + flags)
    data = r.path("onnx-huge", "backbone.onnx.data")
    if r.scale["huge"] == "huge" and not os.path.isfile(data):
        raise StageFailed("export", f"H's backbone is over 2 GB but {data} was not written")


# --- stage 5: ONNX Runtime against PyTorch ------------------------------------------------------

def sample_tokens(r, what, source, tokens, labels):
    # every setting given: a run folder's sampling.json (the released ones) fills what is left out
    # for the torch runtime, and the ONNX command names no run folder
    argv = [PY, "sample.py", *source, "--labels", labels, "--num-iter", "1", "--cfg", "3",
            "--temperature", "1", "--seed", "0", "--save-tokens", r.path(tokens), "--out", "",
            "--device", "cpu"]
    r.run("onnx", what, argv)
    return np.load(r.path(tokens))


def onnx(r):
    ort = sample_tokens(r, "sample.py --runtime onnx (L, 2 images)",
                        ["--onnx", r.path("onnx-large"), "--runtime", "onnx"], "onnx.npy", "1,2")
    ref = sample_tokens(r, "sample.py --runtime torch (L, 2 images)",
                        ["--run-dir", r.path("official-large"), "--runtime", "torch"], "torch.npy",
                        "1,2")
    if ort.shape != ref.shape:
        raise StageFailed("onnx", f"ONNX Runtime's tokens are {ort.shape}, PyTorch's {ref.shape}")
    differ = float((ort != ref).any(-1).mean())
    print(f"[onnx] positions whose tokens differ between ONNX Runtime and PyTorch (one step): "
          f"{differ:.2%}", flush=True)
    if differ > MAX_POSITION_FLIPS:
        raise StageFailed("onnx", f"{differ:.2%} of the positions differ between ONNX Runtime and "
                          f"PyTorch (at most {MAX_POSITION_FLIPS:.0%} may flip at near-ties)")
    for graphs, name in (("onnx-large-int8", "L int8"), ("onnx-huge", "H")):
        sample_tokens(r, f"sample.py --runtime onnx ({name}, 1 image)",
                      ["--onnx", r.path(graphs), "--runtime", "onnx"], f"{graphs}.npy", "1")


# --- stage 6: evaluate --------------------------------------------------------------------------

def write_reference(path, size, count=10, seed=0):
    """A reference batch in ADM's layout: arr_0 (synthetic images), mu and sigma of 2048-d pool
    features (here a standard normal: any valid mean and covariance serve the rehearsal)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    images = [np.clip(np.stack([ramp[:, None] * a + ramp[None, :] * (1 - a)] * 3, -1)
                      + rng.normal(0, 20, (size, size, 3)), 0, 255) for a in rng.random(count)]
    np.savez(path, arr_0=np.stack(images).astype(np.uint8), mu=np.zeros(2048),
             sigma=np.eye(2048))


def write_random_inception(path):
    """A state dict of torch_fidelity's FeatureExtractorInceptionV3 with random weights. Its
    constructor loads weights (downloads them when no path is given): an empty file and a
    load_state_dict that does nothing keep the random init."""
    from torch_fidelity.feature_extractor_inceptionv3 import (
        FeatureExtractorInceptionV3 as Inception,
    )
    empty = path + ".empty"
    torch.save({}, empty)
    torch.manual_seed(0)
    with mock.patch.object(Inception, "load_state_dict", lambda self, state_dict: None):
        net = Inception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    os.remove(empty)
    # PyTorch's default init shrinks the signal layer by layer (pool features ~1e-8, all alike);
    # He init keeps it near unit scale, so the features differ from image to image
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def evaluate(r):
    size = tb.TokenBridgeConfig.preset(r.scale["large"]).image_size
    r.in_process("evaluate", "reference .npz (ADM layout) + random Inception weights (in-process)",
                 lambda: (write_reference(r.path("reference.npz"), size),
                          write_random_inception(r.path("inception.pth"))))
    metrics = r.path("metrics.json")
    r.run("evaluate", "tools.evaluate on fid.npz",
          [PY, "-m", "tools.evaluate", "--samples", r.path("fid.npz"),
           "--reference", r.path("reference.npz"),
           "--inception-weights", r.path("inception.pth"), "--device", "cpu", "--batch-size", "8",
           "--out", metrics])
    with open(metrics) as f:
        print(f"[evaluate] {metrics}: {json.dumps(json.load(f))}", flush=True)


STAGES = [("weights", weights), ("convert", convert), ("sample", sample), ("export", export),
          ("onnx", onnx), ("evaluate", evaluate)]


# === the training path (--path train) ==========================================================

IMAGES, CLASSES = 64, 4            # the synthetic folder: 64 images in 4 class folders
BATCH = 8                          # global batch of every training run
CORRUPT = os.path.join("class2", "corrupt.jpg")


def image_size(r):
    return tb.TokenBridgeConfig.preset(r.scale["large"]).image_size


# --- stage 1: data ----------------------------------------------------------------------------

def synthetic_image(rng, size, k):
    """A smooth colour field (a 4x4 grid of random colours, bicubic) with one shape of class k,
    up to a quarter wider than tall, so the loader's centre crop has work to do."""
    width = int(size * rng.uniform(1.0, 1.25))
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, size), Image.BICUBIC)
    (x0, y0), (w, h) = rng.uniform(0, 0.5, 2) * (width, size), rng.uniform(0.25, 0.5, 2)
    x1, y1 = x0 + w * width, y0 + h * size
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw = ImageDraw.Draw(image)
    if k == 0:
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif k == 1:
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif k == 2:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
    else:
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=max(2, size // 16))
    return image


def write_images(root, size, seed=0):
    """IMAGES JPEGs in CLASSES class folders, plus what a real folder holds: a greyscale PNG and
    a CMYK JPEG (both converted to RGB when read) and a truncated JPEG (skipped, one warning)."""
    rng = np.random.default_rng(seed)
    for i in range(IMAGES):
        os.makedirs(os.path.join(root, f"class{i % CLASSES}"), exist_ok=True)
        synthetic_image(rng, size, i % CLASSES).save(
            os.path.join(root, f"class{i % CLASSES}", f"{i:03d}.jpg"), quality=90)
    synthetic_image(rng, size, 0).convert("L").save(os.path.join(root, "class0", "grey.png"))
    synthetic_image(rng, size, 1).convert("CMYK").save(os.path.join(root, "class1", "cmyk.jpg"))
    whole = io.BytesIO()
    synthetic_image(rng, size, 2).save(whole, "JPEG")
    with open(os.path.join(root, CORRUPT), "wb") as f:
        f.write(whole.getvalue()[:len(whole.getvalue()) // 3])


def held_out_file(r):
    """The one image --val-size 1 holds out (a fixed split of the listing)."""
    images = data.load_folder(r.path("images"), image_size(r))[0]
    _, val_idx = data.split_validation(len(images), 1)
    return os.path.relpath(images.files[int(val_idx[0])], r.path("images"))


def make_data(r):
    def write():
        write_images(r.path("images"), image_size(r))
        stride = tb.TokenBridgeConfig.preset(r.scale["large"]).vae_stride
        write_ldm_vae(r.scale["vae"], stride, r.path("kl16.ckpt"))
    r.in_process("data", f"{IMAGES} JPEGs ({CLASSES} classes, {image_size(r)} px), grey PNG, CMYK "
                 "JPEG, corrupt .jpg; kl16.ckpt, random (in-process)", write)
    # a held-out file that does not decode would send the reconstruction report back to up to
    # 500 training images: minutes of VAE decoding at 256 px
    if held_out_file(r) == CORRUPT:
        raise StageFailed("data", f"--val-size 1 holds out {CORRUPT}; rename it")


# --- stage 2: the latent cache, built by 2 ranks, killed half-way, resumed ---------------------

def train_argv(r, preset, out, *flags, ranks=1):
    """train.py as a user types it on the folder, the VAE and the shared cache, on `ranks`
    processes. --val-size 1: every new run starts with a reconstruction report that decodes the
    held-out images (without any, up to 500 training ones) three times: minutes at 256 px."""
    launch = [PY] if ranks == 1 else [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks)]
    return launch + ["train.py", "--data", r.path("images"), "--vae", r.path("kl16.ckpt"),
                     "--preset", preset, "--latents", r.path("latents"), "--out", r.path(out),
                     "--val-size", "1", "--device", "cpu", *flags]


def need_torchrun(stage):
    if TORCHRUN is None:
        raise StageFailed(stage, f"no torchrun beside {PY} or on the PATH (it comes with torch)")


def recorded_rows(r):
    """Rows the build's progress records say are on disk; a line cut by the kill has no newline
    and does not count (as data.py reads them)."""
    rows = 0
    for path in glob.glob(r.path("latents.progress.*")):
        for line in read_text(path).splitlines(keepends=True):
            if line.endswith("\n"):
                start, stop = line.split()[:2]
                rows += int(stop) - int(start)
    return rows


def check_resumed_build(r, stdout, done, total):
    """The relaunch resumed from the recorded rows and encoded only the others; amends the row
    with the encode rate."""
    npy = data.cache_paths(r.path("latents"))[0]
    if f"resuming the build of {npy}: {done} of {total} images done" not in stdout:
        raise StageFailed("cache", f"the relaunch did not resume from the {done} recorded rows",
                          stdout)
    encoded = re.search(r"\[cache\] encoded (\d+) images in ([\d.]+) s", stdout)
    if not encoded or int(encoded[1]) != total - done:
        raise StageFailed("cache", f"the relaunch encoded {encoded and encoded[1]} images, not "
                          f"the {total - done} missing", stdout)
    r.amend(f", {int(encoded[1]) / float(encoded[2]):.2f} images/s (both flips)")


def check_unreadable(r, stderr):
    """The corrupt file alone is unreadable (grey and CMYK decode), with one warning."""
    images = data.load_folder(r.path("images"), image_size(r))[0]
    corrupt = images.files.index(r.path("images", CORRUPT))
    unreadable = data.open_cache(r.path("latents")).unreadable.tolist()
    if unreadable != [corrupt] or "warning: skipped 1 unreadable" not in stderr:
        raise StageFailed("cache", f"unreadable rows {unreadable}, expected [{corrupt}] "
                          f"({CORRUPT}) and one warning", stderr)


def cache(r):
    need_torchrun("cache")
    total = len(data.load_folder(r.path("images"), image_size(r))[0])
    argv = train_argv(r, r.scale["base"], "cache-run", "--steps", "1", "--stop-after", "0",
                      "--encode-batch", str(r.scale["encode_batch"]), "--workers", "1", ranks=2)
    kill_when(r, "cache", argv, lambda: recorded_rows(r) >= total // 2,
              f"{total // 2} rows were recorded",
              lambda tree: f"torchrun train.py --stop-after 0, SIGKILL of {processes(tree)} at "
                           f"{recorded_rows(r)}/{total} rows")
    done = recorded_rows(r)
    if not 0 < done < total or data.open_cache(r.path("latents")) is not None:
        raise StageFailed("cache", f"{done} of {total} rows recorded after the kill: the build "
                          "was not caught half-way", read_text(r.log + ".err"))
    stderr = r.run("cache", f"the same command again: {total - done} missing rows", argv)
    check_resumed_build(r, r.stdout(), done, total)
    check_unreadable(r, stderr)
    if os.path.exists(r.path("cache-run", "checkpoint.pt")):
        raise StageFailed("cache", "--stop-after 0 trained: it wrote a checkpoint")


# --- stage 3: training, killed in a step and resumed, against a run straight through ----------

def checkpoint(run):
    """A run's checkpoint, memory-mapped: its step and names cost no tensor reads."""
    return torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=True,
                      mmap=True)


def train_and_kill(r, stage, label, argv, run):
    """Start a training run that saves every step; SIGKILL its tree kill_delay_s after its
    first checkpoint is on disk, in the next step. Returns the step its checkpoint holds."""
    path = os.path.join(run, "checkpoint.pt")
    kill_when(r, stage, argv, lambda: os.path.isfile(path), "its first checkpoint was on disk",
              lambda tree: f"{label}, SIGKILL of {processes(tree)} after step "
                           f"{checkpoint(run)['step']}", r.scale["kill_delay_s"])
    step, steps = checkpoint(run)["step"], r.scale["steps"]
    if not 1 <= step < steps or os.path.exists(os.path.join(run, "metrics.json")):
        raise StageFailed(stage, f"the run was at step {step} of {steps} when killed: it "
                          "finished first", read_text(r.log + ".err"))
    return step


def resume(r, stage, label, run, ranks, step):
    """`train.py --resume RUN` on as many processes; it must go on from `step` to the end and
    move the weights (the recipe's lr is 0 at step 0 of a warm-up: it has none here)."""
    before = checkpoint(run)["model"]["head.out_bias"].clone()
    launch = [PY] if ranks == 1 else [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks)]
    # --grid-per-class again: --resume takes the launch's flags (RUNTIME_KEYS) from its own
    # command line, defaults included, and the default grid of L is 100 images of 64 steps
    r.run(stage, f"{label} --resume: steps {step + 1}-{r.scale['steps']}",
          launch + ["train.py", "--resume", run, "--device", "cpu", "--grid-per-class", "0"])
    after = checkpoint(run)
    if f"[resume] from step {step} of {r.scale['steps']}" not in r.stdout():
        raise StageFailed(stage, f"--resume did not say it goes on from step {step}", r.stdout())
    if after["step"] != r.scale["steps"] or len(after["rng"]) != ranks:
        raise StageFailed(stage, f"the resumed run ends at step {after['step']} with "
                          f"{len(after['rng'])} RNG states, not {r.scale['steps']} and {ranks}")
    if torch.equal(before, after["model"]["head.out_bias"]):
        raise StageFailed(stage, "the resumed steps left head.out_bias as it was")


def bit_identical(r, stage, resumed, straight):
    """The model and EMA state dicts of two runs' checkpoints, tensor by tensor."""
    a, b = checkpoint(resumed), checkpoint(straight)
    names = [(part, name) for part in ("model", "ema") for name in a[part]]
    if a["step"] != b["step"] or any(a[p].keys() != b[p].keys() for p in ("model", "ema")):
        raise StageFailed(stage, f"{resumed} (step {a['step']}) and {straight} (step "
                          f"{b['step']}) do not hold the same tensors")
    differ = [f"{p}.{n}" for p, n in names if not torch.equal(a[p][n], b[p][n])]
    if differ:
        raise StageFailed(stage, f"{len(differ)} of {len(names)} tensors differ between the "
                          f"resumed and the straight run, e.g. {', '.join(differ[:3])}")
    return len(names)


def rehearse_training(r, stage, preset, ranks, micro_batch, twin=True):
    """A run of 2 (tiny: 10) steps of BATCH images, killed in a step and resumed, compared
    bit for bit with the same run straight through (twin). No warm-up: the recipe's starts at
    lr 0, so 2 steps would barely move a weight and two different runs could compare equal."""
    flags = ["--batch", str(BATCH), "--micro-batch", str(micro_batch), "--steps",
             str(r.scale["steps"]), "--warmup-epochs", "0", "--grid-per-class", "0", "--no-sweep"]
    run = r.path(f"train-{preset}-{ranks}")
    label = ("torchrun " if ranks > 1 else "") + f"train.py --preset {preset}"
    argv = train_argv(r, preset, run, *flags, "--save-every", "1", ranks=ranks)
    resume(r, stage, label, run, ranks, train_and_kill(r, stage, label, argv, run))
    if not twin:
        return run
    # checkpoints change no weight (tests/test_train.py): the twin saves only its last
    straight = run + "-straight"
    r.run(stage, f"{label} straight through, saved at its end only",
          train_argv(r, preset, straight, *flags, ranks=ranks))
    count = r.in_process(stage, "the resumed model and EMA == the straight run's (in-process)",
                         lambda: bit_identical(r, stage, run, straight))
    r.amend(f": {count} tensors, bit for bit")
    shutil.rmtree(straight)  # a reference only; at real size, 8 GB of disk
    return run


def train(r):
    """TokenBridge-L on one process (two do not fit 24 GB), 4 micro-batches of 2 per step: L's
    fp32 activations take about 3.6 GB per image on the CPU (the head runs on every position's
    16 channel slots), so micro-batches of 4 would peak at about 23 GB."""
    rehearse_training(r, "train", r.scale["large"], ranks=1, micro_batch=2)


def ddp(r):
    """DDP on 2 processes, 2 micro-batches of 2 each per step: --preset base (two L do not fit
    24 GB). At real size without the straight twin (time: the 20 minutes)."""
    need_torchrun("ddp")
    rehearse_training(r, "ddp", r.scale["base"], ranks=2, micro_batch=2,
                      twin=r.scale["ddp_twin"])


# --- stage 4: the trained run samples and exports -----------------------------------------------

def use(r):
    run = r.path(f"train-{r.scale['large']}-1")
    png = r.path("x.png")
    r.run("use", "sample.py on the trained L run (1 image, 2 steps)",
          [PY, "sample.py", "--run-dir", run, "--num-images", "1", "--num-iter", "2", "--out", png,
           "--device", "cpu"])
    with Image.open(png) as image:
        if min(image.size) < image_size(r):
            raise StageFailed("use", f"{png} is {image.size}, smaller than one image")
    r.run("use", "export.py on the trained L run, fp32",
          [PY, "export.py", "--run-dir", run, "--out", r.path("onnx")])
    missing = [f for f in (META_FILE, BACKBONE_FILE, HEAD_FILE, VAE_FILE)
               if not os.path.isfile(r.path("onnx", f))]
    if missing:
        raise StageFailed("use", f"export.py wrote no {', '.join(missing)}")


TRAIN_STAGES = [("data", make_data), ("cache", cache), ("train", train), ("ddp", ddp),
                ("use", use)]


# --- main ---------------------------------------------------------------------------------------

def weight_bytes(scale, *names):
    """fp32 bytes of each named model of the scale (built on the meta device: no memory)."""
    with torch.device("meta"):
        return [tb.TokenBridge(tb.TokenBridgeConfig.preset(scale[n])).num_params() * 4
                for n in names]


def disk_need(path, scale):
    if path == "sample":
        large, huge = weight_bytes(scale, "large", "huge")
        # L: .pth (model, EMA, 2 moments), run, onnx fp32 + fp16 + int8; H: .pth (model, EMA),
        # run, onnx
        return large * (4 + 1 + 1.75) + huge * (2 + 1 + 1)
    large, base = weight_bytes(scale, "large", "base")
    # checkpoints hold model, EMA and 2 moments: L's killed run (twice while its last is
    # written), its straight twin, its fp32 graphs; base's runs alike; the VAE's copies (2 GiB)
    return large * (4 * 3 + 1) + base * 4 * 3 + 2 * 2**30


def check_disk(work, path, scale):
    """The files of a real-size rehearsal take tens of GB: refuse up front when they cannot fit."""
    need = disk_need(path, scale)
    free = shutil.disk_usage(work).free
    if free < 1.1 * need:
        raise ValueError(f"the rehearsal writes about {need / 2**30:.0f} GiB and {work} has "
                         f"{free / 2**30:.0f} GiB free; give --out on a larger disk")


def work_folder(args):
    if args.out is None:
        return tempfile.mkdtemp(prefix="rehearsal-")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} is not empty (a rehearsal starts from nothing); "
                         "remove it or choose another folder")
    os.makedirs(args.out, exist_ok=True)
    return os.path.abspath(args.out)  # the commands run in the repository root


def main(args):
    work = work_folder(args)
    r = Rehearsal(work, args.scale)
    print(f"rehearsal of the {args.path} path at {args.scale} size in {work}", flush=True)
    try:
        check_disk(work, args.path, r.scale)
        for stage, run in STAGES if args.path == "sample" else TRAIN_STAGES:
            try:
                run(r)
            except StageFailed:
                raise
            except Exception as e:  # in-process work: say where, with the traceback's end
                raise StageFailed(stage, " ".join(str(e).split()) or type(e).__name__,
                                  traceback.format_exc()) from e
        print("\n" + r.table())
    except StageFailed as e:
        print("\n" + r.table() + "\n\n" + tail(e.tail), file=sys.stderr)
        raise ValueError(f"{e.stage}: {e}") from None
    finally:
        if args.keep:
            print(f"kept the work folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    p.add_argument("--path", choices=["sample", "train"], default="sample",
                   help="sample: the released weights sampled, exported and scored; train: a "
                        "folder trained on, from the latent cache to the exported run")
    p.add_argument("--scale", choices=sorted(SCALES), default="real",
                   help="real: TokenBridge-L and -H with kl16 at 256 px; tiny: the same path, "
                        "tiny models")
    p.add_argument("--out", help="work folder, new or empty (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (default: remove it)")
    return p


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
