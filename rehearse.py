"""Rehearse the released models' path at the paper's shapes on a CPU: random weights, the real
command lines (torchrun included), a real SIGKILL half-way through sampling.

    python rehearse.py                       # TokenBridge-L and -H, kl16 (about 20 min, 2 cores)
    python rehearse.py --scale tiny          # the same path with tiny models (a few minutes)
    python rehearse.py --out runs/rehearsal --keep   # keep the work folder (default: a temp one)

Every stage but the first runs what a user types, as a subprocess from the repository root, and
reports its wall time and peak memory: ru_maxrss from os.wait4, the largest single process of the
command's tree (DESIGN.md §4, "Real size"). What each stage proves:
  weights   official-format checkpoint-last.pth files for L (with an AdamW state) and H, and MAR's
            kl16.ckpt, written by interop's inverse converters from random weights (in-process)
  convert   interop.py reads both official files (mmap: L's optimizer state is never read) and kl16
  sample    torchrun, 2 processes, samples an FID .npz; SIGKILLed (every process of the tree) once 3
            batches are on disk, the same command samples only the missing batches and writes it
  export    export.py writes L's graphs in fp32, fp16 and int8 and H's in fp32 (H's backbone is over
            2 GB: its weights go to backbone.onnx.data)
  onnx      ONNX Runtime samples the same tokens as PyTorch (L); the int8 and H graphs load and run
  evaluate  evaluate.py scores the .npz against a reference batch in ADM's layout (with random
            Inception weights: the numbers mean nothing, the path is the point)
--scale tiny runs the same stages and commands with the tiny preset for both L and H and a tiny LDM
VAE (32 px, stride 4). The first failing stage ends the run: the stage table so far, the tail of the
command's stderr, and `error: STAGE: ...`.
"""
import argparse
import glob
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

