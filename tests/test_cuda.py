"""The CUDA code paths, executed on the CPU: tensors carry a CUDA device (cuda_on_cpu.CudaOnCpu),
so a CPU/CUDA mix raises as on a GPU, and their values are compared with a CPU run.

Training (a new run: calibration, the reconstruction report, accumulated steps in each
precision, clipping, the EMA, validation, the checkpoint), sampling (both guidance modes, both
position orders, sample.py, a channel loop without waits), the export wrappers, the evaluator's
feature pass, and the memory model (against PyTorch's MemTracker; a micro-batch that will not
fit refused). Run: pytest tests/test_cuda.py
"""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_argv

import export
import sample
import tokenbridge as tb
import train
from lib import recipe
from lib.cuda_on_cpu import CudaOnCpu
from tools import evaluate

CUDA = torch.device("cuda", 0)


pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(cfg, perturb, seed=0):
    torch.manual_seed(seed)
    model = perturb(tb.TokenBridge(cfg))
    return model.calibrate(torch.randn(16, cfg.channels, cfg.grid, cfg.grid) + 0.5)


# --- the harness itself ---------------------------------------------------------------------

def test_cuda_tensors_hold_values_memory_and_count_waits():
    with CudaOnCpu() as gpu:
        x = torch.arange(6.0, device="cuda").view(2, 3)
        assert x.is_cuda and torch.cuda.is_available()
        with pytest.raises(RuntimeError, match="cpu"):
            x + torch.ones(2, 3)                             # a GPU refuses this mix, so do we
        product = (x @ x.T).cpu()
        before = gpu.live_bytes
        scratch = torch.empty(1000, device="cuda")            # 4000 bytes: one 4096-byte block
        assert gpu.live_bytes - before == 4096 and gpu.peak_bytes >= gpu.live_bytes
        del scratch
        assert gpu.live_bytes == before
        total = x.sum().item()
        torch.tensor(2.0, device="cuda")                      # a blocking upload: a wait
        torch.ones(3).to("cuda", non_blocking=True)           # staged from pageable memory: a wait
        torch.ones(3).pin_memory().to("cuda", non_blocking=True)   # queued behind the work: none
        with torch.autocast("cuda", dtype=torch.bfloat16):      # CUDA's policy, not the CPU's
            assert (x @ x.T).dtype == torch.bfloat16
            assert F.layer_norm(x.bfloat16(), (3,)).dtype == torch.float32
    host = torch.arange(6.0).view(2, 3)
    assert torch.equal(product, host @ host.T)
    assert total == 15.0 and gpu.syncs["item"] == 1 and gpu.syncs["to cpu"] == 1
    assert gpu.syncs["from host"] == 2


# --- training ---------------------------------------------------------------------------------

