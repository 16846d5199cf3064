"""What a step costs on a GPU, counted on the CPU with CudaOnCpu at any size: the peak memory of
training and of FID sampling, and the waits and kernels of a decoding step."""
import contextlib
import copy
import functools

import torch

import tokenbridge as tb
from lib import data, official, recipe
from lib.cuda_on_cpu import CUDA, CudaOnCpu

GIB = 2**30


def _mask_elements(config, rows):
    """values_up_to for `rows` images: their masks' values are kept (the code gathers by them),
    no activation's."""
    return rows * (config.buffer_size + config.seq_len)


def kl16(device):
    """MAR's kl16 VAE with random weights on `device`."""
    from diffusers import AutoencoderKL  # lazily, as everywhere: a slow import
    with torch.device(device):
        return AutoencoderKL(**official.ldm_vae_config()).eval()


def uses_kl16(config):
    """Whether a config's latents have kl16's geometry (the ImageNet presets)."""
    return (config.image_size, config.vae_stride, config.channels) == (256, 16, 16)


def vae_bytes(config):
    """The bytes of the VAE weights that train.py keeps on the GPU: kl16's in fp32 for a config
    of its geometry; the demo's small VAE counts as nothing."""
    if not uses_kl16(config):
        return 0
    return sum(p.numel() * p.element_size() for p in kl16("meta").parameters())


def training_memory(config, micro_batch, precision="bf16", grad_checkpointing=False,
                    head_positions=0, world=1, resident_bytes=0):
    """Bytes: the peak CUDA memory of a rank of train.py at `micro_batch` images per pass, counted
    over two optimizer steps of a model of `config` (the second holds AdamW's state, the EMA and
    the gradients beside the activations), every position masked (the most the mask ratio allows:
    the head, most of the memory, runs on all of them). world > 1 adds DDP's gradient buckets (a
    reading of DDP: one fp32 copy of the gradients); resident_bytes what else the GPU holds (the
    VAE)."""
    with CudaOnCpu(values_up_to=_mask_elements(config, micro_batch)) as gpu:
        with torch.device(CUDA):
            model = tb.TokenBridge(config)
        model.set_grad_checkpointing(grad_checkpointing)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = recipe.make_optimizer(model, 1e-4, 0.02)
        scaler = recipe.loss_scaler(precision, CUDA)
        model.random_mask = functools.partial(_every_position, config.seq_len)
        latents = torch.zeros(micro_batch, config.channels, config.grid, config.grid, device=CUDA)
        labels = torch.zeros(micro_batch, dtype=torch.long, device=CUDA)
        for step in range(2):
            recipe.train_step(recipe.TrainingLoss(model, head_positions), opt,
                                [(latents, labels)], 1e-4, 3.0, CUDA, precision, scaler)
            recipe.update_ema(ema, model, step, 0.9999)
        buckets = 4 * model.num_params() if world > 1 else 0
    return gpu.peak_bytes + buckets + resident_bytes


def _every_position(seq_len, batch, device, generator=None):
    return torch.ones(batch, seq_len, dtype=torch.bool, device=device)


class _Stop(Exception):
    pass


def sampling_memory(config, batch=64, cfg=3.0, autocast="fp16", decode=True):
    """Bytes: the peak CUDA memory of sample.py at `batch` images per pass (FID-50K's setting:
    guidance, fp16 autocast, random order), counted over the first decoding step, the last
    step's backbone pass (every position but one known: the encoder's largest) and, with decode,
    kl16's decoding of the batch (its weights stay on the GPU throughout)."""
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
    rows = 2 * batch if cfg != 1.0 else batch

    def first_step_only(step, tokens, mask):
        raise _Stop

    with CudaOnCpu(values_up_to=_mask_elements(config, rows)) as gpu, torch.no_grad():
        with torch.device(CUDA):
            model = tb.TokenBridge(config).eval()
        vae = kl16(CUDA) if decode else None
        labels = torch.arange(batch) % config.num_classes
        last_mask = torch.zeros(rows, config.seq_len, dtype=torch.bool, device=CUDA)
        last_mask[:, 0] = True
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            with contextlib.suppress(_Stop):
                model.sample_tokens(labels, config.seq_len, cfg, on_step=first_step_only)
            values = torch.zeros(rows, config.seq_len, config.channels, device=CUDA)
            model.condition(values, last_mask, torch.zeros(rows, dtype=torch.long, device=CUDA))
            if decode:
                latents = torch.zeros(batch, config.channels, config.grid, config.grid,
                                      device=CUDA)
                data.decode(vae, latents)
    return gpu.peak_bytes


def sampling_counts(config, batch, num_iter, **sampling):
    """What a GPU does per decoding step of sample_tokens at `batch` images: the host's waits for
    the device, the kernels launched, and the kernels of one channel step of the head, counted
    with a random model of `config` on a CUDA device (neither count depends on the values)."""
    with CudaOnCpu(values_up_to=1) as gpu, torch.no_grad():
        with torch.device(CUDA):
            model = tb.TokenBridge(config).eval()
        labels = torch.arange(batch) % config.num_classes
        gpu.syncs.clear()
        gpu.kernels = 0
        model.sample_tokens(labels, num_iter, **sampling)
        waits, kernels = sum(gpu.syncs.values()), gpu.kernels
        head, rows = model.head, batch
        cache = head.empty_cache(rows, CUDA)
        before = gpu.kernels
        head.step(torch.zeros(rows, config.head_width, device=CUDA),
                  torch.zeros(rows, dtype=torch.long, device=CUDA),
                  torch.ones((), dtype=torch.long, device=CUDA), cache)
        step_kernels = gpu.kernels - before
    return {"waits_per_step": waits / num_iter, "kernels_per_step": kernels / num_iter,
            "head_step_kernels": step_kernels}
