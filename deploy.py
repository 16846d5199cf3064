"""Deploy TokenBridge on ONNX Runtime: the graph interface and a torch-free sampler.

    from deploy import OnnxSampler
    sampler = OnnxSampler("runs/demo/onnx")                      # written by export.py
    tokens = sampler.sample_tokens([3, 3, 7], num_iter=16, cfg=4.0, temperature=0.7, seed=0)
    images = to_uint8(sampler.decode(sampler.unpatchify(sampler.dequantize(tokens))))

Imports numpy, onnxruntime and Pillow only, and nothing of this project: a deployer copies this
file and the graphs folder. export.py writes the graphs against the interface defined here;
sample.py drives them (and PyTorch) through the same batch loop.

OnnxSampler.sample_tokens is a step-for-step mirror of TokenBridge.sample_tokens (tokenbridge.py
§7): the same cosine schedule, order rule and guidance weight, and the same draws from
numpy.random.default_rng(seed) in the same sequence, so a seed gives the same tokens in both
runtimes (up to a rare flip where a uniform lands on a near-tie of the CDF). Each step names its
twin. On GPU, with IOBinding, the backbone's graph gathers and mixes the rows the head needs and
leaves them on the device, and the channel loop keeps the KV cache, tokens, uniforms and scores
there: per decoding step the host sends the known tokens and the candidates, and reads back the
new tokens and scores, nothing else.
"""
import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import time
import zipfile

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

# The graphs' file and tensor names: export.py writes them, the sampler below reads them.
META_FILE = "tokenbridge.json"
BACKBONE_FILE = "backbone.onnx"
HEAD_FILE = "head_step.onnx"
VAE_FILE = "vae_decoder.onnx"
# A graph's weights over 1 GiB live beside it in NAME.onnx.data (ONNX external data; ORT finds it)
DATA_SUFFIX = ".data"
BACKBONE_INPUTS = ("values", "mask", "labels", "candidates", "guidance")
BACKBONE_OUTPUTS = ("rows", "mixed")                  # the candidates' rows per half; mixed
HEAD_INPUTS = ("cond", "step", "cache", "tokens", "uniforms", "temperature", "guidance", "score")
HEAD_OUTPUTS = ("logits", "tokens_out", "score_out", "cache_out")
HEAD_STATE = ("cache", "tokens", "score")          # fed back: output NAME_out is next step's NAME
VAE_INPUTS, VAE_OUTPUTS = ("latents",), ("image",)
# In a run folder: the sampling settings its sweep found best (quality.sweep_sampling), which
# sample.py uses unless told otherwise.
SAMPLING_FILE = "sampling.json"
# The version of the graphs' interface this loop drives; export.py records it, and graphs of
# another version are refused (format 3: the head's KV cache has a slot for every channel).
EXPORT_FORMAT = 3
# What ORT raises for a graph file it cannot load or a provider that fails: its own exception
# classes, plain Exception subclasses (not RuntimeError), so they are named one by one.
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph,
              ort_state.InvalidProtobuf, ort_state.NoSuchFile, ort_state.NotImplemented,
              ort_state.RuntimeException)


def one_line(error):
    """An exception's text on one line (ORT's and torch's span several), for `error: ...`."""
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
        cuda_options = {"use_tf32": "0", "device_id": str(device_id)}
        providers.insert(0, ("CUDAExecutionProvider", cuda_options))
    session = ort.InferenceSession(path, options, providers=providers)
    # get_providers(), not get_available_providers(): the latter lists CUDA without its libraries
    return session, "CUDAExecutionProvider" in session.get_providers()