def test_a_new_cuda_run_trains_validates_samples_and_checkpoints(tmp_path, fake_data, vae_dir,
                                                                  small_model):
    """train.py --device cuda as a user's first GPU run: calibration and the reconstruction report
    on CUDA, bf16 steps of 2 accumulated micro-batches, validation, the EMA, the sample grid and
    the checkpoint, which loads on a machine without a GPU."""
    run = tmp_path / "run"
    argv = [a if a != "cpu" else "cuda" for a in run_argv(run, fake_data, vae_dir)]
    with CudaOnCpu() as gpu:
        out = train.main(train.get_parser().parse_args(
            argv + ["--micro-batch", "4", "--steps", "2", "--grid-per-class", "1"]))
    assert out["step"] == 2 and gpu.peak_bytes > 0 and (run / "samples.png").is_file()
    assert 0 < json.loads((run / "metrics.json").read_text())["val_bits_per_token"] < 8
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert all(t.device.type == "cpu" and t.isfinite().all() for t in ckpt["ema"].values())
    first = torch.load(run / "checkpoint.pt", weights_only=True)["model"]     # no map_location
    assert not torch.equal(first["head.out_bias"], ckpt["ema"]["head.out_bias"])  # EMA lags


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_an_accumulated_clipped_step_on_cuda_is_the_cpus(small_cfg, perturb, precision):
    """Two micro-batches, gradients clipped, fp16 through the loss scaler: the same loss and
    gradients as on the CPU, to rounding (CPU and CUDA autocast cast different operators), and
    in fp32 the same weights to 1% of a step."""
    model = calibrated(small_cfg, perturb)
    torch.manual_seed(1)
    batches = [(torch.randn(4, 4, 4, 4), torch.randint(0, 2, (4,))) for _ in range(2)]
    lr = 1e-3

    def step(model, device):
        opt = recipe.make_optimizer(model, lr, 0.02)
        scaler = recipe.loss_scaler(precision, device)
        torch.manual_seed(2)                                # the same masks on both devices
        moved = [(x.to(device), y.to(device)) for x, y in batches]
        loss = recipe.train_step(recipe.TrainingLoss(model, 4), opt, moved, lr, 0.05,
                                   device, precision, scaler)
        grads = torch.cat([p.grad.cpu().flatten() for p in model.parameters()])
        return loss, grads, torch.cat([p.detach().cpu().flatten() for p in model.parameters()])

    cpu_loss, cpu_grads, cpu_weights = step(copy.deepcopy(model), torch.device("cpu"))
    with CudaOnCpu():
        cuda_loss, cuda_grads, cuda_weights = step(copy.deepcopy(model).to(CUDA), CUDA)
    tol = 1e-5 if precision == "fp32" else 3e-2
    assert cuda_loss == pytest.approx(cpu_loss, rel=tol)
    assert cpu_grads.norm() == pytest.approx(0.05, rel=1e-3)                 # clipped
    assert (cuda_grads - cpu_grads).norm() <= tol * cpu_grads.norm()
    if precision == "fp32":
        torch.testing.assert_close(cuda_weights, cpu_weights, rtol=0, atol=0.01 * lr)


# --- sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_mode,order", [("features", "random"), ("logits", "confidence")])
def test_sampling_on_cuda_gives_the_cpus_tokens(small_cfg, perturb, cfg_mode, order):
    model = calibrated(small_cfg, perturb).eval()
    kwargs = dict(num_iter=4, cfg=2.5, temperature=0.9, seed=3, cfg_mode=cfg_mode,
                  position_order=order)
    labels = [0, 1, 1]
    expected = model.sample_tokens(labels, **kwargs)
    with CudaOnCpu() as gpu:
        tokens = copy.deepcopy(model).to(CUDA).sample_tokens(labels, **kwargs)
        assert tokens.is_cuda
        tokens = tokens.cpu()
    assert torch.equal(tokens, expected) and sum(gpu.syncs.values()) > 0
    with CudaOnCpu():                                     # labels given on the device
        on_device = copy.deepcopy(model).to(CUDA).sample_tokens(
            torch.tensor(labels, device=CUDA), **kwargs).cpu()
    assert torch.equal(on_device, expected)


@pytest.mark.parametrize("guided", [False, True])
def test_the_channel_loop_never_waits_for_the_device(small_cfg, perturb, guided):
    """16 channel steps per position: a read-back inside the loop would stall a GPU 16 times per
    decoding step."""
    model = calibrated(small_cfg, perturb).eval()
    rows, width = 6, small_cfg.head_width
    with CudaOnCpu() as gpu, torch.no_grad():
        on_gpu = copy.deepcopy(model).to(CUDA)
        cond = torch.randn(2 * rows if guided else rows, width, device=CUDA)
        uniforms = torch.rand(rows, small_cfg.channels, device=CUDA)
        gpu.syncs.clear()
        tokens, _ = on_gpu._sample_channels(cond, uniforms, 0.9, 2.5 if guided else None)
        assert not gpu.syncs, dict(gpu.syncs)
        tokens = tokens.cpu()
    expected, _ = model._sample_channels(gpu.value(cond), gpu.value(uniforms), 0.9,
                                         2.5 if guided else None)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("cfg_mode,order", [("features", "random"), ("logits", "confidence")])
