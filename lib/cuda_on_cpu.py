"""Run the project's CUDA code paths on a machine without a GPU: tensors that carry a CUDA device.

    with CudaOnCpu() as gpu:                       # torch.cuda "works"; device="cuda" is honoured
        model = build().to("cuda")                 # parameters are CUDA tensors, values on the CPU
        loss = model(latents.to("cuda"), labels.to("cuda"))
    gpu.syncs                                      # Counter: every wait of the host for the device
    gpu.kernels                                    # CUDA operators run, views not counted
    gpu.peak_bytes                                 # the most tensor memory the CUDA device held

A CUDA tensor is a FakeTensor (torch._subclasses): it has a shape, a dtype and a CUDA device but
no memory, and PyTorch's device propagation raises on a CPU/CUDA mix as a GPU does. Beside each
one this module keeps its value, computed by the same operator on the CPU, so the code under test
branches, indexes and calls .item() as it would on a GPU, and its results can be compared with a
CPU run. `values_up_to=N` keeps only the values of tensors of at most N elements: a model at the
paper's size then runs in seconds and no memory (lib/gpu_costs.py); a value
it never had reads as 0 (True in a truth test), which no decision of a training step depends on.

Two decisions PyTorch makes in C++ from a tensor's device, where a FakeTensor reports the meta
device (its CUDA device would make the autograd engine ask a driver for streams), are made here
instead, by function name: autocast's casts (CUDA's documented policy), and attention's kernel:
with every value kept, softmax attention; with values_up_to, the fused kernel a GPU would pick
(flash without a mask in 16 bits, memory-efficient otherwise), for its memory. Activation
checkpointing recomputes outside any function mode, so its recomputation is put back inside.
"""
import contextlib
import functools
import math
import sys
import types
import warnings
import weakref
from collections import Counter
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import (TorchFunctionMode, _get_current_function_mode_stack, _pop_mode,
                             _push_mode)
from torch.utils import _python_dispatch
from torch.utils import _pytree as pytree
from torch.utils import checkpoint as torch_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)
_TORCH_LOAD, _TORCH_SAVE = torch.load, torch.save
GPU_MEMORY = 80 * 2**30  # what torch.cuda reports as the device's memory: an 80 GB H100

# The operators that make the host wait for the device: a value read back, or an output whose
# shape depends on values (nonzero and boolean indexing ask the device how many). Copies to and
# from the host are counted where they happen (Values).
SYNCS = {aten._local_scalar_dense.default: "item", aten.is_nonzero.default: "item",
         aten.nonzero.default: "nonzero", aten.equal.default: "equal"}
# CUDA's fused attention kernels have no CPU twin: their outputs have no value (see Functions)
FUSED_ATTENTION = {aten._scaled_dot_product_flash_attention,
                   aten._scaled_dot_product_flash_attention_backward,
                   aten._scaled_dot_product_efficient_attention,
                   aten._scaled_dot_product_efficient_attention_backward}

_ACTIVE = []  # the CudaOnCpu contexts entered, innermost last