import interop
import tokenbridge as tb

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
# the torchrun installed beside this python (its workers run this python), else the PATH's
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(PY)) or shutil.which("torchrun")
SCALES = {
    # the paper's models and MAR's kl16: 256 px -> 16x16x16 latents
    "real": dict(large="large", huge="huge", vae={}),
    # the same official layouts, tiny: 32 px through a stride-4 LDM VAE -> 8x8x16 latents (LDM's
    # GroupNorm has 32 groups, so 32 channels is the narrowest VAE)
    "tiny": dict(large="tiny", huge="tiny",
                 vae=dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=32,
                          attn_levels=(2,))),
}
NUM_IMAGES, KILL_AT = 8, 3      # FID-style sampling: 8 one-image batches, killed once 3 are on disk
MAX_TOKEN_FLIPS = 0.01          # ONNX Runtime vs PyTorch: a rare near-tie of the CDF may flip one
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
        self.work, self.scale, self.rows = work, SCALES[scale], []
        os.makedirs(self.path("logs"), exist_ok=True)

    def path(self, *names):
        return os.path.join(self.work, *names)

    def start(self, stage, argv):
        """Popen of argv, its stdout and stderr to the log folder: (process, stderr path)."""
        log = self.path("logs", f"{len(self.rows):02d}-{stage}")
        print(f"[{stage}] $ {shlex.join(argv)}", flush=True)
        with open(log + ".out", "wb") as out, open(log + ".err", "wb") as err:
            return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err), log + ".err"

    def record(self, stage, what, wall, peak_kib):
        self.rows.append((stage, what, wall, gib(peak_kib)))
        print(f"[{stage}] {what}: {wall:.1f} s, peak RSS {gib(peak_kib):.2f} GiB", flush=True)

    def run(self, stage, what, argv):
        """Run argv to its end; its stderr text, or StageFailed with its tail."""
        begin = time.perf_counter()
        process, err = self.start(stage, argv)
        _, status, usage = os.wait4(process.pid, 0)  # not wait(): wait4 also gives the peak memory
        process.returncode = os.waitstatus_to_exitcode(status)
        self.record(stage, what, time.perf_counter() - begin, usage.ru_maxrss)
        text = read_text(err)
        if process.returncode != 0:
            raise StageFailed(stage, f"{what} exited with status {process.returncode}", text)
        return text

    def in_process(self, stage, what, work):
        """work() in this process, timed; peak memory: this process's high-water mark, reset
        first where Linux allows it (else the peak since the rehearsal began)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset VmHWM to the present RSS
        except OSError:
            pass
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
    cfg = interop.official_config(preset)
    model = tb.TokenBridge(cfg)
    wake_adaln(model)
    state = interop.to_official_state_dict(model)
    names = list(interop.official_key_mapping(cfg))            # the official parameters, in order
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
    config = interop.ldm_vae_config(**vae_config)
    levels = len(config["block_out_channels"])            # each level but the last halves the size
    tb.require(2 ** (levels - 1) == stride, f"the VAE's stride {2 ** (levels - 1)} is not the "
               f"models' {stride}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config)
    torch.save({"model": interop.to_ldm_state_dict(vae)}, path)


def weights(r):
    large, huge = r.scale["large"], r.scale["huge"]

    def write():
        print(f"[weights] writing L.pth ({large}, with AdamW moments), H.pth ({huge}), kl16.ckpt",
              flush=True)
        write_official_checkpoint(large, r.path("L.pth"), moments=True)
        write_official_checkpoint(huge, r.path("H.pth"), moments=False)   # memory: no moments
        stride = tb.TokenBridgeConfig.preset(large).vae_stride
        write_ldm_vae(r.scale["vae"], stride, r.path("kl16.ckpt"))
    r.in_process("weights", "official L.pth, H.pth and kl16.ckpt, random (in-process)", write)


# --- stage 2: convert -------------------------------------------------------------------------

def convert(r):
    for name in ("large", "huge"):
        preset, out = r.scale[name], r.path(f"official-{name}")
        pth, vae = r.path("L.pth" if name == "large" else "H.pth"), r.path("kl16.ckpt")
        r.run("convert", f"interop.py --preset {preset} ({name})",
              [PY, "interop.py", "--official", pth, "--preset", preset, "--vae", vae, "--out", out])


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
    begin = time.perf_counter()
    process, err = r.start("sample", sample_argv(r))
    while batches_on_disk(r) < KILL_AT:
        pid, status, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            raise StageFailed("sample", f"torchrun ended (status {process.returncode}) before "
                              f"{KILL_AT} batches were on disk: nothing to kill", read_text(err))
        time.sleep(0.02)
    tree, peak = kill_tree(process.pid)
    _, status, _ = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    left = wait_gone(tree - {process.pid})
    done = batches_on_disk(r)
    r.record("sample", f"torchrun sample.py, SIGKILL of {len(tree)} processes at "
             f"{done}/{NUM_IMAGES} batches", time.perf_counter() - begin, peak)
    if left:
        raise StageFailed("sample", f"processes {sorted(left)} outlived the SIGKILL of the tree")
    if not KILL_AT <= done < NUM_IMAGES:
        raise StageFailed("sample", f"{done} batches on disk after the kill; expected "
                          f"{KILL_AT}..{NUM_IMAGES - 1}", read_text(err))
    return done


def skipped_images(stderr):
    """Images each rank found on disk, summed: the first count of its progress bar
    (deploy.sample_in_batches starts the bar at the batches it skips)."""
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
    argv = [PY, "sample.py", *source, "--labels", labels, "--num-iter", "4", "--cfg", "3",
            "--seed", "0", "--save-tokens", r.path(tokens), "--out", "", "--device", "cpu"]
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
    differ = float((ort != ref).mean())
    print(f"[onnx] tokens that differ between ONNX Runtime and PyTorch: {differ:.2%}", flush=True)
    if differ > MAX_TOKEN_FLIPS:
        raise StageFailed("onnx", f"{differ:.2%} of ONNX Runtime's tokens differ from PyTorch's "
                          f"(at most {MAX_TOKEN_FLIPS:.0%} may flip at near-ties)")
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
    from torch_fidelity.feature_extractor_inceptionv3 import \
        FeatureExtractorInceptionV3 as Inception
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
    if not os.path.isfile(os.path.join(ROOT, "evaluate.py")):
        raise StageFailed("evaluate", "evaluate.py does not exist in the repository")
    metrics = r.path("metrics.json")
    r.run("evaluate", "evaluate.py on fid.npz",
          [PY, "evaluate.py", "--samples", r.path("fid.npz"),
           "--reference", r.path("reference.npz"),
           "--inception-weights", r.path("inception.pth"), "--device", "cpu", "--batch-size", "8",
           "--out", metrics])
    with open(metrics) as f:
        print(f"[evaluate] {metrics}: {json.dumps(json.load(f))}", flush=True)


STAGES = [("weights", weights), ("convert", convert), ("sample", sample), ("export", export),
          ("onnx", onnx), ("evaluate", evaluate)]


# --- main ---------------------------------------------------------------------------------------

def check_disk(work, scale):
    """The files of a real-size rehearsal take tens of GB: refuse up front when they cannot fit."""
    with torch.device("meta"):
        large, huge = (tb.TokenBridge(tb.TokenBridgeConfig.preset(scale[n])).num_params() * 4
                       for n in ("large", "huge"))
    # L: .pth (model, EMA, 2 moments), run, onnx fp32 + fp16 + int8; H: .pth (model, EMA), run, onnx
    need = large * (4 + 1 + 1.75) + huge * (2 + 1 + 1)
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
    return args.out


def main(args):
    work = work_folder(args)
    r = Rehearsal(work, args.scale)
    print(f"rehearsal at {args.scale} size in {work}", flush=True)
    try:
        check_disk(work, r.scale)
        for stage, run in STAGES:
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