@functools.cache
def _preload_cuda_libraries():
    """Load CUDA/cuDNN from the nvidia-* pip packages (as installed beside torch), which the CUDA
    provider does not search itself. Silent: when they are missing, the caller's line says so."""
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
    """The exported graphs + tokenbridge.json, and the torch-free mirror of
    TokenBridge.sample_tokens."""

    def __init__(self, onnx_dir, device="auto", iobinding=None, checkpoint=None, threads=0,
                 head_threads=1, device_id=0):
        """threads: ORT's intra-op threads for the backbone and the VAE decoder (0 = ORT's default).
        head_threads: for head_step.onnx, 1 by default: ORT's CPU thread pool synchronises after
        every operator, and the head step is a few hundred small ones, run C times per decoding
        step, where that costs more than a second thread gains (README, Speed). Raise it for wide
        heads on many cores. device_id: the GPU (one per process under torchrun)."""
        # tokenbridge.json, the graph files it names, the checkpoint they came from
        self.meta = meta = self._read_meta(onnx_dir)
        files = [BACKBONE_FILE, HEAD_FILE] + ([meta["vae"]["file"]] if meta["vae"] else [])
        missing = [name for name in files if not os.path.isfile(os.path.join(onnx_dir, name))]
        if missing:
            raise ValueError(f"missing graph file(s) {', '.join(missing)} in {onnx_dir}; "
                             "re-run export.py")
        if checkpoint is not None:
            self._check_checkpoint(checkpoint)

        # one session per graph, all exported from the same weights
        sessions = []
        for name in files:
            graph_threads = head_threads if name == HEAD_FILE else threads
            sessions.append(self._open(onnx_dir, name, device, graph_threads, device_id))
        for name, (session, _) in zip(files, sessions, strict=True):
            self._check_fingerprint(name, session)
        self.backbone = sessions[0][0]
        self.head = sessions[1][0]
        self.vae = sessions[2][0] if meta["vae"] else None

        # the device: CUDA only when every graph loaded there
        self.on_cuda = all(on_cuda for _, on_cuda in sessions)
        if device == "cuda" and not self.on_cuda:
            why = ("did not load (no GPU, or CUDA/cuDNN libraries missing)"
                   if "CUDAExecutionProvider" in ort.get_available_providers() else
                   "is not in this onnxruntime build (install onnxruntime-gpu)")
            raise ValueError(f"--device cuda, but onnxruntime's CUDAExecutionProvider {why}; "
                             "use --device auto (CPU when CUDA does not work) or cpu")
        self.iobinding = self.on_cuda if iobinding is None else iobinding
        self.device = "cuda" if self.on_cuda else "cpu"
        self.device_id = device_id if self.on_cuda else 0

        # the model's sizes and the quantizer's tables
        config = self.config = meta["config"]
        self.stride = config["vae_stride"]
        self.N = (config["image_size"] // self.stride) ** 2                      # positions
        self.C = config["channels"]
        self.K = config["levels"]
        self.dtype = np.dtype(meta["dtype"])
        quantizer = meta["quantizer"]
        self.centers = np.asarray(quantizer["centers"], np.float32)
        self.mean = np.asarray(quantizer["mean"], np.float32)
        self.std = np.asarray(quantizer["std"], np.float32)
        self.order = np.asarray(quantizer["order"], np.int64)
        head = meta["head"]
        # (depth, 2, G*M rows, heads, C slots, head_dim): the rows are set per call
        self.cache_shape = (head["depth"], 2, None, head["heads"], self.C, head["head_dim"])
        # step indices live on the device once, so the channel loop never uploads them
        self.steps = [np.array(t, np.int64) for t in range(self.C)]
        self.step_values = [ort.OrtValue.ortvalue_from_numpy(t, self.device, self.device_id)
                            for t in self.steps]

    @staticmethod
    def _read_meta(onnx_dir):
        """tokenbridge.json, refused when absent, not JSON, or of another EXPORT_FORMAT."""
        meta_path = os.path.join(onnx_dir, META_FILE)
        if not os.path.isfile(meta_path):
            raise ValueError(f"no {META_FILE} in {onnx_dir}; "
                             f"run export.py --run-dir RUN --out {onnx_dir} first")
        with open(meta_path) as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta_path} is not valid JSON ({e}); re-run export.py") from None
        found = meta.get("format", 1)
        if found != EXPORT_FORMAT:
            raise ValueError(f"{onnx_dir} was written by another export.py (format {found}, "
                             f"this sample.py reads {EXPORT_FORMAT}); re-run export.py")
        return meta

    @staticmethod
    def _open(onnx_dir, name, device, threads, device_id):
        """make_session for one graph file; a file ORT cannot load (truncated, corrupt) is one
        ValueError naming it, not ORT's traceback."""
        path = os.path.join(onnx_dir, name)
        try:
            return make_session(path, device, threads, device_id)
        except ORT_ERRORS as e:
            raise ValueError(f"{path} cannot be loaded by onnxruntime ({one_line(e)}); "
                             f"re-run export.py --run-dir RUN --out {onnx_dir}") from None

    def _check_fingerprint(self, name, session):
        """Each graph must come from the weights tokenbridge.json names."""
        got = session.get_modelmeta().custom_metadata_map.get("fingerprint")
        want = self.meta["fingerprint"]
        if got != want:
            raise ValueError(f"{name} was exported from other weights "
                             f"(fingerprint {str(got)[:12]}, {META_FILE} says {want[:12]}); "
                             "re-run export.py")

    def _check_checkpoint(self, checkpoint):
        """The run's checkpoint must be the one the graphs came from (file hash: no torch here)."""
        digest = file_sha256(checkpoint)
        want = self.meta["checkpoint_sha256"]
        if digest != want:
            raise ValueError(f"the ONNX graphs were exported from another checkpoint than "
                             f"{checkpoint} (sha256 {digest[:12]} != {want[:12]}); "
                             "re-run export.py")

    # --- the pieces of TokenBridge the loop needs, in numpy ------------------------------------

    def dequantize(self, tokens):
        """Twin of GaussianQuantizer.dequantize: (..., C) int -> (..., C) float32."""
        return self.centers[tokens] * self.std + self.mean

    def unpatchify(self, tokens):
        """Twin of TokenBridge.unpatchify: (B, N, C) -> (B, C, H, W)."""
        g = int(round(math.sqrt(self.N)))
        return tokens.transpose(0, 2, 1).reshape(len(tokens), self.C, g, g)

    def condition_rows(self, values, mask, labels, candidates, guidance, mixed):
        """Twin of TokenBridge.condition_rows (backbone.onnx), returning the one output the head
        needs: the feature-guided mix (1, M, D) if `mixed`, else the rows of each half (G, M, D).
        With IOBinding it stays where ORT computed it (an OrtValue): on a GPU, on the GPU."""
        arrays = (values.astype(self.dtype), mask, labels, candidates,
                  np.array(guidance, np.float32))
        feeds = dict(zip(BACKBONE_INPUTS, arrays, strict=True))
        wanted = BACKBONE_OUTPUTS.index("mixed" if mixed else "rows")
        if not self.iobinding:
            return self.backbone.run(None, feeds)[wanted]
        binding = self.backbone.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in BACKBONE_OUTPUTS:  # both stay on the device; one is read by the head
            binding.bind_output(name, self.device, self.device_id)
        self.backbone.run_with_iobinding(binding)
        return binding.get_outputs()[wanted]

    def decode(self, latents):
        """Twin of export.VAEDecoderGraph: scaled latents (B, C, H, W) -> image in [-1, 1]."""
        return self.vae.run(None, {VAE_INPUTS[0]: latents.astype(self.dtype)})[0].astype(np.float32)

    def sample_channels(self, cond, uniforms, temperature, guidance=1.0):
        """Twin of TokenBridge._sample_channels. cond (G, M, D), an array or an OrtValue, with
        G = 2 halves (cond, uncond) for logit-level guidance; uniforms (M, C). Returns tokens
        (M, C) in VAE channel order and the summed log-probability of each position's tokens."""
        on_device = isinstance(cond, ort.OrtValue)
        G, M, _ = cond.shape() if on_device else cond.shape
        shape = list(self.cache_shape)
        shape[2] = G * M
        feeds = {"cond": cond if on_device else cond.astype(self.dtype),
                 "cache": np.zeros(shape, self.dtype),                                # empty_cache
                 "tokens": np.zeros((M, self.C), np.int64),
                 "uniforms": uniforms,
                 "temperature": np.array(temperature, np.float32),
                 "guidance": np.array(guidance, np.float32),
                 "score": np.zeros(M, np.float32)}
        if self.iobinding:
            generated, score = self._channel_loop_bound(feeds)
        else:
            for t in range(self.C):  # head.step + logit guidance + sample_from_logits, in one graph
                feeds["step"] = self.steps[t]
                _, tokens_out, score_out, cache_out = self.head.run(HEAD_OUTPUTS, feeds)
                feeds.update(tokens=tokens_out, score=score_out, cache=cache_out)
            generated, score = feeds["tokens"], feeds["score"]
        tokens = np.empty_like(generated)
        tokens[:, self.order] = generated                                               # (M, C)
        return tokens, score

    def _channel_loop_bound(self, feeds):
        """The same loop with IOBinding: inputs bound once, each step's state outputs stay on the
        device (ORT allocates them) and are bound as the next
        step's inputs; only the final tokens and scores come back to the host (the logits output
        is not bound, so never copied). On CPU an OrtValue shares its numpy array's memory, so
        every array put here is one that `feeds` keeps alive (no temporaries)."""
        def put(array):
            return ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)

        binding = self.head.io_binding()
        for name in ("cond", "uniforms", "temperature", "guidance"):
            value = feeds[name]
            binding.bind_ortvalue_input(name, value if name == "cond" and isinstance(
                value, ort.OrtValue) else put(value))
        state = {n: put(feeds[n]) for n in HEAD_STATE}
        for t in range(self.C):
            binding.bind_ortvalue_input("step", self.step_values[t])
            binding.clear_binding_outputs()  # get_outputs() then lists them in HEAD_STATE order
            for n in HEAD_STATE:
                binding.bind_ortvalue_input(n, state[n])
                binding.bind_output(n + "_out", self.device, self.device_id)
            self.head.run_with_iobinding(binding)
            state = dict(zip(HEAD_STATE, binding.get_outputs(), strict=True))
        return state["tokens"].numpy().copy(), state["score"].numpy().copy()

    # --- the sampler: twin of TokenBridge.sample_tokens, line by line -------------------------

    def sample_tokens(self, labels, num_iter=None, cfg=1.0, temperature=1.0, seed=0,
                      cfg_mode="features", cfg_schedule="linear", position_order="random",
                      confidence_noise=1.0):
        """Twin of TokenBridge.sample_tokens: token indices (B, N, C); num_iter by default one
        position per step."""
        # the arguments, refused with TokenBridge.sample_tokens' messages
        labels = np.asarray(labels, np.int64)
        num_classes = self.config["num_classes"]
        check_labels(labels, num_classes, allow_null=True)
        B, N, C = len(labels), self.N, self.C
        num_iter = N if num_iter is None else num_iter
        self._check_sampling(num_iter, temperature, cfg, cfg_mode, cfg_schedule, position_order)

        # the decoding order, both guidance halves' labels, nothing known yet
        rng = np.random.default_rng(seed)
        if position_order == "random":
            orders = np.stack([rng.permutation(N) for _ in range(B)])
        guided = cfg != 1.0
        reps = 2 if guided else 1
        all_labels = labels
        if guided:  # the unconditional half: the null class
            all_labels = np.concatenate([labels, np.full_like(labels, num_classes)])
        tokens = np.zeros((B, N, C), np.int64)
        mask = np.ones((B, N), bool)
        masked = N                                      # positions still unknown in every image
        image = np.arange(B)[:, None]                   # indexes (B, k) positions, image by image

        for s, left in enumerate(mask_schedule(N, num_iter)):
            # this step's uniforms; the candidates: the next slice of each order, or every
            # unknown position, in position order
            uniforms = rng.random((B, N, C)).astype(np.float32)
            if position_order == "random":
                candidates = np.sort(orders[:, left:masked], axis=1)                     # (B, k)
            else:
                candidates = np.sort(np.where(mask, np.arange(N), N), axis=1)[:, :masked]

            # the candidates conditioned on the known positions, guided
            values = self.dequantize(tokens)
            w = guidance_weight(cfg, N, left, cfg_schedule, self.config["official_compat"])
            cond = self.condition_rows(np.tile(values, (reps, 1, 1)), np.tile(mask, (reps, 1)),
                                       all_labels, candidates, w,
                                       mixed=guided and cfg_mode == "features")     # (G, M, D)

            # the channels of every candidate
            logit_guidance = w if guided and cfg_mode == "logits" else 1.0
            new, score = self.sample_channels(cond, uniforms[image, candidates].reshape(-1, C),
                                              temperature, logit_guidance)
            new, score = new.reshape(B, -1, C), score.reshape(B, -1)                 # (B, k, C)

            # confidence order: keep the best-scored candidates, under shrinking Gumbel noise
            chosen = candidates
            if position_order == "confidence":
                gumbel = -np.log(-np.log(rng.random((B, N)).astype(np.float32)))
                scores = np.full((B, N), -np.inf, np.float32)
                scores[image, candidates] = score
                scores = scores + confidence_noise * (1 - (s + 1) / num_iter) * gumbel
                chosen = np.argsort(-scores, axis=-1, kind="stable")[:, :masked - left]  # topk
                slot_of = np.zeros((B, N), np.int64)                 # index j holds candidates[j]
                slot_of[image, candidates] = np.arange(masked)
                new = new[image, slot_of[image, chosen]]

            # the chosen positions become known
            tokens[image, chosen] = new
            mask[image, chosen] = False
            masked = left
        return tokens

    def _check_sampling(self, num_iter, temperature, cfg, cfg_mode, cfg_schedule, position_order):
        """Twin of the argument checks of TokenBridge.sample_tokens."""
        if not 1 <= num_iter <= self.N:
            raise ValueError(f"num_iter must be in [1, {self.N}] (one position at least per step), "
                             f"got {num_iter}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not cfg >= 0:
            raise ValueError(f"cfg must be >= 0 (1 = no guidance), got {cfg}")
        if (cfg_mode not in ("features", "logits") or cfg_schedule not in ("linear", "constant")
                or position_order not in ("random", "confidence")):
            raise ValueError("cfg_mode must be features|logits, cfg_schedule linear|constant and "
                             f"order random|confidence, got {cfg_mode!r}, {cfg_schedule!r}, "
                             f"{position_order!r}")


# --- labels, output paths and images, for both runtimes --------------------------------------

class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help gives each flag's default once: added where the help does not state it already and
    there is one to give (not None, not an unset switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if "default" in text or not shown or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parse_labels(text):
    """--labels "3,3,7" -> int64 array, or None when not given (the range is checked per model)."""
    if not text:
        return None
    try:
        return np.array([int(x) for x in text.split(",")], np.int64)
    except ValueError:
        raise ValueError("--labels must be comma-separated class numbers such as 3,3,7, "
                         f"got {text!r}") from None


def unwritable(path):
    """Why no file can be written at `path`, or None: the scripts check their outputs before
    any work."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist; create it or choose another path"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable; choose another path"
    return None


def check_labels(labels, num_classes, allow_null=False):
    """Twin of TokenBridge._check_labels (the message too); returns the labels."""
    top = num_classes + 1 if allow_null else num_classes
    if labels.ndim != 1 or not ((labels >= 0) & (labels < top)).all():
        raise ValueError(f"labels must lie in [0, {top}) for this model's {num_classes} classes"
                         + (f" ({num_classes}: unconditional)" if allow_null else "")
                         + f", got {labels.tolist()[:8]}")
    return labels


def to_uint8(images):
    """Decoder output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as ADM's npz wants."""
    return np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def latent_preview(latents, stride):
    """Without a VAE: the first three latent channels as colours, each image scaled on its own."""
    x = latents[:, :3].astype(np.float32)                                           # (B, 3, h, w)
    lo, hi = x.min((1, 2, 3), keepdims=True), x.max((1, 2, 3), keepdims=True)
    x = (x - lo) / np.maximum(hi - lo, 1e-8) * 2 - 1
    return to_uint8(x.repeat(stride, axis=2).repeat(stride, axis=3))


def tile(images, cols=None):
    """images (B, H, W, 3) uint8 -> one (rows*H, cols*W, 3) image, `cols` images per row
    (default: a square)."""
    B, H, W, _ = images.shape
    cols = cols or math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    grid = np.zeros((rows * H, cols * W, 3), np.uint8)
    for i, image in enumerate(images):
        grid[(i // cols) * H:(i // cols + 1) * H, (i % cols) * W:(i % cols + 1) * W] = image
    return grid


def save_grid(images, path, cols=None):
    """tile(images, cols) as a PNG."""
    from PIL import Image
    Image.fromarray(tile(images, cols)).save(path)


# --- sampling in batches: progress, resumable, shared between processes ---------------------

def process_slot():
    """(rank, world, local rank) under torchrun, (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def check_launcher(parent):
    """Under torchrun, stop when the launcher that started this process (pid `parent`) is gone.
    torchrun starts each worker in a session of its own, so killing the launcher (a scheduler's
    time limit, kill -9 of its process group) would otherwise leave the ranks running, writing
    beside the next launch."""
    if "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() != parent:
        raise SystemExit(f"error: the torchrun launcher (pid {parent}) is gone; this rank stops")


@contextlib.contextmanager
def exclusive(path, what):
    """Hold an exclusive lock on PATH.lock while the block runs, so one process at a time writes
    `what`. A second writer stops with one line naming the holder's pid. The kernel releases
    the lock of a process that dies, so a lock left by a killed process is simply taken over.
    (Where fcntl does not exist, on Windows, nothing is locked.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(f"{path}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ValueError(f"{what} is being written by another process (pid {holder}); "
                             "wait for it to finish, or stop it") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


class Parts:
    """Finished batches of a sampling job, one .npz each in a folder, written atomically, so a
    re-run skips them and a crash loses at most the batch in flight. settings.json names what
    they were sampled with: a folder from other settings is refused, never mixed in.

    Used as a context manager: rank 0 holds the folder's lock (one job at a time writes it) and
    writes settings.json; the other ranks read it (no two processes write one file)."""

    def __init__(self, folder, settings):
        self.folder = folder
        self.settings = settings
        self._held = contextlib.ExitStack()

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, "settings.json")
        if process_slot()[0] == 0:
            self._held.enter_context(exclusive(os.path.join(self.folder, "job"),
                                               f"the sampling job in {self.folder}"))
            if not os.path.isfile(path):
                write_atomic(path, lambda f: f.write(json.dumps(self.settings, indent=1).encode()))
        while not os.path.isfile(path):  # rank 0 writes it at once
            time.sleep(0.2)
        with open(path) as f:
            found = json.load(f)
        if found != self.settings:
            self._held.close()
            changed = sorted(k for k in self.settings if found.get(k) != self.settings[k])
            raise ValueError(f"{self.folder} holds batches sampled with other settings "
                             f"({', '.join(changed)}); delete it, or write to another --npz")
        return self

    def __exit__(self, *exc):
        self._held.close()

    def path(self, b):
        return os.path.join(self.folder, f"batch_{b:06d}.npz")

    def done(self, b):
        return os.path.isfile(self.path(b))

    def write(self, b, tokens, images, labels):
        write_atomic(self.path(b),
                     lambda f: np.savez(f, tokens=tokens, images=images, labels=labels))

    def read(self, b):
        with np.load(self.path(b)) as part:
            return part["tokens"], part["images"], part["labels"]


@contextlib.contextmanager
def atomic_file(path):
    """A binary file written under a temp name of this process, renamed into place when the block
    ends without error, removed when it fails: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, write):
    """write(file) into atomic_file(path)."""
    with atomic_file(path) as f:
        write(f)


class RowWriter:
    """An array of `count` rows written batch by batch in .npy format (the header from the first
    batch's row shape and dtype, then each batch's bytes): never held whole in memory."""

    def __init__(self, file, count):
        self.file = file
        self.count = count
        self.written = 0

    def write(self, rows):
        if self.written == 0:
            header = {"descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False,
                      "shape": (self.count, *rows.shape[1:])}
            np.lib.format.write_array_header_1_0(self.file, header)
        self.file.write(np.ascontiguousarray(rows).tobytes())
        self.written += len(rows)

    def check_complete(self):
        if self.written != self.count:
            raise ValueError(f"{self.written} rows written of the {self.count} announced")


@contextlib.contextmanager
def npy_writer(path, count):
    """Yields write(rows): a .npy of `count` rows written batch by batch, atomically."""
    with atomic_file(path) as f:
        rows = RowWriter(f, count)
        yield rows.write
        rows.check_complete()


@contextlib.contextmanager
def npz_writer(path, count):
    """Yields add(images, labels): ADM's sample layout (arr_0 (count, H, W, 3) uint8, labels)
    written batch by batch, atomically. arr_0 streams into an uncompressed zip64 member, as
    np.savez writes it: 50,000 images at 256 px (9.8 GB) are never held in memory."""
    labels = []
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            images = RowWriter(member, count)
            yield lambda batch_images, batch_labels: (images.write(batch_images),
                                                      labels.append(batch_labels))
            images.check_complete()
        with archive.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, np.concatenate(labels))


def batch_seed(seed, b):
    """Batch b draws from numpy.random.default_rng((seed, b)): its samples do not depend on the
    batch size of the others, on how processes share the batches, or on a re-run."""
    return (seed, b)


def sample_in_batches(sample, labels, batch_size, seed, parts=None):
    """Sample `labels` in batches: sample(labels, seed) -> (tokens, images). Batch b goes to rank
    b % world, with a progress bar in images; finished batches go to `parts` when given (a re-run
    skips them). On rank 0, once every batch is done, returns the batches in order as
    (tokens, images, labels), read back from `parts` one at a time when given (a job of any
    size is never held whole); None on the other ranks."""
    # this rank's batches, and those of them a previous run finished
    rank, world, _ = process_slot()
    launcher = os.getppid()
    starts = range(0, len(labels), batch_size)
    sizes = [min(batch_size, len(labels) - start) for start in starts]
    mine = [b for b in range(len(starts)) if b % world == rank]
    skipped = [b for b in mine if parts is not None and parts.done(b)]

    # sample the rest
    bar = _progress_bar(total=sum(sizes[b] for b in mine), initial=sum(sizes[b] for b in skipped),
                        unit="img", dynamic_ncols=True,
                        desc="sample" if world == 1 else f"sample (rank {rank})",
                        disable=len(starts) == 1)
    kept = []
    for b in (b for b in mine if b not in skipped):
        check_launcher(launcher)
        batch_labels = labels[starts[b]:starts[b] + sizes[b]]
        tokens, images = sample(batch_labels, batch_seed(seed, b))
        if parts is None:
            kept.append((tokens, images, batch_labels))
        else:
            parts.write(b, tokens, images, batch_labels)
        bar.update(sizes[b])
    bar.close()

    # rank 0 returns every batch, in order
    if rank != 0:
        return None
    if parts is None:
        return kept
    wait_for(parts, len(starts))
    return (parts.read(b) for b in range(len(starts)))


def _progress_bar(**kwargs):
    """tqdm's bar when tqdm is installed (the deployment itself needs only numpy, onnxruntime
    and Pillow)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return type("NoBar", (), {"update": lambda self, n: None, "close": lambda self: None})()
    return tqdm(**kwargs)


def wait_for(parts, count, poll_s=2.0):
    """Rank 0 waits for the other ranks' batches (torchrun stops every rank if one fails)."""
    while not all(parts.done(b) for b in range(count)):
        time.sleep(poll_s)