class CudaOnCpu:
    """A context in which device="cuda" makes CUDA tensors that hold no memory (see the module
    docstring). values_up_to: None keeps every value; N keeps those of tensors of <= N elements.
    gpu_memory: the device's memory as torch.cuda reports it."""

    def __init__(self, values_up_to=None, gpu_memory=GPU_MEMORY):
        self.values_up_to = values_up_to
        self.gpu_memory = gpu_memory
        self.syncs = Counter()
        self.kernels = 0  # CUDA operators run that compute (not views): about one launch each
        self.live_bytes = 0
        self.peak_bytes = 0
        self._stack = None

    def __enter__(self):
        stack = contextlib.ExitStack()
        if _ACTIVE:  # inside another (gpu_costs in a test's CUDA run): a GPU of its own
            stack.enter_context(_python_dispatch._disable_current_modes())
            stack.enter_context(_without_function_modes())
        _ACTIVE.append(self)
        stack.callback(_ACTIVE.pop)
        for name, value in self._cuda_api().items():
            stack.enter_context(mock.patch(f"torch.cuda.{name}", value))
        # fake tensors must not touch the device either: no context to make, nothing to copy
        stack.enter_context(mock.patch.object(fake_tensor, "init_gpu_context", lambda d: None))
        stack.enter_context(mock.patch.object(FakeTensorMode, "avoid_device_init", True))
        # C++ answers is_cuda from the meta tensor a FakeTensor wraps; Python knows its device
        stack.enter_context(mock.patch.object(FakeTensor, "is_cuda", property(_is_cuda_tensor),
                                              create=True))
        self.fake_mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        # FakeTensor.__deepcopy__ (copy.deepcopy of a model: the EMA) reads a data pointer
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        stack.enter_context(mock.patch("torch.load", self._load))
        stack.enter_context(mock.patch("torch.save", self._save))
        self.values = Values(self)
        stack.enter_context(self.values)
        # optimizers take their foreach kernels for CUDA parameters, as on a GPU (more memory)
        optimizer = sys.modules["torch.optim.optimizer"]
        foreach_types = [*optimizer._foreach_supported_types, FakeTensor]
        stack.enter_context(mock.patch.object(optimizer, "_foreach_supported_types",
                                              foreach_types))
        stack.enter_context(Functions(self))
        real_checkpoint = torch_checkpoint._checkpoint_without_reentrant_generator_impl
        stack.enter_context(mock.patch.object(
            torch_checkpoint, "_checkpoint_without_reentrant_generator_impl",
            functools.partial(_recomputed_in_functions, self, real_checkpoint)))
        self._stack = stack
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def _cuda_api(self):
        """torch.cuda as a one-GPU machine answers it; the RNG state is the CPU's (values are
        computed there)."""
        props = types.SimpleNamespace(total_memory=self.gpu_memory, name="GPU on the CPU",
                                      major=9, minor=0)
        return {"_lazy_init": lambda: None,  # the driver is never asked
                "is_available": lambda: True,
                "is_bf16_supported": lambda *a, **k: True,
                "device_count": lambda: 1,
                "current_device": lambda: 0,
                "set_device": lambda device: None,
                "synchronize": lambda device=None: None,
                "empty_cache": lambda: None,
                "get_device_properties": lambda device=None: props,
                "get_device_name": lambda device=None: props.name,
                "mem_get_info": lambda device=None: (self.gpu_memory - self.live_bytes,
                                                     self.gpu_memory),
                "memory_allocated": lambda device=None: self.live_bytes,
                "max_memory_allocated": lambda device=None: self.peak_bytes,
                "reset_peak_memory_stats": lambda device=None: self.reset_peak(),
                "get_rng_state_all": lambda: [],
                "set_rng_state_all": lambda states: None,
                "manual_seed": lambda seed: None,
                "manual_seed_all": lambda seed: None}

    @staticmethod
    def _load(*args, **kwargs):
        """torch.load would read into fake tensors under a FakeTensorMode: files hold values."""
        with unset_fake_temporarily():
            return _TORCH_LOAD(*args, **kwargs)

    def _save(self, obj, *args, **kwargs):
        """torch.save of CUDA tensors writes their values (in CPU storages)."""
        def host(x):
            return self.value(x) if isinstance(x, FakeTensor) else x
        with unset_fake_temporarily():
            return _TORCH_SAVE(pytree.tree_map(host, obj), *args, **kwargs)

    def reset_peak(self):
        self.peak_bytes = self.live_bytes

    def value(self, tensor):
        """The CPU value of a CUDA tensor made here (None if not kept); a CPU tensor is its own."""
        if isinstance(tensor, FakeTensor):
            return self.values.known.get(tensor)
        return tensor

    def _allocated(self, tensor):
        """Counts the memory of a new CUDA tensor until its storage is freed."""
        storage = tensor.untyped_storage()
        if storage in self.values.counted:
            return
        size = math.ceil(storage.nbytes() / 512) * 512  # the caching allocator's block size
        self.values.counted[storage] = size
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._freed, size)

    def _freed(self, size):
        self.live_bytes -= size


@contextlib.contextmanager
def _without_function_modes():
    modes = [_pop_mode() for _ in range(len(_get_current_function_mode_stack()))]
    try:
        yield
    finally:
        for mode in reversed(modes):
            _push_mode(mode)


def _is_cuda_tensor(tensor):
    return tensor.device.type == "cuda"


def _is_meta(x):
    return isinstance(x, torch.device) and x.type == "meta"


def _is_cuda(x):
    if isinstance(x, str):
        x = torch.device(x) if x.split(":")[0] in ("cuda", "cpu", "meta") else None
    return isinstance(x, torch.device) and x.type == "cuda"