def test_a_decoding_step_never_waits_for_the_device(small_cfg, perturb, cfg_mode, order):
    """The whole sampler, guidance and the backbone's gather included: every count it needs is
    known on the host, so the host queues step after step and reads the tokens back once."""
    model = calibrated(small_cfg, perturb).eval()
    waits = []
    with CudaOnCpu() as gpu:
        on_gpu = copy.deepcopy(model).to(CUDA)
        gpu.syncs.clear()
        on_gpu.sample_tokens([0, 1, 2], num_iter=4, cfg=2.5, seed=3, cfg_mode=cfg_mode,
                             position_order=order,
                             on_step=lambda *_: waits.append(sum(gpu.syncs.values())))
    assert waits == [0, 0, 0, 0], dict(gpu.syncs)


def test_sample_py_on_cuda_writes_the_cpus_tokens(tmp_path, fake_data, vae_dir, small_model):
    """sample.py --device cuda on a trained run, fp32 and under fp16 autocast (the official
    evaluation's), with the VAE decoder; fp32 gives the CPU's tokens."""
    run = tmp_path / "run"
    train.main(train.get_parser().parse_args(
        run_argv(run, fake_data, vae_dir, "--steps", "2")))

    def sampled(device, autocast):
        out = tmp_path / f"{device}-{autocast}"
        sample.main(sample.get_parser().parse_args(
            ["--run-dir", str(run), "--device", device, "--autocast", autocast, "--labels", "0,1",
             "--num-iter", "3", "--cfg", "2.0", "--threads", "1", "--out", "",
             "--npz", f"{out}.npz", "--save-tokens", f"{out}.npy"]))
        return np.load(f"{out}.npy"), np.load(f"{out}.npz")["arr_0"]

    cpu_tokens, cpu_images = sampled("cpu", "none")
    with CudaOnCpu():
        cuda_tokens, cuda_images = sampled("cuda", "none")
        fp16_tokens, fp16_images = sampled("cuda", "fp16")
    np.testing.assert_array_equal(cuda_tokens, cpu_tokens)
    assert np.abs(cuda_images.astype(int) - cpu_images.astype(int)).max() <= 1
    assert fp16_tokens.shape == cpu_tokens.shape and fp16_images.shape == cpu_images.shape


# --- export's wrappers, the evaluator ---------------------------------------------------------

@pytest.mark.parametrize("halves", [1, 2])
def test_export_wrappers_on_cuda_inputs_are_the_cpus(small_cfg, perturb, halves):
    """The graphs' modules run on a GPU as traced: every tensor they make on the inputs' device."""
    model = calibrated(small_cfg, perturb).eval()
    gen = torch.Generator().manual_seed(0)
    backbone_in = export.backbone_inputs(small_cfg, 3, halves, gen)
    head_in = export.head_inputs(model, halves, 5, 2, gen)
    with torch.no_grad():
        expected = [*export.BackboneGraph(model)(*backbone_in),
                    *export.HeadStepGraph(model)(*head_in)]
    with CudaOnCpu(), torch.no_grad():
        on_gpu = copy.deepcopy(model).to(CUDA)
        got = [*export.BackboneGraph(on_gpu)(*(x.to(CUDA) for x in backbone_in)),
               *export.HeadStepGraph(on_gpu)(*(x.to(CUDA) for x in head_in))]
        got = [x.cpu() for x in got]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_inception_features_on_cuda_are_the_cpus(tmp_path, random_inception):
    pictures = np.random.default_rng(0).integers(0, 256, (evaluate.MIN_IMAGES, 32, 32, 3))
    np.savez(tmp_path / "samples.npz", arr_0=pictures.astype(np.uint8))
    net = evaluate.load_inception(random_inception)
    pool, logits = evaluate.inception_features(net, str(tmp_path / "samples.npz"), "samples")
    with CudaOnCpu():
        on_gpu = evaluate.load_inception(random_inception, device="cuda")
        cuda_pool, cuda_logits = evaluate.inception_features(on_gpu, str(tmp_path / "samples.npz"),
                                                             "samples")
    np.testing.assert_allclose(cuda_pool, pool, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cuda_logits, logits, rtol=1e-4, atol=1e-4)


