"""Sample images from a TokenBridge run, with PyTorch or with ONNX Runtime (no torch needed).

    python sample.py --run runs/demo                                  # PyTorch, PNG grid
    python export.py --run runs/demo && \\
    python sample.py --onnx runs/demo/onnx --runtime onnx --cfg 2.0  # ONNX Runtime only
    python sample.py --benchmark --preset bench-s                     # one JSON line of timings

The ONNX path (OnnxSampler) imports numpy, onnxruntime and Pillow only; torch is imported lazily,
for the torch runtime and the benchmark. OnnxSampler.sample_tokens is a step-for-step mirror of
TokenBridge.sample_tokens (tokenbridge.py §7): the same cosine schedule, the same order rule and
the same draws from numpy.random.default_rng(seed) in the same sequence, so a seed gives the same
tokens in both runtimes (up to a rare flip where a uniform lands on a near-tie of the CDF). Each
step names its twin. On GPU, the channel loop keeps the KV cache, tokens, uniforms and scores on
the device with IOBinding, so nothing crosses to the host between channel steps.
"""
import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

# ONNX file and I/O names, shared with export.py (which imports them from here: this module must
# stay importable without torch).
META_FILE, BACKBONE_FILE, HEAD_FILE, VAE_FILE = "tokenbridge.json", "backbone.onnx", "head_step.onnx", "vae_decoder.onnx"
BACKBONE_INPUTS, BACKBONE_OUTPUTS = ("values", "mask", "labels"), ("cond",)
HEAD_INPUTS = ("cond", "step", "cache", "tokens", "uniforms", "temperature", "guidance", "score")
HEAD_OUTPUTS = ("logits", "tokens_out", "score_out", "cache_out")
HEAD_STATE = ("cache", "tokens", "score")          # fed back: output NAME_out is next step's NAME
VAE_INPUTS, VAE_OUTPUTS = ("latents",), ("image",)
# The graphs' interface as this loop drives it; export.py records it. 2: the head's KV cache
# grows a slot per step (1, unversioned: a fixed C-slot cache).
EXPORT_FORMAT = 2
# What ORT raises for a graph file it cannot load or a provider that fails: its own exception
# classes, plain Exception subclasses (not RuntimeError), so they are named one by one.
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.InvalidProtobuf,
              ort_state.NoSuchFile, ort_state.NotImplemented, ort_state.RuntimeException)


def one_line(error):
    """An exception's text on one line (ORT's and torch's span several), for reports and `error: ...`."""
    return " ".join(str(error).split()) or type(error).__name__


def make_session(path, device="auto", threads=0, device_id=0):
    """An ORT session on CUDA when asked for (or "auto") and it really loads, else CPU.

    threads: ORT's intra-op threads (0 = one per physical core); device_id: which GPU.
    Returns (session, on_cuda).
    ORT's own logging is silenced (severity 4): a missing CUDA library
    otherwise prints a wall of text; callers report it in one line instead.
    """
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        _preload_cuda_libraries()
        # ORT's CUDA provider uses TF32 by default (fp32 matmuls at 10 mantissa bits); PyTorch does
        # not, and that much rounding changes sampled tokens, so the fp32 graphs run in fp32
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0", "device_id": str(device_id)}))
    session = ort.InferenceSession(path, options, providers=providers)
    # get_providers(), not get_available_providers(): the latter lists CUDA even without its libraries
    return session, "CUDAExecutionProvider" in session.get_providers()


@functools.cache
def _preload_cuda_libraries():
    """Load CUDA/cuDNN from the nvidia-* pip packages (as installed beside torch), which the CUDA
    provider does not search itself. Silent: when they are missing, the caller's one line says so."""
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):
            ort.preload_dlls()