class Values(TorchDispatchMode):
    """Above the FakeTensorMode: plain CPU work runs as it is; work on CUDA tensors runs on fake
    tensors (shapes, devices) and again on their CPU values (see CudaOnCpu)."""

    def __init__(self, gpu):
        super().__init__()
        self.gpu = gpu
        self.known = _TensorKeyed()
        self.pinned = _TensorKeyed()  # host tensors made by pin_memory()
        self.counted = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            # asked by C++ only (Python reads FakeTensor.device): the autograd engine would ask
            # the driver about a CUDA device, so C++ sees the meta device, and a tensor that C++
            # makes like one of ours (the backward's zeros) comes back here as meta: CUDA
            return torch.device("meta")
        if _is_meta(kwargs.get("device")):
            kwargs = {**kwargs, "device": CUDA}
        if func is aten._pin_memory.default:  # page-locked host memory, without a driver to ask
            if isinstance(args[0], FakeTensor):
                raise RuntimeError("cannot pin a CUDA tensor: only dense CPU tensors can be pinned")
            with unset_fake_temporarily():
                pinned = args[0].clone()
            self.pinned[pinned] = True
            return pinned
        if func is aten.is_pinned.default:
            return bool(self.pinned.get(args[0]))
        leaves = pytree.tree_leaves((args, kwargs))
        if not any(isinstance(x, FakeTensor) or _is_cuda(x) for x in leaves):
            with unset_fake_temporarily():  # CPU work, no CUDA tensor involved
                return func(*args, **kwargs)
        if func in SYNCS:
            self.gpu.syncs[SYNCS[func]] += 1
        if func is aten._to_copy.default and not _is_cuda(kwargs.get("device", CUDA)):
            return self._to_host(args[0], kwargs)
        if func is aten.copy_.default and not isinstance(args[0], FakeTensor):
            self.gpu.syncs["to cpu"] += 1
            return args[0].copy_(self._to_host(args[1], {}))
        if self._blocking_upload(func, args, kwargs):
            self.gpu.syncs["from host"] += 1
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default):
            value = self.gpu.value(args[0])
            if value is None:  # see the module docstring
                return func is aten.is_nonzero.default or args[0].dtype == torch.bool or 0
            with unset_fake_temporarily():
                return func(value)
        if func is aten.nonzero.default:
            value = self._require_value(args[0], "nonzero")
            with unset_fake_temporarily():
                value = value.nonzero()
            return self._from_value(value)
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            args = self._bool_indices_as_long(func, args)

        out = func(*args, **kwargs)  # FakeTensorMode: the shape, the dtype, the device check
        self.gpu.kernels += not func.is_view
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, FakeTensor):
                self.gpu._allocated(tensor)
        self._compute_value(func, args, kwargs, out)
        return out

    def _blocking_upload(self, func, args, kwargs):
        """A copy from host memory that waits for all work queued on the device: PyTorch
        synchronises the stream after a blocking copy (torch.tensor(x, device="cuda") is one), and
        the driver stages a non_blocking copy from pageable memory behind the queue too. Only a
        non_blocking copy from pinned memory is queued without a wait."""
        if func is aten._to_copy.default and _is_cuda(kwargs.get("device")):
            source, non_blocking = args[0], kwargs.get("non_blocking", False)
        elif func is aten.copy_.default:
            source = args[1]
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
        else:
            return False
        if isinstance(source, FakeTensor):
            return False
        return not (non_blocking and self.pinned.get(source))

    def _to_host(self, tensor, kwargs):
        """A CUDA tensor copied to the host: its value (zeros where none was kept)."""
        self.gpu.syncs["to cpu"] += 1
        value = self.gpu.value(tensor)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "non_blocking")}
        with unset_fake_temporarily():
            if value is None:
                value = torch.zeros(tensor.shape, dtype=tensor.dtype)
            return aten._to_copy.default(value, **kwargs)

    def _require_value(self, tensor, what):
        value = self.gpu.value(tensor)
        if value is None:
            raise RuntimeError(f"{what} of a CUDA tensor of {tensor.numel()} elements, whose "
                               "value this CudaOnCpu does not keep: raise values_up_to")
        return value

    def _from_value(self, value):
        """A CUDA tensor of the given CPU value."""
        out = aten.empty.memory_format(value.shape, dtype=value.dtype, device=CUDA)
        self.gpu._allocated(out)
        self.known[out] = value
        return out

    def _bool_indices_as_long(self, func, args):
        """x[mask] as x[mask.nonzero()]: the same result, with a shape a fake tensor can know.
        On a GPU it is the same wait for the device as nonzero."""
        indices = list(args[1])
        if not any(i is not None and i.dtype == torch.bool for i in indices):
            return args
        self.gpu.syncs["boolean index"] += 1
        converted = []
        for index in indices:
            if index is None or index.dtype != torch.bool:
                converted.append(index)
                continue
            value = self._require_value(index, "boolean indexing")
            with unset_fake_temporarily():
                positions = value.nonzero(as_tuple=True)
            converted.extend(self._from_value(p) for p in positions)
        return (args[0], converted, *args[2:])

    def _compute_value(self, func, args, kwargs, out):
        limit = self.gpu.values_up_to
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if limit is not None and any(t.numel() > limit for t in outputs):
            return
        if func.overloadpacket in FUSED_ATTENTION:
            return
        unknown = object()

        def cpu(x):
            if isinstance(x, FakeTensor):
                value = self.gpu.value(x)
                return unknown if value is None else value
            return torch.device("cpu") if _is_cuda(x) else x
        real_args, real_kwargs = pytree.tree_map(cpu, (args, kwargs))
        if any(x is unknown for x in pytree.tree_leaves((real_args, real_kwargs))):
            return
        with unset_fake_temporarily():
            real_out = func(*real_args, **real_kwargs)
        for fake, real in zip(pytree.tree_leaves(out), pytree.tree_leaves(real_out), strict=True):
            if isinstance(fake, FakeTensor):
                self.known[fake] = real