# --- the memory model -------------------------------------------------------------------------

def test_memory_counted_here_is_pytorchs_memory_trackers(small_cfg):
    """Every byte of a bf16 step on CUDA tensors, counted by allocation here and by PyTorch's
    MemTracker (parameters, gradients, optimizer state, activations by module)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    micro_batch = 8
    with CudaOnCpu(values_up_to=None) as gpu:
        with torch.device(CUDA):
            model = tb.TokenBridge(small_cfg)
        opt = recipe.make_optimizer(model, 1e-4, 0.02)
        weights = gpu.live_bytes
        latents = torch.randn(micro_batch, 4, 4, 4, device=CUDA)
        labels = torch.zeros(micro_batch, dtype=torch.long, device=CUDA)
        made_before = gpu.live_bytes - weights                  # the inputs, not tracked there
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            for _ in range(2):
                recipe.train_step(recipe.TrainingLoss(model), opt, [(latents, labels)],
                                    1e-4, 3.0, CUDA, "bf16")
        tracked = tracker.get_tracker_snapshot("peak")[CUDA]["Total"]
    assert made_before > 0 and gpu.peak_bytes == tracked + made_before


def test_the_memory_model_grows_with_the_micro_batch_and_shrinks_with_checkpointing(small_cfg):
    from lib import gpu_costs
    params = tb.TokenBridge(small_cfg).num_params()
    peak = {(mb, ckpt): gpu_costs.training_memory(small_cfg, mb, "bf16", ckpt)
            for mb in (1, 8) for ckpt in (False, True)}
    # weights, EMA, gradients and AdamW's two moments: five fp32 copies at least
    assert peak[1, False] > 5 * 4 * params
    assert peak[8, False] > peak[1, False] and peak[8, True] < peak[8, False]
    resident = gpu_costs.training_memory(small_cfg, 1, "bf16", resident_bytes=10**6)
    assert resident == peak[1, False] + 10**6
    sampling = gpu_costs.sampling_memory(small_cfg, batch=4, decode=False)
    assert 4 * params < sampling < peak[1, False]


def test_a_micro_batch_that_will_not_fit_the_gpu_is_refused_before_the_run(tmp_path, fake_data,
                                                                        vae_dir, small_model):
    run = tmp_path / "run"
    argv = [a if a != "cpu" else "cuda" for a in run_argv(run, fake_data, vae_dir)]
    with CudaOnCpu(gpu_memory=2**20), pytest.raises(ValueError) as refused:
        train.main(train.get_parser().parse_args(argv + ["--micro-batch", "8"]))
    message = str(refused.value)
    assert "--micro-batch 8" in message and "more than this GPU's 0.0 GiB" in message
    assert "\n" not in message and not run.exists()


@pytest.mark.slow
def test_benchmark_memory_prints_a_line_per_setting():
    """python -m tools.benchmark memory: one JSON line per (micro-batch, precision, checkpointing),
    the preset's default micro-batch marked, then FID sampling's."""
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "memory", "--preset", "tiny",
                           "--micro-batches", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    steps = {(d["micro_batch"], d["precision"], d["grad_checkpointing"]): d for d in lines[:-1]}
    default = recipe.RECIPES["tiny"].micro_batch
    assert set(steps) == {(mb, p, c) for mb in (2, default) for p in recipe.PRECISIONS
                          for c in (False, True)}
    assert all(d["preset"] == "tiny" and d.get("default", False) == (mb == default)
               for (mb, _, _), d in steps.items())
    assert steps[default, "bf16", True]["peak_gib"] < steps[default, "bf16", False]["peak_gib"]
    assert lines[-1]["what"] == "fid_sampling" and lines[-1]["peak_gib"] > 0