def file_sha256(path):
    """The checkpoint file's identity, computable without torch (export.py records it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mask_schedule(seq_len, num_iter):
    """Twin of tokenbridge.mask_schedule, digit for digit (a test compares them)."""
    left, remaining = [], seq_len
    for s in range(num_iter):
        n = math.floor(seq_len * math.cos(math.pi / 2 * (s + 1) / num_iter))
        remaining = 0 if s == num_iter - 1 else max(1, min(remaining - 1, n))
        left.append(remaining)
    return left


def guidance_weight(cfg, seq_len, left, schedule="linear", official_clamp=False):
    """Twin of tokenbridge.guidance_weight."""
    if schedule == "constant":
        return cfg
    return 1.0 + (cfg - 1.0) * (seq_len - max(left, int(official_clamp))) / seq_len


class OnnxSampler:
    """The exported graphs + tokenbridge.json, and the torch-free mirror of TokenBridge.sample_tokens."""

    def __init__(self, onnx_dir, device="auto", iobinding=None, checkpoint=None, threads=0, head_threads=1,
                 device_id=0):
        """threads: ORT's intra-op threads for the backbone and the VAE decoder (0 = ORT's default).
        head_threads: for head_step.onnx, 1 by default: ORT's CPU thread pool synchronises after
        every operator, and the head step is ~240 small ones, run C times per decoding step, where
        that costs more than a second thread gains (bench-s, 2 cores: 1.3x faster sampling with
        --int8, 1.1x in fp32; PyTorch's head is faster with its 2 threads). Raise it for wide heads
        on many cores. device_id: the GPU (one per process under torchrun)."""
        meta_path = os.path.join(onnx_dir, META_FILE)
        if not os.path.isfile(meta_path):
            raise ValueError(f"no {META_FILE} in {onnx_dir}; run export.py --run RUN --out {onnx_dir} first")
        with open(meta_path) as f:
            try:
                self.meta = meta = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta_path} is not valid JSON ({e}); re-run export.py") from None
        if meta.get("format", 1) != EXPORT_FORMAT:
            raise ValueError(f"{onnx_dir} was written by another export.py (format {meta.get('format', 1)}, "
                             f"this sample.py reads {EXPORT_FORMAT}); re-run export.py")
        files = [BACKBONE_FILE, HEAD_FILE] + ([meta["vae"]["file"]] if meta["vae"] else [])
        missing = [name for name in files if not os.path.isfile(os.path.join(onnx_dir, name))]
        if missing:
            raise ValueError(f"missing graph file(s) {', '.join(missing)} in {onnx_dir}; re-run export.py")
        if checkpoint is not None:
            self._check_checkpoint(checkpoint)
        sessions = [self._open(onnx_dir, name, device, head_threads if name == HEAD_FILE else threads, device_id)
                    for name in files]
        for name, (session, _) in zip(files, sessions):
            got = session.get_modelmeta().custom_metadata_map.get("fingerprint")
            if got != meta["fingerprint"]:
                raise ValueError(f"{name} was exported from other weights (fingerprint {str(got)[:12]}, "
                                 f"{META_FILE} says {meta['fingerprint'][:12]}); re-run export.py")
        self.backbone, self.head = sessions[0][0], sessions[1][0]
        self.vae = sessions[2][0] if meta["vae"] else None
        self.on_cuda = all(on_cuda for _, on_cuda in sessions)
        if device == "cuda" and not self.on_cuda:
            why = ("did not load (no GPU, or CUDA/cuDNN libraries missing)"
                   if "CUDAExecutionProvider" in ort.get_available_providers() else
                   "is not in this onnxruntime build (install onnxruntime-gpu)")
            raise ValueError(f"--device cuda, but onnxruntime's CUDAExecutionProvider {why}; "
                             "use --device auto (CPU when CUDA does not work) or cpu")
        self.iobinding = self.on_cuda if iobinding is None else iobinding
        self.device, self.device_id = ("cuda", device_id) if self.on_cuda else ("cpu", 0)

        cfg = self.cfg = meta["config"]
        self.N, self.C, self.K = (cfg["image_size"] // cfg["vae_stride"]) ** 2, cfg["channels"], cfg["levels"]
        self.dtype = np.dtype(meta["dtype"])
        q = meta["quantizer"]
        self.centers, self.mean, self.std = (np.asarray(q[k], np.float32) for k in ("centers", "mean", "std"))
        self.order = np.asarray(q["order"], np.int64)
        h = meta["head"]
        self.cache_shape = (h["depth"], 2, None, h["heads"], 0, h["head_dim"])  # G*M rows; no slots yet
        # step indices live on the device once, so the channel loop never uploads them
        self.steps = [np.array(t, np.int64) for t in range(self.C)]
        self.step_values = [ort.OrtValue.ortvalue_from_numpy(t, self.device, self.device_id) for t in self.steps]

    @staticmethod
    def _open(onnx_dir, name, device, threads, device_id):
        """make_session for one graph file; a file ORT cannot load (truncated, corrupt) is one
        ValueError naming it, not ORT's traceback."""
        path = os.path.join(onnx_dir, name)
        try:
            return make_session(path, device, threads, device_id)
        except ORT_ERRORS as e:
            raise ValueError(f"{path} cannot be loaded by onnxruntime ({one_line(e)}); "
                             f"re-run export.py --run RUN --out {onnx_dir}") from None

    def _check_checkpoint(self, checkpoint):
        """The run's checkpoint must be the one the graphs came from (file hash: no torch here)."""
        digest = file_sha256(checkpoint)
        if digest != self.meta["checkpoint_sha256"]:
            raise ValueError(f"the ONNX graphs were exported from another checkpoint than {checkpoint} "
                             f"(sha256 {digest[:12]} != {self.meta['checkpoint_sha256'][:12]}); re-run export.py")

    # --- the pieces of TokenBridge the loop needs, in numpy ------------------------------------

    def dequantize(self, tokens):
        """Twin of GaussianQuantizer.dequantize: (..., C) int -> (..., C) float32."""
        return self.centers[tokens] * self.std + self.mean

    def unpatchify(self, tokens):
        """Twin of TokenBridge.unpatchify: (B, N, C) -> (B, C, H, W)."""
        g = int(round(math.sqrt(self.N)))
        return tokens.transpose(0, 2, 1).reshape(len(tokens), self.C, g, g)

    def condition(self, values, mask, labels):
        """Twin of TokenBridge.condition: backbone.onnx."""
        feeds = dict(zip(BACKBONE_INPUTS, (values.astype(self.dtype), mask, labels)))
        return self.backbone.run(None, feeds)[0]                                       # (B, N, D)

    def decode(self, latents):
        """Twin of export.VAEDecoderGraph: scaled latents (B, C, H, W) -> image in [-1, 1]."""
        return self.vae.run(None, {VAE_INPUTS[0]: latents.astype(self.dtype)})[0].astype(np.float32)

    def sample_channels(self, cond, uniforms, temperature, guidance=1.0):
        """Twin of TokenBridge._sample_channels. cond (G, M, D) with G = 2 halves (cond, uncond)
        for logit-level guidance; uniforms (M, C). Returns tokens (M, C) in VAE channel order and
        the summed log-probability of each position's tokens."""
        G, M, _ = cond.shape
        shape = list(self.cache_shape)
        shape[2] = G * M
        feeds = {"cond": cond.astype(self.dtype), "cache": np.zeros(shape, self.dtype),   # empty_cache
                 "tokens": np.zeros((M, self.C), np.int64), "uniforms": uniforms,
                 "temperature": np.array(temperature, np.float32), "guidance": np.array(guidance, np.float32),
                 "score": np.zeros(M, np.float32)}
        if self.iobinding:
            generated, score = self._channel_loop_bound(feeds)
        else:
            for t in range(self.C):  # head.step + logit guidance + sample_from_logits, in one graph
                feeds["step"] = self.steps[t]
                _, feeds["tokens"], feeds["score"], feeds["cache"] = self.head.run(HEAD_OUTPUTS, feeds)
            generated, score = feeds["tokens"], feeds["score"]
        tokens = np.empty_like(generated)
        tokens[:, self.order] = generated                                               # (M, C)
        return tokens, score

    def _channel_loop_bound(self, feeds):
        """The same loop with IOBinding: inputs bound once, each step's state outputs stay on the
        device (ORT allocates them: the cache grows a slot per step) and are bound as the next
        step's inputs; only the final tokens and scores come back to the host (the logits output
        is not bound, so never copied). On CPU an OrtValue shares its numpy array's memory, so
        every array put here is one that `feeds` keeps alive (no temporaries)."""
        put = lambda a: ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id)
        binding = self.head.io_binding()
        for name in ("cond", "uniforms", "temperature", "guidance"):
            binding.bind_ortvalue_input(name, put(feeds[name]))
        state = {n: put(feeds[n]) for n in HEAD_STATE}
        for t in range(self.C):
            binding.bind_ortvalue_input("step", self.step_values[t])
            binding.clear_binding_outputs()  # get_outputs() then lists them in HEAD_STATE order
            for n in HEAD_STATE:
                binding.bind_ortvalue_input(n, state[n])
                binding.bind_output(n + "_out", self.device, self.device_id)
            self.head.run_with_iobinding(binding)
            state = dict(zip(HEAD_STATE, binding.get_outputs()))
        return state["tokens"].numpy().copy(), state["score"].numpy().copy()

    # --- the sampler: twin of TokenBridge.sample_tokens, line by line -------------------------

    def sample_tokens(self, labels, num_iter=64, cfg=1.0, temperature=1.0, seed=0, cfg_mode="features",
                      cfg_schedule="linear", position_order="random", confidence_noise=1.0):
        labels = np.asarray(labels, np.int64)
        k = self.cfg["num_classes"]
        check_labels(labels, k, allow_null=True)
        B, N, C = len(labels), self.N, self.C
        if not 1 <= num_iter <= N:
            raise ValueError(f"num_iter must be in [1, {N}] (one position at least per step), got {num_iter}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not cfg >= 0:
            raise ValueError(f"cfg must be >= 0 (1 = no guidance), got {cfg}")
        if (cfg_mode not in ("features", "logits") or cfg_schedule not in ("linear", "constant")
                or position_order not in ("random", "confidence")):
            raise ValueError(f"cfg_mode must be features|logits, cfg_schedule linear|constant and order "
                             f"random|confidence, got {cfg_mode!r}, {cfg_schedule!r}, {position_order!r}")
        rng = np.random.default_rng(seed)
        if position_order == "random":
            rank = np.stack([rng.permutation(N) for _ in range(B)]).argsort(-1)          # rank[b, n]
        guided = cfg != 1.0
        all_labels = np.concatenate([labels, np.full_like(labels, k)]) if guided else labels
        tokens = np.zeros((B, N, C), np.int64)
        mask = np.ones((B, N), bool)
        for s, left in enumerate(mask_schedule(N, num_iter)):
            uniforms = rng.random((B, N, C)).astype(np.float32)
            values = self.dequantize(tokens)
            reps = 2 if guided else 1
            cond = self.condition(np.tile(values, (reps, 1, 1)), np.tile(mask, (reps, 1)), all_labels)
            w = guidance_weight(cfg, N, left, cfg_schedule, self.cfg["official_compat"])
            if guided and cfg_mode == "features":                     # guidance on proj(z)
                cond_c, cond_u = np.split(cond, 2)
                cond = cond_u + w * (cond_c - cond_u)
            if position_order == "random":
                chosen = mask & (rank >= left)
                candidates = chosen
            else:
                candidates = mask
            halves = cond.reshape(-1, B, N, cond.shape[-1])[:, candidates]             # (G, M, D) = cond[rows]
            new, score = self.sample_channels(halves, uniforms[candidates], temperature,
                                              w if guided and cfg_mode == "logits" else 1.0)
            if position_order == "confidence":
                gumbel = -np.log(-np.log(rng.random((B, N)).astype(np.float32)))
                scores = np.full((B, N), -np.inf, np.float32)
                scores[candidates] = score
                scores = scores + confidence_noise * (1 - (s + 1) / num_iter) * gumbel
                keep = np.argsort(-scores, axis=-1, kind="stable")[:, :int(mask[0].sum()) - left]  # topk
                chosen = np.zeros_like(mask)
                np.put_along_axis(chosen, keep, True, axis=1)
                new = new[chosen[candidates]]
            tokens[chosen] = new
            mask = mask & ~chosen
        return tokens


# --- shared by both runtimes -----------------------------------------------------------------

def check_labels(labels, num_classes, allow_null=False):
    """Twin of TokenBridge._check_labels (the message too)."""
    top = num_classes + 1 if allow_null else num_classes
    if labels.ndim != 1 or not ((labels >= 0) & (labels < top)).all():
        raise ValueError(f"labels must lie in [0, {top}) for this model's {num_classes} classes"
                         + (f" ({num_classes}: unconditional)" if allow_null else "")
                         + f", got {labels.tolist()[:8]}")


def to_uint8(images):
    """Decoder output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as ADM's npz wants."""
    return np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def latent_preview(latents, stride):
    """Without a VAE: the first three latent channels as colours, each image scaled on its own."""
    x = latents[:, :3].astype(np.float32)                                              # (B, 3, h, w)
    lo, hi = x.min((1, 2, 3), keepdims=True), x.max((1, 2, 3), keepdims=True)
    x = (x - lo) / np.maximum(hi - lo, 1e-8) * 2 - 1
    return to_uint8(x.repeat(stride, axis=2).repeat(stride, axis=3))


def save_grid(images, path):
    from PIL import Image
    B, H, W, _ = images.shape
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    grid = np.zeros((rows * H, cols * W, 3), np.uint8)
    for i, image in enumerate(images):
        grid[(i // cols) * H:(i // cols + 1) * H, (i % cols) * W:(i % cols + 1) * W] = image
    Image.fromarray(grid).save(path)


class Runtime:
    """What the batch loop needs of a runtime: the model's classes and positions, the identity of
    its weights, and sample(labels, seed) -> tokens (B, N, C), images (B, H, W, 3) uint8."""

    def __init__(self, num_classes, seq_len, weights, sample):
        self.num_classes, self.seq_len, self.weights, self.sample = num_classes, seq_len, weights, sample


def onnx_runtime(args, device_id):
    sampler = OnnxSampler(args.onnx, args.device, threads=args.threads, head_threads=args.head_threads,
                          checkpoint=os.path.join(args.run, "checkpoint.pt") if args.run else None,
                          device_id=device_id)
    stride = sampler.cfg["vae_stride"]

    def sample(labels, num_iter, seed):
        tokens = sampler.sample_tokens(labels, num_iter, args.cfg, args.temperature, seed, args.cfg_mode,
                                       args.cfg_schedule, args.order)
        latents = sampler.unpatchify(sampler.dequantize(tokens))
        return tokens, to_uint8(sampler.decode(latents)) if sampler.vae else latent_preview(latents, stride)
    return Runtime(sampler.cfg["num_classes"], sampler.N, sampler.meta["fingerprint"], sample)


def torch_device(requested, device_id=0):
    """--device for torch: "auto" is CUDA when torch can use it, else the CPU; an explicit "cuda"
    that torch cannot use is refused, not quietly run on the CPU."""
    import torch
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch.cuda.is_available() is False (a CPU build of torch, or no "
                         "GPU/driver); use --device auto (CPU when CUDA does not work) or cpu")
    return f"cuda:{device_id}" if requested != "cpu" and torch.cuda.is_available() else "cpu"


def torch_runtime(args, device_id):
    import torch
    from export import VAEDecoderGraph, fingerprint, load_run, load_vae
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch_device(args.device, device_id)
    if args.autocast != "none" and not device.startswith("cuda"):
        raise ValueError(f"--autocast {args.autocast} is for CUDA; on the CPU sampling runs in fp32")
    model, _ = load_run(args.run, device)
    vae = load_vae(args.run, device)
    decoder = VAEDecoderGraph(vae) if vae is not None else None
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]

    @torch.no_grad()
    def sample(labels, num_iter, seed):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):  # the backbone and head only
            tokens = model.sample_tokens(labels, num_iter, args.cfg, args.temperature, seed, cfg_mode=args.cfg_mode,
                                         cfg_schedule=args.cfg_schedule, position_order=args.order)
        latents = model.unpatchify(model.quantizer.dequantize(tokens))
        images = (to_uint8(decoder(latents).float().cpu().numpy()) if decoder is not None
                  else latent_preview(latents.cpu().numpy(), model.cfg.vae_stride))
        return tokens.cpu().numpy(), images
    return Runtime(model.cfg.num_classes, model.cfg.seq_len, fingerprint(model), sample)


# --- sampling in batches: progress, resumable, shared between processes ----------------------

def process_slot():
    """(rank, world, local rank) under torchrun, (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


class Parts:
    """Finished batches of a sampling job, one .npz each in a folder, written atomically, so a
    re-run skips them and a crash loses at most the batch in flight. settings.json names what
    they were sampled with: a folder from other settings is refused, never mixed in."""

    def __init__(self, folder, settings):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "settings.json")
        if os.path.isfile(path):
            with open(path) as f:
                found = json.load(f)
            if found != settings:
                changed = sorted(k for k in settings if found.get(k) != settings[k])
                raise ValueError(f"{folder} holds batches sampled with other settings ({', '.join(changed)}); "
                                 "delete it, or write to another --npz")
        else:
            _write_atomic(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))

    def path(self, b):
        return os.path.join(self.folder, f"batch_{b:06d}.npz")

    def done(self, b):
        return os.path.isfile(self.path(b))

    def write(self, b, tokens, images, labels):
        _write_atomic(self.path(b), lambda f: np.savez(f, tokens=tokens, images=images, labels=labels))

    def read(self, b):
        with np.load(self.path(b)) as part:
            return part["tokens"], part["images"], part["labels"]


def _write_atomic(path, write):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def batch_seed(seed, b):
    """Batch b draws from numpy.random.default_rng((seed, b)): its samples do not depend on the
    batch size of the others, on how processes share the batches, or on a re-run."""
    return (seed, b)


def sample_in_batches(runtime, labels, num_iter, args, parts=None):
    """This process's share of the batches of `labels` (batch b goes to rank b % world), with a
    progress bar in images; finished batches go to `parts` when given. Returns {b: (tokens,
    images)} of the batches sampled here and not written to parts."""
    from tqdm import tqdm
    rank, world, _ = process_slot()
    starts = range(0, len(labels), args.batch_size)
    mine = [b for b in range(len(starts)) if b % world == rank]
    size = lambda b: min(args.batch_size, len(labels) - starts[b])
    skipped = [b for b in mine if parts is not None and parts.done(b)]
    bar = tqdm(total=sum(map(size, mine)), initial=sum(map(size, skipped)), unit="img", dynamic_ncols=True,
               desc="sample" if world == 1 else f"sample (rank {rank})", disable=len(starts) == 1)
    kept = {}
    for b in mine:
        if b in skipped:
            continue
        batch_labels = labels[starts[b]:starts[b] + size(b)]
        tokens, images = runtime.sample(batch_labels, num_iter, batch_seed(args.seed, b))
        if parts is None:
            kept[b] = tokens, images
        else:
            parts.write(b, tokens, images, batch_labels)
        bar.update(size(b))
    bar.close()
    return kept


def wait_for(parts, count, poll_s=2.0):
    """Rank 0 waits for the other ranks' batches (torchrun stops every rank if one fails)."""
    while not all(parts.done(b) for b in range(count)):
        time.sleep(poll_s)


# --- benchmark -------------------------------------------------------------------------------

def _best_seconds(fns, repeats, sync=lambda: None):
    """{name: function} -> {name: best seconds of `repeats`}, {name: its last result}, after a
    warm-up each (allocator, thread pools, ORT's first run). The rounds interleave the functions,
    so a burst of load on a shared machine hits them alike; it only ever adds time, so the minimum
    is the least disturbed figure. sync waits for queued GPU work, so a timing ends when the work does."""
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            results[name] = fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def _onnx_runtime(run, precision, args):
    """One ONNX runtime of the benchmark: RUN exported at `precision` (checked against PyTorch), opened."""
    from export import export
    graphs = os.path.join(run, precision)
    export(run, graphs, precision=precision, verbose=False)
    return OnnxSampler(graphs, args.device, threads=args.threads, head_threads=args.head_threads)


def benchmark(args):
    """One JSON line: KV-cached vs recomputed head per position, torch vs ONNX Runtime images/s.

    Each ONNX runtime stands alone: one whose export fails its parity check, or that ONNX Runtime
    cannot load, is reported as NAME_error (one line) and its keys are absent; the others are
    still timed. PyTorch is the reference every figure is relative to, so it must run."""
    import tempfile
    import torch
    import tokenbridge as tb
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    device = torch_device(args.device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = tb.TokenBridgeConfig.preset(args.preset)
    model = tb.TokenBridge(cfg).eval()
    state = model.state_dict()
    model.to(device)
    head, C = model.head, cfg.channels
    images, steps = 16, 16
    rows = images * cfg.seq_len // steps  # positions decoded per step, on average, in the run below
    cond = torch.randn(rows, cfg.head_width, device=device)

    @torch.no_grad()
    def cached():  # the step path _sample_channels uses: one slot through the blocks per channel
        cache, token = head.empty_cache(rows, device), torch.zeros(rows, dtype=torch.long, device=device)
        for t in range(C):
            logits, cache = head.step(cond, token, torch.tensor(t, device=device), cache)
            token = logits.argmax(-1)

    @torch.no_grad()
    def recompute():  # the official code: the whole prefix again for every channel
        tokens = torch.zeros(rows, 0, dtype=torch.long, device=device)
        for t in range(C):
            logits = head(cond, tokens)[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)

    head_s, _ = _best_seconds({"cached": cached, "recompute": recompute}, 5, sync)
    labels = np.arange(images) % cfg.num_classes
    kwargs = dict(num_iter=steps, cfg=args.cfg, temperature=args.temperature, seed=args.seed,
                  cfg_mode=args.cfg_mode, position_order=args.order)
    with tempfile.TemporaryDirectory() as run:
        torch.save({"config": cfg.to_dict(), "model": state}, os.path.join(run, "checkpoint.pt"))
        samplers, errors = {}, {}
        precisions = {"onnx": "fp32", "onnx_int8": "int8"} if device == "cpu" else {"onnx": "fp32"}  # int8: CPU kernels
        for name, precision in precisions.items():
            try:
                samplers[name] = _onnx_runtime(run, precision, args)
            except (ValueError, *ORT_ERRORS) as e:
                errors[f"{name}_error"] = one_line(e)
        runtimes = {"torch": lambda: model.sample_tokens(labels, **kwargs).cpu().numpy(),
                    **{name: functools.partial(s.sample_tokens, labels, **kwargs) for name, s in samplers.items()}}
        seconds, result = _best_seconds(runtimes, 3, sync)
    figures = {f"{k}_images_per_s": round(images / v, 2) for k, v in seconds.items()}
    figures.update({f"{k}_speedup": round(seconds["torch"] / v, 2) for k, v in seconds.items() if k != "torch"})
    agreement = {}
    if "onnx" in result:
        agreement["onnx_provider"] = "cuda" if samplers["onnx"].on_cuda else "cpu"
        agreement["tokens_equal"] = bool((result["torch"] == result["onnx"]).all())
    if "onnx_int8" in result:
        agreement["int8_tokens_differing"] = round(float((result["torch"] != result["onnx_int8"]).mean()), 3)
    print(json.dumps({
        "preset": args.preset, "images": images, "num_iter": steps, "cfg": args.cfg, "order": args.order,
        "head_rows": rows,
        "head_cached_ms_per_position": round(head_s["cached"] * 1e3 / rows, 4),
        "head_recompute_ms_per_position": round(head_s["recompute"] * 1e3 / rows, 4),
        "head_speedup": round(head_s["recompute"] / head_s["cached"], 2),
        **figures, **errors,
        "torch_device": device, **agreement,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }))


# --- command line ----------------------------------------------------------------------------

def use_official(args):
    """--official: convert the released weights into a run folder; released sampling defaults."""
    import interop
    args.preset = args.preset or "large"
    args.run = interop.import_official(args.official, args.preset, args.vae, args.run)
    for key, value in interop.RELEASED_SAMPLING.get(args.preset, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def parse_labels(text):
    """--labels "3,3,7" -> int64 array, or None when not given (their range is checked per model)."""
    if not text:
        return None
    try:
        return np.array([int(x) for x in text.split(",")], np.int64)
    except ValueError:
        raise ValueError(f"--labels must be comma-separated class numbers such as 3,3,7, got {text!r}") from None


def check_args(args):
    """Refuse bad flags in one line before anything is loaded or sampled. The samplers check
    num_iter's upper end and the labels' range themselves: those depend on the model."""
    lowest = {"--num-images": (args.num_images, 1), "--batch-size": (args.batch_size, 1),
              "--num-iter": (args.num_iter, 1), "--seed": (args.seed, 0),
              "--threads": (args.threads, 0), "--head-threads": (args.head_threads, 0),
              "--cfg": (args.cfg, 0), "--temperature": (args.temperature, 0)}
    for flag, (value, low) in lowest.items():
        if value is not None and not value >= low:  # None: the default, or --official's released one; NaN fails too
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.benchmark:  # the benchmark writes no files
        check_outputs(args)


def check_outputs(args):
    """Every output path must be writable now, not after minutes of sampling, and none is
    written before all are known to be."""
    from PIL import Image
    if args.out and Image.registered_extensions().get(os.path.splitext(args.out)[1].lower()) not in Image.SAVE:
        raise ValueError(f"--out {args.out}: not an image type Pillow writes; end the name in .png")
    for flag, path in (("--out", args.out), ("--npz", args.npz), ("--save-tokens", args.save_tokens)):
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            why = "it is a folder; give a file name"
        elif not os.path.isdir(folder):
            why = f"folder {folder} does not exist; create it or choose another path"
        elif not os.access(folder, os.W_OK):
            why = f"folder {folder} is not writable; choose another path"
        else:
            continue
        raise ValueError(f"{flag} {path}: cannot write there ({why})")


def main(args):
    check_args(args)
    given_labels = parse_labels(args.labels)
    if args.official:
        use_official(args)
    args.cfg = 1.0 if args.cfg is None else args.cfg
    args.temperature = 1.0 if args.temperature is None else args.temperature
    if args.benchmark:
        args.preset = args.preset or "bench-s"
        return benchmark(args)
    if args.runtime == "onnx" and not args.onnx:
        raise ValueError("--runtime onnx needs --onnx DIR (the folder export.py wrote, e.g. RUN/onnx)")
    if args.runtime == "torch" and not args.run:
        raise ValueError("--runtime torch needs --run RUN (a folder with checkpoint.pt)")

    rank, world, local_rank = process_slot()
    runtime = (onnx_runtime if args.runtime == "onnx" else torch_runtime)(args, local_rank)
    k = runtime.num_classes
    if args.unconditional:
        labels = np.full(args.num_images, k, np.int64)                # the null class
    else:  # every class as often as the others (50 each for FID-50K on ImageNet)
        labels = np.arange(args.num_images, dtype=np.int64) % k if given_labels is None else given_labels
        check_labels(labels, k)
    num_iter = min(64, runtime.seq_len) if args.num_iter is None else args.num_iter
    if not 1 <= num_iter <= runtime.seq_len:
        raise ValueError(f"num_iter must be in [1, {runtime.seq_len}] (one position at least per step), got {num_iter}")
    parts = Parts(args.npz + ".parts", sampling_settings(args, runtime, labels, num_iter)) if args.npz else None
    if parts is None and world > 1:
        raise ValueError(f"{world} processes share the work through the batches they write next to --npz; give --npz")
    kept = sample_in_batches(runtime, labels, num_iter, args, parts)
    if rank != 0:
        return None
    count = math.ceil(len(labels) / args.batch_size)
    if parts is not None:
        wait_for(parts, count)
    tokens, images = (np.concatenate(x) for x in zip(*(parts.read(b)[:2] if parts else kept[b] for b in range(count))))
    write_outputs(args, tokens, images, labels)
    if parts is not None:
        shutil.rmtree(parts.folder)  # all in --npz now
    return tokens


def sampling_settings(args, runtime, labels, num_iter):
    """What a batch depends on, besides its index: batches on disk must have been sampled with it."""
    return {"weights": runtime.weights, "runtime": args.runtime, "autocast": args.autocast,
            "batch_size": args.batch_size, "seed": args.seed,
            "labels": hashlib.sha256(labels.tobytes()).hexdigest(), "num_iter": num_iter, "cfg": args.cfg,
            "cfg_mode": args.cfg_mode, "cfg_schedule": args.cfg_schedule, "temperature": args.temperature,
            "order": args.order}


GRID_IMAGES = 100  # the PNG shows the first images; --npz holds them all


def write_outputs(args, tokens, images, labels):
    if args.out:
        save_grid(images[:GRID_IMAGES], args.out)
        print(f"wrote {args.out} ({min(len(images), GRID_IMAGES)} of {len(images)} images, {args.runtime})")
    if args.save_tokens:
        _write_atomic(args.save_tokens, lambda f: np.save(f, tokens))
    if args.npz:
        _write_atomic(args.npz, lambda f: np.savez(f, arr_0=images, labels=labels))
        print(f"wrote {args.npz} ({len(images)} images, ADM layout: arr_0 (N, H, W, 3) uint8, labels)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="run folder with checkpoint.pt (and vae/): the torch runtime's model")
    p.add_argument("--onnx", help="folder written by export.py: the onnx runtime's graphs")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch", help="which runtime samples")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when it really works, else CPU; cuda: CUDA or an error")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                   help="torch on CUDA: run the model's matmuls in half precision (the official evaluation uses "
                        "fp16 autocast; several times faster, tokens no longer equal to ONNX Runtime's fp32 ones)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for either runtime (0 = its default)")
    p.add_argument("--head-threads", type=int, default=1,
                   help="ONNX Runtime threads for the head step on CPU (its many tiny operators run best on one)")
    p.add_argument("--seed", type=int, default=0, help="seed of numpy.random.default_rng: orders and uniforms")
    p.add_argument("--num-images", type=int, default=8,
                   help="images when --labels is not given: classes 0, 1, 2, ... cycling, so each as often "
                        "(50 per class for 50,000 ImageNet images)")
    p.add_argument("--labels", help="comma-separated class labels")
    p.add_argument("--unconditional", action="store_true", help="sample --num-images with the null class")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per sampling call; with --npz each finished batch is kept on disk, and a "
                        "re-run samples only the missing ones")
    p.add_argument("--num-iter", type=int, default=None, help="decoding steps (default: 64, or N if fewer)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale, >= 0 (default 1 = off; with --official the released one)")
    p.add_argument("--cfg-mode", choices=["features", "logits"], default="features",
                   help="guide the backbone features (paper) or the head's logits")
    p.add_argument("--cfg-schedule", choices=["linear", "constant"], default="linear",
                   help="guidance weight per step: from 1 to --cfg as positions are decoded (paper), or --cfg")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 = greedy (default 1; with --official the released one)")
    p.add_argument("--order", choices=["random", "confidence"], default="random",
                   help="which positions each step keeps: a random order, or the most confident")
    p.add_argument("--out", default="samples.png", help="PNG grid path ('' for none)")
    p.add_argument("--save-tokens", help="save the token indices (B, N, C) to this .npy")
    p.add_argument("--npz", help="ADM-style .npz for FID tools: arr_0 (N, H, W, 3) uint8 and labels")
    p.add_argument("--benchmark", action="store_true", help="time a random model and print one JSON line")
    p.add_argument("--preset", default=None,
                   help="model preset: for --benchmark (default bench-s), or the size of --official (default large)")
    p.add_argument("--official", help="official TokenBridge checkpoint-last.pth: converted into --run "
                                      "(default runs/official-PRESET), then sampled with the released settings")
    p.add_argument("--vae", help="with --official: MAR's kl16.ckpt, converted into RUN/vae")
    return p


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