class _TensorKeyed:
    """A dictionary keyed by tensor identity that does not keep its keys alive."""

    def __init__(self):
        self._items = {}

    def __setitem__(self, key, value):
        ident = id(key)
        self._items[ident] = value
        weakref.finalize(key, self._items.pop, ident, None)

    def get(self, key):
        return self._items.get(id(key))


# CUDA autocast's policy (torch.amp's "CUDA Ops that can autocast to float16 / float32"), by
# function name; einsum runs as the bmm it becomes in C++.
TO_LOWER_PRECISION = {
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm", "addmm", "addmv", "addr",
    "addbmm", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention"}
TO_FLOAT32 = {
    "layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "cross_entropy", "nll_loss",
    "exp", "expm1", "log", "log2", "log10", "log1p", "pow", "__pow__", "__rpow__", "rsqrt",
    "reciprocal", "__rdiv__", "__rtruediv__", "sum", "prod", "cumsum", "cumprod", "norm",
    "normalize", "renorm", "softplus", "erfinv", "acos", "asin", "cosh", "sinh", "tan", "cdist",
    "dist", "pdist", "cosine_similarity", "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div",
    "binary_cross_entropy_with_logits", "poisson_nll_loss"}


class Functions(TorchFunctionMode):
    """CUDA autocast and attention's kernel for CUDA tensors (see the module docstring)."""

    def __init__(self, gpu):
        super().__init__()
        self.gpu = gpu

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in TO_LOWER_PRECISION | TO_FLOAT32 and torch.is_autocast_enabled("cuda"):
            dtype = (torch.get_autocast_dtype("cuda") if name in TO_LOWER_PRECISION
                     else torch.float32)
            args, kwargs = pytree.tree_map(functools.partial(_cast, dtype), (args, kwargs))
        if func is F.scaled_dot_product_attention and args[0].is_cuda:
            if self.gpu.values_up_to is None:
                return _softmax_attention(*args, **kwargs)
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _cast(dtype, x):
    """Autocast's cast: floating CUDA tensors other than float64."""
    eligible = (isinstance(x, torch.Tensor) and x.is_cuda and x.is_floating_point()
                and x.dtype != torch.float64)
    return x.to(dtype) if eligible else x


def _recomputed_in_functions(gpu, checkpoint_impl, fn, *args, **kwargs):
    """torch.utils.checkpoint, its recomputation (in backward, no function mode) in Functions."""
    def in_functions(*fn_args, **fn_kwargs):
        if any(isinstance(m, Functions) for m in _get_current_function_mode_stack()):
            return fn(*fn_args, **fn_kwargs)
        with Functions(gpu):
            return fn(*fn_args, **fn_kwargs)
    return checkpoint_impl(in_functions, *args, **kwargs)


def _softmax_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """The definition of scaled dot-product attention (bool mask: True = may attend)."""
    assert not is_causal, "not used by this project"
    scores = q @ k.transpose(-2, -1) * (scale or q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    weights = F.dropout(scores.softmax(-1), dropout_p)
    return weights @ v


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """The kernel a GPU picks, for its memory: flash attention for 16-bit inputs without a mask,
    memory-efficient attention otherwise (what PyTorch's selection gives on an H100)."""
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
                                                        scale=scale)[0]
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~attn_mask, -math.inf).expand(q.shape[0], q.shape[1], -1, -1)
    return aten._scaled_dot_product_efficient_attention(q, k, v, bias, False, dropout_p,
                                                        is_causal, scale=scale)[0]
