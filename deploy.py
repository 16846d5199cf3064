"""Deploy TokenBridge on ONNX Runtime: the graph interface and a torch-free sampler.

    from deploy import OnnxSampler
    sampler = OnnxSampler("runs/demo/onnx")                      # written by export.py
    tokens = sampler.sample_tokens([3, 3, 7], num_iter=16, cfg=4.0, temperature=0.7, seed=0)
    images = to_uint8(sampler.decode(sampler.unpatchify(sampler.dequantize(tokens))))

Imports numpy, onnxruntime and Pillow only, and nothing of this project: a deployer copies this
file and the graphs folder. export.py writes the graphs against the interface defined here;
sample.py drives them (and PyTorch) through the same batch loop (lib/jobs.py).

OnnxSampler.sample_tokens is a step-for-step mirror of TokenBridge.sample_tokens (tokenbridge.py
§7): the same cosine schedule, order rule and guidance weight, and the same draws from
numpy.random.default_rng(seed) in the same sequence, so a seed gives the same tokens in both
runtimes (up to a rare flip where a uniform lands on a near-tie of the CDF). Each step names its
twin. On GPU, with IOBinding, the backbone's graph gathers and mixes the rows the head needs and
leaves them on the device, and the channel loop keeps the KV cache, tokens, uniforms and scores
there: per decoding step the host sends the known tokens and the candidates, and reads back the
new tokens and scores, nothing else.
"""
import contextlib
import functools
import hashlib
import io
import json
import math
import os

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
        step, where that costs more than a second thread gains (docs/deployment.md#cpu-int8).
        Raise it for wide heads on many cores. device_id: the GPU (one per process under
        torchrun)."""
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
                      confidence_noise=1.0, on_step=None):
        """Twin of TokenBridge.sample_tokens: token indices (B, N, C); num_iter by default one
        position per step; on_step(s, tokens, mask) gets copies after each step s."""
        # the arguments, refused with TokenBridge.sample_tokens' checks, in its order
        num_classes = self.config["num_classes"]
        labels = check_labels(labels, num_classes, allow_null=True)
        B, N, C = len(labels), self.N, self.C
        num_iter = N if num_iter is None else num_iter
        self._check_sampling(num_iter, cfg, temperature, cfg_mode, cfg_schedule, position_order,
                             confidence_noise)

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
            if on_step is not None:
                on_step(s, tokens.copy(), mask.copy())
        return tokens

    def _check_sampling(self, num_iter, cfg, temperature, cfg_mode, cfg_schedule, position_order,
                        confidence_noise):
        """Twin of TokenBridge._check_sampling: the same checks, in order, and messages."""
        if not (isinstance(num_iter, (int, np.integer)) and 1 <= num_iter <= self.N):
            raise ValueError(f"num_iter must be in [1, {self.N}] (one position at least per step), "
                             f"got {num_iter!r}")
        if not cfg >= 0:
            raise ValueError(f"cfg must be >= 0 (1 = no guidance), got {cfg}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        for name, value, choices in (("cfg_mode", cfg_mode, ("features", "logits")),
                                     ("cfg_schedule", cfg_schedule, ("linear", "constant")),
                                     ("position_order", position_order, ("random", "confidence"))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if not confidence_noise >= 0:
            raise ValueError(f"confidence_noise must be >= 0, got {confidence_noise}")


# --- labels and images, for both runtimes -----------------------------------------------------


def check_labels(labels, num_classes, allow_null=False):
    """Twin of TokenBridge._check_labels: the same checks, in order, and messages. Returns the
    labels as an int64 array."""
    labels = np.asarray(labels)
    integers = labels.dtype.kind in "iu"
    if not (labels.ndim == 1 and len(labels) > 0 and integers):
        raise ValueError("labels must be a 1-D array of integer class numbers, got "
                         f"{'integers' if integers else 'non-integers'} of shape {labels.shape}")
    top = num_classes + 1 if allow_null else num_classes
    if not ((labels >= 0) & (labels < top)).all():
        raise ValueError(f"labels must lie in [0, {top}) for this model's {num_classes} classes"
                         + (f" ({num_classes}: unconditional)" if allow_null else "")
                         + f", got {labels.tolist()[:8]}")
    return labels.astype(np.int64)


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


def save_grid(images, file, cols=None):
    """tile(images, cols) as a PNG, into a path or an open binary file."""
    from PIL import Image
    Image.fromarray(tile(images, cols)).save(file, format="PNG")
