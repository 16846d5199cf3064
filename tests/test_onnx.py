"""Tests of export.py and the ONNX Runtime loop in sample.py, in three levels: each graph
close to PyTorch, then the same tokens for a seed in both runtimes, then the products (npz, grid).

Every test builds its own tiny run (a perturbed tiny TokenBridge with EMA weights, a random tiny
AutoencoderKL) in a temporary folder: no downloads. CPU only; the CUDA checks skip without CUDA.
"""
import inspect
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import deploy
import export
import sample
import tokenbridge as tb
from lib import cli, files, jobs, runs
from tools import benchmark

ROOT = Path(__file__).resolve().parent.parent
LABELS = [0, 7, 3]


def tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    # 3 levels: stride 4, as the tiny preset
    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
                         scaling_factor=0.5).eval()


def save_run(path, model, vae=None, ema=None):
    os.makedirs(path, exist_ok=True)
    ckpt = {"config": model.config.to_dict(), "model": model.state_dict()}
    if ema is not None:
        ckpt["ema"] = ema
    torch.save(ckpt, os.path.join(path, "checkpoint.pt"))
    if vae is not None:
        vae.save_pretrained(os.path.join(path, "vae"))
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread, perturb):
    """A run whose checkpoint's `model` differs from its `ema`: the export must use the EMA."""
    torch.manual_seed(0)
    model = tb.TokenBridge(tb.TokenBridgeConfig.preset("tiny")).eval()
    spread = torch.linspace(0.5, 2.0, 16).view(1, -1, 1, 1)
    model.calibrate(torch.randn(32, 16, 8, 8) * spread + spread)   # unequal channel means/stds
    model.quantizer.order.copy_(torch.randperm(16, generator=torch.Generator().manual_seed(3)))
    ema = {k: v.clone() for k, v in perturb(model).state_dict().items()}
    stale = {k: v + 1.0 if v.is_floating_point() and k.startswith("head.") else v
             for k, v in ema.items()}
    model.load_state_dict(stale)
    path = save_run(tmp_path_factory.mktemp("run"), model, tiny_vae(), ema=ema)
    info = export.export(path, verbose=False)
    model.load_state_dict(ema)
    return SimpleNamespace(path=path, onnx=os.path.join(path, "onnx"), model=model, info=info)


@pytest.fixture(scope="module")
def sampler(run):
    return deploy.OnnxSampler(run.onnx, "cpu", threads=1)


def test_export_uses_ema_and_records_fingerprint(run):
    loaded, _ = runs.load_run(run.path)
    assert runs.fingerprint(loaded) == runs.fingerprint(run.model) == run.info["fingerprint"]
    assert run.info["weights"] == "ema"
    assert max(run.info["max_abs_diff"].values()) < 1e-4
    for name in (deploy.BACKBONE_FILE, deploy.HEAD_FILE, deploy.VAE_FILE):
        graph = onnx.load(os.path.join(run.onnx, name))
        metadata = {p.key: p.value for p in graph.metadata_props}
        assert metadata["fingerprint"] == run.info["fingerprint"]


def test_both_samplers_take_the_same_arguments_with_the_same_defaults():
    ours = inspect.signature(tb.TokenBridge.sample_tokens).parameters
    twin = inspect.signature(deploy.OnnxSampler.sample_tokens).parameters
    assert list(twin) == list(ours)
    assert [p.default for p in ours.values()] == [p.default for p in twin.values()]


# Bad arguments, one or two at a time (two: the first in the signature's order is named).
BAD_SAMPLING = [dict(labels=[[1, 2]]), dict(labels=[0.5, 1.0]), dict(labels=[]),
                dict(labels=np.array([1, 2], np.float32)), dict(labels=[11]), dict(labels=[-1]),
                dict(num_iter=0), dict(num_iter=65), dict(num_iter=2.5), dict(cfg=-1.0),
                dict(cfg=float("nan")), dict(temperature=-0.1), dict(temperature=float("nan")),
                dict(cfg_mode="both"), dict(cfg_schedule="cosine"), dict(position_order="raster"),
                dict(confidence_noise=-1.0), dict(labels=[11], cfg=-1.0),
                dict(cfg=-1.0, temperature=-1.0), dict(position_order="raster", cfg_mode="both")]


@pytest.mark.parametrize("bad", BAD_SAMPLING, ids=[",".join(b) for b in BAD_SAMPLING])
def test_both_samplers_refuse_bad_arguments_alike(run, sampler, bad):
    """The same checks in the same order: each runtime refuses with the same one line."""
    arguments = {"labels": [1, 2], "num_iter": 4, **bad}
    refusals = []
    for sample_tokens in (run.model.sample_tokens, sampler.sample_tokens):
        with pytest.raises(ValueError) as refused:
            sample_tokens(**arguments)
        refusals.append(str(refused.value))
    assert refusals[0] == refusals[1] and "\n" not in refusals[0]
    order = list(inspect.signature(deploy.OnnxSampler.sample_tokens).parameters)
    assert refusals[0].startswith(min(bad, key=order.index)), refusals[0]  # the first bad one


def test_both_samplers_tell_a_watcher_the_same_steps(run, sampler):
    seen = {"torch": [], "onnx": []}
    run.model.sample_tokens([1, 2], num_iter=4, seed=2, on_step=lambda s, tokens, mask:
                            seen["torch"].append((s, tokens.numpy(), mask.numpy())))
    sampler.sample_tokens([1, 2], num_iter=4, seed=2, on_step=lambda s, tokens, mask:
                          seen["onnx"].append((s, tokens, mask)))
    assert [s for s, _, _ in seen["onnx"]] == [s for s, _, _ in seen["torch"]] == [0, 1, 2, 3]
    pairs = zip(seen["torch"], seen["onnx"], strict=True)
    for (_, tokens, mask), (_, twin_tokens, twin_mask) in pairs:
        np.testing.assert_array_equal(mask, twin_mask)
        np.testing.assert_array_equal(tokens, twin_tokens)


def test_mask_schedule_twin():
    for n in (1, 2, 7, 64, 256):
        for steps in range(1, min(n, 70) + 1):
            assert deploy.mask_schedule(n, steps) == tb.mask_schedule(n, steps)


def test_guidance_weight_twin():
    for args in [(3.1, 256, left, schedule, clamp) for left in (256, 9, 1, 0)
                 for schedule in ("linear", "constant") for clamp in (False, True)]:
        assert deploy.guidance_weight(*args) == tb.guidance_weight(*args)


# --- level 1: every graph close to PyTorch ----------------------------------------------------

@pytest.mark.parametrize("halves", [1, 2])
def test_backbone_graph_matches_torch(run, sampler, halves):
    """The candidates' rows of each half and their feature-guided mix, against PyTorch's, and
    against the rows of the full condition gathered by hand."""
    g = torch.Generator().manual_seed(5)
    inputs = export.backbone_inputs(run.model.config, 5, halves, g)
    values, mask, labels, candidates, guidance = inputs
    with torch.no_grad():
        want = [x.numpy() for x in run.model.condition_rows(*inputs)]
        cond = run.model.condition(values, mask, labels).numpy()                  # (G*B, N, D)
    by_hand = np.stack([np.concatenate([half[i, candidates[i].numpy()] for i in range(5)])
                        for half in np.split(cond, halves)])
    np.testing.assert_allclose(want[0], by_hand, atol=1e-6)
    arrays = [x.numpy() for x in (values, mask, labels, candidates)]
    for mixed, expected in ((False, want[0]), (True, want[1])):
        got = sampler.condition_rows(*arrays, float(guidance), mixed)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("halves,step", [(1, 0), (2, 5), (1, 15)])
def test_head_step_graph_matches_torch(run, sampler, halves, step):
    g = torch.Generator().manual_seed(6)
    example = export.head_inputs(run.model, halves, 9, step, g)
    with torch.no_grad():
        want = export.HeadStepGraph(run.model)(*example)
    feeds = {n: x.numpy() for n, x in zip(deploy.HEAD_INPUTS, example, strict=True)}
    got = sampler.head.run(deploy.HEAD_OUTPUTS, feeds)
    for name, w, o in zip(deploy.HEAD_OUTPUTS, want, got, strict=True):
        if w.is_floating_point():
            np.testing.assert_allclose(o, w.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(o, w.numpy(), err_msg=name)
    # and the wrapper itself is head.step + sample_from_logits, not a re-implementation that drifted
    cond, t, cache, tokens, uniforms, temperature, guidance, _ = example
    previous = tokens[:, max(step - 1, 0)].repeat(halves)
    with torch.no_grad():
        logits, _ = run.model.head.step(cond.flatten(0, 1), previous, t, cache)
    logits = logits.view(halves, 9, -1)
    mixed = logits[-1] + guidance * (logits[0] - logits[-1])
    token, _ = tb.sample_from_logits(mixed, uniforms[:, step], float(temperature))
    np.testing.assert_allclose(got[0], mixed.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[1][:, step], token.numpy())


def test_vae_decoder_graph_matches_torch(run, sampler):
    vae = runs.load_vae(os.path.join(run.path, runs.VAE_DIR))
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = vae.decode(latents / vae.config.scaling_factor).sample.numpy()
    np.testing.assert_allclose(sampler.decode(latents.numpy()), want, atol=1e-5, rtol=1e-5)


def test_channel_loop_matches_torch(run, sampler):
    """The whole channel loop (KV cache ping-pong, logit guidance, order scatter, scores)."""
    g = torch.Generator().manual_seed(8)
    cond = torch.randn(2, 11, run.model.config.head_width, generator=g)
    uniforms = torch.rand(11, 16, generator=g)
    with torch.no_grad():
        want, want_score = run.model._sample_channels(cond.flatten(0, 1), uniforms, 0.9,
                                                      logit_guidance=2.5)
    got, score = sampler.sample_channels(cond.numpy(), uniforms.numpy(), 0.9, 2.5)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_allclose(score, want_score.numpy(), atol=1e-4, rtol=1e-5)


# --- level 2: the same tokens for a seed -------------------------------------------------------

@pytest.mark.parametrize("order,cfg,mode,temperature,schedule", [
    ("random", 1.0, "features", 1.0, "linear"), ("random", 3.0, "features", 0.9, "linear"),
    ("random", 3.0, "logits", 1.0, "linear"), ("confidence", 1.0, "features", 1.0, "linear"),
    ("confidence", 2.0, "logits", 0.8, "constant"), ("random", 1.0, "features", 0.0, "linear"),
    ("random", 3.0, "features", 1.0, "constant")])
def test_tokens_equal_across_runtimes(run, sampler, order, cfg, mode, temperature, schedule):
    """The same tokens for a seed. ORT's and PyTorch's logits differ by ~1e-6, so a uniform that
    lands within that of a CDF step picks the neighbouring token (about 5e-5 per draw on this
    model) and that image diverges from there on. So: at most one image of the six may differ; a
    real bug (order, schedule, rng sequence, guidance) changes every image."""
    kw = dict(num_iter=6, cfg=cfg, temperature=temperature, cfg_mode=mode, cfg_schedule=schedule,
              position_order=order)
    differ = 0
    for seed in (0, 1):
        want = run.model.sample_tokens(LABELS, seed=seed, **kw).numpy()
        got = sampler.sample_tokens(LABELS, seed=seed, **kw)
        differ += int((got != want).any(axis=(1, 2)).sum())
    assert differ <= 1, f"{differ} of {2 * len(LABELS)} images differ between runtimes"
    assert not np.array_equal(got, sampler.sample_tokens(LABELS, seed=2, **kw))  # the seed matters


@pytest.mark.parametrize("mode,order", [("logits", "confidence"), ("features", "random")])
def test_iobinding_loop_equals_plain_run(run, sampler, mode, order):
    """With IOBinding the backbone's rows stay where ORT made them (an OrtValue) and go to the
    head's loop as they are: the same tokens as plain runs."""
    bound = deploy.OnnxSampler(run.onnx, "cpu", iobinding=True, threads=1)
    assert bound.iobinding and not sampler.iobinding
    inputs = [x.numpy() for x in export.backbone_inputs(run.model.config, 2, 2,
                                                         torch.Generator().manual_seed(0))]
    assert isinstance(bound.condition_rows(*inputs, mixed=mode == "features"), ort.OrtValue)
    kw = dict(num_iter=5, cfg=2.0, cfg_mode=mode, position_order=order, seed=4)
    np.testing.assert_array_equal(bound.sample_tokens(LABELS, **kw),
                                  sampler.sample_tokens(LABELS, **kw))


# --- level 3: the command line, with torch made unimportable ------------------------------------

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
sys.path.insert(0, {root!r})
import sample
sample.main(sample.get_parser().parse_args({argv!r}))
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("NO_TORCH_OK")
"""


def test_onnx_cli_runs_without_torch_and_matches_torch_cli(run, tmp_path):
    common = ["--seed", "3", "--labels", "1,2,9,4", "--num-iter", "6", "--cfg", "2.0",
              "--position-order", "confidence", "--device", "cpu", "--threads", "1"]
    onnx_argv = ["--onnx", run.onnx, "--run-dir", run.path, "--runtime", "onnx",
                 "--out", str(tmp_path / "onnx.png"), "--save-tokens", str(tmp_path / "onnx.npy"),
                 "--npz", str(tmp_path / "onnx.npz")] + common
    code = BLOCK_TORCH.format(root=str(ROOT), argv=onnx_argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "NO_TORCH_OK" in proc.stdout, proc.stderr[-2000:]

    torch_argv = ["--run-dir", run.path, "--runtime", "torch", "--out", str(tmp_path / "torch.png"),
                  "--save-tokens", str(tmp_path / "torch.npy"),
                  "--npz", str(tmp_path / "torch.npz")] + common
    sample.main(sample.get_parser().parse_args(torch_argv))
    np.testing.assert_array_equal(np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "torch.npy"))
    a, b = np.load(tmp_path / "onnx.npz"), np.load(tmp_path / "torch.npz")
    assert a["arr_0"].shape == (4, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["labels"], [1, 2, 9, 4])
    # same tokens, decoded by two runtimes: the images agree to a rounding step
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    assert (tmp_path / "onnx.png").stat().st_size > 0


# --- bad input: one clear error -----------------------------------------------------------------

def _main(argv):
    return sample.main(sample.get_parser().parse_args(argv + ["--threads", "1"]))


def test_fingerprint_mismatch_is_refused(run, tmp_path, perturb):
    copy = tmp_path / "onnx"
    shutil.copytree(run.onnx, copy)
    meta = json.loads((copy / deploy.META_FILE).read_text())
    meta["fingerprint"] = "0" * 64
    (copy / deploy.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="exported from other weights"):
        deploy.OnnxSampler(str(copy), "cpu", threads=1)
    del meta["format"]  # graphs from before the format was recorded: the old cache layout
    (copy / deploy.META_FILE).write_text(json.dumps(meta))
    reads = rf"another export.py \(format 1, this sample.py reads {deploy.EXPORT_FORMAT}\)"
    with pytest.raises(ValueError, match=reads):
        deploy.OnnxSampler(str(copy), "cpu", threads=1)
    # graphs fine, but the run's checkpoint is not the one they came from
    other = save_run(tmp_path / "other", perturb(tb.TokenBridge(run.model.config), seed=9))
    with pytest.raises(ValueError, match="another checkpoint"):
        _main(["--onnx", run.onnx, "--run-dir", other, "--runtime", "onnx", "--out", ""])


def test_bad_input_errors(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run.onnx, broken)
    os.remove(broken / deploy.HEAD_FILE)
    with pytest.raises(ValueError, match="missing graph file.*head_step.onnx"):
        deploy.OnnxSampler(str(broken), "cpu", threads=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        _main(["--onnx", run.onnx, "--runtime", "onnx", "--labels", "3,10", "--out", ""])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        _main(["--run-dir", run.path, "--runtime", "torch", "--labels", "-1", "--out", ""])
    with pytest.raises(ValueError, match="--runtime onnx needs --onnx"):
        _main(["--run-dir", run.path, "--runtime", "onnx"])
    with pytest.raises(ValueError, match="no TokenBridge checkpoint at"):
        export.export(str(tmp_path / "nothing"), verbose=False)


def _cli_error(script, *argv):
    """Run a script as a user would: it must end in one `error: ...` line and a non-zero exit."""
    proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


class RunsCode:
    """What a malicious checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_carrying_code_is_refused_without_running_it(run, tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(RunsCode(live)))
    assert live.exists()  # the payload is real: a plain unpickler runs it
    bad, marker, png = tmp_path / "bad", tmp_path / "PWNED", tmp_path / "grid.png"
    bad.mkdir()
    malicious = {"config": run.model.config.to_dict(), "model": RunsCode(marker)}
    torch.save(malicious, bad / "checkpoint.pt")
    for script, argv in (("sample.py", ["--run-dir", str(bad), "--out", str(png)]),
                         ("export.py", ["--run-dir", str(bad)])):
        err = _cli_error(script, *argv)
        assert err.startswith(f"error: {bad / 'checkpoint.pt'} is not a TokenBridge checkpoint "
                              "(torch.load with weights_only=True refused it"), err
    assert not marker.exists() and not png.exists() and not (bad / "onnx").exists()


@pytest.mark.parametrize("write,why", [
    (lambda path, good: path.write_bytes(good[:len(good) // 2]),
     "truncated, or not written by torch.save: Pytorch"),
    (lambda path, good: path.write_bytes(b""),
     "truncated, or not written by torch.save: EOFError"),
    (lambda path, good: path.write_bytes(bytes(range(256)) * 4),
     "torch.load with weights_only=True refused it"),
    (lambda path, good: torch.save({"model": {}}, path),
     'it has no "config" and "model"')],
    ids=["truncated", "empty", "random-bytes", "no-config"])
def test_unreadable_checkpoint_is_one_clear_error(run, tmp_path, write, why):
    write(tmp_path / "checkpoint.pt", (Path(run.path) / "checkpoint.pt").read_bytes())
    message = f"checkpoint.pt is not a TokenBridge checkpoint \\({re.escape(why)}"
    with pytest.raises(ValueError, match=message):
        runs.load_run(str(tmp_path))


def test_corrupt_graph_file_is_one_clear_error(run, tmp_path):
    broken, png = tmp_path / "broken", tmp_path / "grid.png"
    shutil.copytree(run.onnx, broken)
    graph = broken / deploy.HEAD_FILE
    graph.write_bytes(graph.read_bytes()[:1000])  # an interrupted copy
    err = _cli_error("sample.py", "--runtime", "onnx", "--onnx", str(broken), "--out", str(png))
    assert err.startswith(f"error: {graph} cannot be loaded by onnxruntime ("), err
    assert "re-run export.py" in err, err
    assert not png.exists()
    graph.write_text("not a graph")
    with pytest.raises(ValueError,
                       match="head_step.onnx cannot be loaded by onnxruntime .*INVALID_PROTOBUF"):
        deploy.OnnxSampler(str(broken), "cpu", threads=1)


def test_unwritable_outputs_are_refused_before_sampling(run, tmp_path, monkeypatch):
    missing, png = tmp_path / "missing", tmp_path / "grid.png"
    err = _cli_error("sample.py", "--run-dir", run.path, "--out", str(missing / "grid.png"))
    assert err == (f"error: --out {missing / 'grid.png'}: cannot write there "
                   f"(folder {missing} does not exist; create it or choose another path)")
    monkeypatch.setattr(sample, "torch_runtime",
                        lambda *a: pytest.fail("loaded a model before checking the outputs"))
    a_file = Path(run.path) / "checkpoint.pt"
    for flags, message in (
            (["--npz", str(a_file / "x.npz")], f"--npz {a_file / 'x.npz'}: cannot write there"),
            (["--save-tokens", str(missing / "t.npy")], "--save-tokens .*does not exist"),
            (["--npz", str(tmp_path)], "it is a folder"),
            (["--out", str(tmp_path / "grid.txt")], "not an image type Pillow writes")):
        with pytest.raises(ValueError, match=message):
            _main(["--run-dir", run.path, "--out", str(png)] + flags)
        assert not png.exists()  # no output written while another cannot be


def test_export_out_that_cannot_be_created_is_one_clear_error(run):
    a_file = Path(run.path) / "checkpoint.pt"
    message = r"cannot write the output folder .*checkpoint.pt/onnx \(Not a directory\)"
    with pytest.raises(ValueError, match=message):
        export.export(run.path, str(a_file / "onnx"), verbose=False)


@pytest.mark.parametrize("flags,message", [
    (["--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["--labels", "a,b"],
     "--labels must be comma-separated class numbers such as 3,3,7, got 'a,b'"),
    (["--num-iter", "0"], "--num-iter must be >= 1, got 0"),
    (["--cfg", "-1"], "--cfg must be >= 0, got -1.0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
    (["--threads", "-1"], "--threads must be >= 0, got -1"),
    (["--runtime", "onnx", "--capture"],
     r"--capture is for --runtime torch (ONNX Runtime keeps its own graphs)")],
    ids=["num-images", "labels", "num-iter", "cfg", "temperature", "threads", "capture"])
def test_bad_sampling_flags_are_one_line_errors(run, tmp_path, flags, message):
    png = tmp_path / "grid.png"
    err = _cli_error("sample.py", "--run-dir", run.path, "--out", str(png), *flags)
    assert err == f"error: {message}"
    assert not png.exists()


def test_num_iter_beyond_the_positions_is_refused(run):
    with pytest.raises(ValueError, match=r"num_iter must be in \[1, 64\]"):
        _main(["--run-dir", run.path, "--runtime", "torch", "--num-iter", "65", "--out", ""])
    with pytest.raises(ValueError, match=r"num_iter must be in \[1, 64\]"):
        _main(["--onnx", run.onnx, "--runtime", "onnx", "--num-iter", "65", "--out", ""])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: nothing to refuse")
def test_cuda_requested_without_torch_cuda_is_refused(run, tmp_path):
    png = tmp_path / "grid.png"
    err = _cli_error("sample.py", "--run-dir", run.path, "--runtime", "torch", "--device", "cuda",
                     "--out", str(png))
    assert err.startswith("error: --device cuda, but torch.cuda.is_available() is False"), err
    assert not png.exists()


def test_autocast_is_refused_on_the_cpu(run):
    with pytest.raises(ValueError, match="--autocast bf16 is for CUDA"):
        _main(["--run-dir", run.path, "--runtime", "torch", "--device", "cpu", "--autocast", "bf16",
               "--out", ""])


def test_cuda_requested_without_onnxruntime_cuda_is_refused(run):
    if _cuda_loads(run):
        pytest.skip("onnxruntime's CUDA provider works here: nothing to refuse")
    with pytest.raises(ValueError, match="--device cuda, but onnxruntime's CUDAExecutionProvider"):
        _main(["--onnx", run.onnx, "--runtime", "onnx", "--device", "cuda", "--out", ""])
    assert deploy.OnnxSampler(run.onnx, "auto", threads=1).device == "cpu"  # auto falls back


def test_export_refuses_a_graph_that_differs_from_torch(run, tmp_path):
    """The parity check is live: with a zero tolerance the (1e-6-close) backbone is refused."""
    out = tmp_path / "strict"
    with pytest.raises(ValueError, match="backbone.onnx differs from PyTorch"):
        export.export(run.path, str(out), tolerance=1e-12, verbose=False)
    assert not (out / deploy.BACKBONE_FILE).exists()


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_graphs_are_checked_and_sample(run, tmp_path, precision):
    """--fp16 / --int8: checked against fp32 PyTorch within their own tolerance, recorded in the
    JSON, and the loop samples with them. int8 quantizes the backbone's and head's matmuls only."""
    out = tmp_path / precision
    info = export.export(run.path, str(out), precision=precision, verbose=False)
    assert info["precision"] == precision and (precision != "int8" or info["int8"]["reduce_range"])
    # our own check on fresh inputs: close to fp32 PyTorch, yet not fp32 (precision was reduced)
    g = torch.Generator().manual_seed(11)
    inputs = export.backbone_inputs(run.model.config, 4, 2, g)
    with torch.no_grad():
        want = run.model.condition_rows(*inputs)[0].numpy()
    session = deploy.make_session(str(out / deploy.BACKBONE_FILE), "cpu")[0]
    feeds = dict(zip(deploy.BACKBONE_INPUTS, (x.numpy() for x in inputs), strict=True))
    got = session.run(None, feeds)[0]
    relative = np.abs(got - want).max() / (1 + np.abs(want).max())
    assert 1e-5 < relative < export.PRECISIONS[precision]["tolerance"], relative
    int8_ops = {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}
    for name, quantized in ((deploy.BACKBONE_FILE, True), (deploy.HEAD_FILE, True),
                            (deploy.VAE_FILE, False)):
        ops = {node.op_type for node in onnx.load(str(out / name)).graph.node}
        assert bool(ops & int8_ops) == (quantized and precision == "int8"), name
    # the head step's sampler (log-softmax, exp, the CDF) computes in fp32 at every precision
    head = onnx.shape_inference.infer_shapes(onnx.load(str(out / deploy.HEAD_FILE)))
    types = {v.name: v.type.tensor_type.elem_type for v in head.graph.value_info}
    sampler_ops = [n for n in head.graph.node if n.op_type in ("LogSoftmax", "Exp", "CumSum")]
    assert len(sampler_ops) == 3
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in sampler_ops)
    tokens = deploy.OnnxSampler(str(out), "cpu").sample_tokens(LABELS, num_iter=4, seed=0)
    assert tokens.shape == (3, 64, 16) and 0 <= tokens.min() and tokens.max() < 64


def _benchmark_line(capsys):
    argv = ["sample", "--preset", "tiny", "--device", "cpu", "--threads", "1"]
    benchmark.sampling(benchmark.get_parser().parse_args(argv))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_benchmark_prints_one_json_line_of_figures(capsys):
    """The benchmark itself (figures, not a timed test): torch eager and captured, ONNX fp32 and
    int8 all ran, captured torch and fp32 ONNX gave eager PyTorch's tokens, and the counts of a
    decoding step are the sampler's: no wait, one ONNX run for the backbone and one a channel."""
    line = _benchmark_line(capsys)
    channels = tb.TokenBridgeConfig.preset("tiny").channels
    assert line["torch_waits_per_step"] == 0 and line["captured_tokens_equal"] is True
    assert line["onnx_runs_per_step"] == 1 + channels
    eager, step = line["torch_kernels_per_step"], line["torch_head_step_kernels"]
    assert eager > channels * step > 0
    assert line["torch_captured_launches_per_step"] == eager - channels * (step - 1)
    steps = line["num_iter"]
    assert line["torch_ms_per_step"] == pytest.approx(
        1e3 * line["images"] / line["torch_images_per_s"] / steps, rel=0.02)
    for name in ("torch_captured", "onnx", "onnx_int8"):  # the rate over PyTorch's
        ratio = line[f"{name}_images_per_s"] / line["torch_images_per_s"]
        assert line[f"{name}_speedup"] == pytest.approx(ratio, rel=0.05, abs=0.01), name
    assert line["head_speedup"] > 1                # C one-slot steps beat recomputing the prefix
    assert 0 < line["int8_tokens_differing"] < 0.5         # int8 moves some tokens, not most
    assert line["tokens_equal"] is True
    assert line["onnx_provider"] == "cpu" and line["torch_device"] == "cpu"
    assert not [key for key in line if key.endswith("_error")]


@pytest.mark.slow
def test_benchmark_reports_a_failed_runtime_and_times_the_others(capsys, monkeypatch):
    """An int8 export that fails its parity check costs the int8 figures only: the line still
    comes, names the failure, and carries the torch and fp32 ONNX figures."""
    strict = {**export.PRECISIONS["int8"], "tolerance": 1e-12}
    monkeypatch.setitem(export.PRECISIONS, "int8", strict)
    line = _benchmark_line(capsys)
    assert re.fullmatch(r"backbone\.onnx differs from PyTorch by \S+ "
                        r"\(tolerance 1e-12, .*\); not exported",
                        line["onnx_int8_error"]), line["onnx_int8_error"]
    int8_keys = {"onnx_int8_images_per_s", "onnx_int8_speedup", "int8_tokens_differing"}
    assert not int8_keys & line.keys()
    assert line["tokens_equal"] is True and line["onnx_provider"] == "cpu"
    # the fp32 figures are real timings: its speedup is its rate over PyTorch's
    ratio = line["onnx_images_per_s"] / line["torch_images_per_s"]
    assert line["onnx_speedup"] == pytest.approx(ratio, rel=0.05, abs=0.01)


# --- CUDA (skipped without it) ------------------------------------------------------------------

def _cuda_loads(run):
    return deploy.make_session(os.path.join(run.onnx, deploy.BACKBONE_FILE), "cuda")[1]


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="no CUDA build of onnxruntime")
def test_cuda_iobinding_matches_cpu(run, sampler):
    if not _cuda_loads(run):
        pytest.skip("onnxruntime's CUDA provider does not load here (no CUDA libraries / GPU)")
    gpu = deploy.OnnxSampler(run.onnx, "cuda")
    assert gpu.iobinding
    kw = dict(num_iter=6, cfg=2.0, cfg_mode="logits", seed=0)
    got, want = gpu.sample_tokens(LABELS, **kw), sampler.sample_tokens(LABELS, **kw)
    assert (got != want).mean() < 0.05  # GPU kernels round differently: rare near-tie flips allowed


# --- sampling in batches: resumable, shared between processes ------------------------------------

TORCH_RUNTIME = sample.torch_runtime


def counting_runtime(monkeypatch, calls, crash_at=None):
    """sample.torch_runtime whose sample() records each batch's index and can die in one batch."""
    real = TORCH_RUNTIME

    def runtime(args, device_id):
        *model, inner = real(args, device_id)

        def sample_batch(labels, num_iter, seed):
            calls.append(seed[1])
            if len(calls) == crash_at:
                raise KeyboardInterrupt("killed in the middle of a batch")
            return inner(labels, num_iter, seed)
        return (*model, sample_batch)
    monkeypatch.setattr(sample, "torch_runtime", runtime)


def test_batched_sampling_resumes_after_a_crash_and_equals_one_run(run, tmp_path, monkeypatch):
    argv = ["--run-dir", run.path, "--runtime", "torch", "--num-images", "8", "--batch-size", "2",
            "--num-iter", "4", "--cfg", "2", "--out", ""]
    _main(argv + ["--npz", str(tmp_path / "whole.npz")])
    calls, npz = [], tmp_path / "resumed.npz"
    counting_runtime(monkeypatch, calls, crash_at=3)
    with pytest.raises(KeyboardInterrupt):
        _main(argv + ["--npz", str(npz)])
    assert sorted(os.listdir(f"{npz}.parts")) == ["batch_000000.npz", "batch_000001.npz",
                                                 "job.lock", "settings.json"]
    with pytest.raises(ValueError, match=r"holds batches sampled with other settings \(cfg\)"):
        _main(argv[:-4] + ["--cfg", "3", "--out", "", "--npz", str(npz)])
    calls.clear()
    counting_runtime(monkeypatch, calls)
    _main(argv + ["--npz", str(npz)])
    assert calls == [2, 3]                                              # only the missing batches
    whole, resumed = np.load(tmp_path / "whole.npz"), np.load(npz)
    np.testing.assert_array_equal(whole["arr_0"], resumed["arr_0"])
    np.testing.assert_array_equal(resumed["labels"], np.arange(8) % 10)
    assert not os.path.exists(f"{npz}.parts")


def test_processes_share_the_batches_and_rank_0_writes_the_npz(run, tmp_path, monkeypatch):
    argv = ["--run-dir", run.path, "--runtime", "torch", "--num-images", "6", "--batch-size", "2",
            "--num-iter", "4", "--out", ""]
    _main(argv + ["--npz", str(tmp_path / "one.npz")])
    calls, npz = [], tmp_path / "two.npz"
    counting_runtime(monkeypatch, calls)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")                       # rank 0 starts first and waits for rank 1
    monkeypatch.setattr(jobs, "wait_for", lambda *a: (_ for _ in ()).throw(TimeoutError))
    with pytest.raises(TimeoutError):
        _main(argv + ["--npz", str(npz)])
    assert calls == [0, 2]                                              # rank 0: batches 0 and 2
    monkeypatch.setenv("RANK", "1")
    assert _main(argv + ["--npz", str(npz)]) is None and calls == [0, 2, 1] and not npz.exists()
    monkeypatch.undo()
    counting_runtime(monkeypatch, calls)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _main(argv + ["--npz", str(npz)])                     # rank 0 again: only the npz is left
    assert calls == [0, 2, 1]
    np.testing.assert_array_equal(np.load(tmp_path / "one.npz")["arr_0"], np.load(npz)["arr_0"])


def test_a_run_samples_with_its_tuned_settings_unless_told_otherwise(run, tmp_path, capsys):
    tuned = tmp_path / "tuned"
    shutil.copytree(run.path, tuned)
    settings = {"cfg": 3.0, "temperature": 0.8, "num_iter": 5, "fd": 1.0}
    (tuned / cli.SAMPLING_FILE).write_text(json.dumps(settings))
    argv = ["--run-dir", str(tuned), "--out", "", "--labels", "1,2"]
    tokens = _main(argv)
    assert "cfg 3.0, temperature 0.8, num_iter 5 (flags override)" in capsys.readouterr().out
    same_flags = ["--cfg", "3", "--temperature", "0.8", "--num-iter", "5"]
    np.testing.assert_array_equal(tokens, _main(argv + same_flags))
    assert not np.array_equal(tokens, _main(argv + ["--cfg", "1"]))           # a flag wins


# --- the paper's models at real size: dropout, external data, FID-scale sampling ------------------

def test_export_evaluates_a_model_trained_with_dropout(tmp_path, perturb):
    """Every ImageNet preset trains with dropout 0.1: the export must compare the graphs with the
    model in eval mode, whatever mode its tracing wrappers are in."""
    torch.manual_seed(0)
    model = perturb(tb.TokenBridge(tb.TokenBridgeConfig.preset("tiny", dropout=0.1)))
    path = save_run(tmp_path / "run", model, tiny_vae())
    info = export.export(path, verbose=False)
    assert max(info["max_abs_diff"].values()) < 1e-4


def _graph_files(folder):
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_graphs_over_the_limit_keep_their_weights_in_one_data_file(run, sampler, tmp_path,
                                                                   monkeypatch, precision):
    """TokenBridge-H's backbone holds 3 GB: over protobuf's 2 GB, so its weights go to one
    external data file beside the graph. The limit lowered to 0 sends every graph there."""
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / precision
    export.export(run.path, str(out), precision=precision, verbose=False)
    graphs = [deploy.BACKBONE_FILE, deploy.HEAD_FILE, deploy.VAE_FILE]
    data_files = [g + deploy.DATA_SUFFIX for g in graphs]
    assert _graph_files(out) == sorted(graphs + data_files + [deploy.META_FILE])
    assert (out / (deploy.BACKBONE_FILE + deploy.DATA_SUFFIX)).stat().st_size > 10_000
    loaded = deploy.OnnxSampler(str(out), "cpu", threads=1)
    tokens = loaded.sample_tokens(LABELS, num_iter=4, seed=0)
    if precision == "fp32":  # the same graphs as the in-file export: the same tokens
        np.testing.assert_array_equal(tokens, sampler.sample_tokens(LABELS, num_iter=4, seed=0))
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1 << 30)
    export.export(run.path, str(out), precision=precision, verbose=False)   # re-export in one file
    assert _graph_files(out) == sorted(graphs + [deploy.META_FILE])        # no stale data files


def test_a_failed_export_leaves_nothing_behind(run, tmp_path):
    fresh, earlier = tmp_path / "fresh", tmp_path / "earlier"
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export.export(run.path, str(fresh), tolerance=1e-12, verbose=False)
    assert not fresh.exists()
    shutil.copytree(run.onnx, earlier)
    before = {name: (earlier / name).read_bytes() for name in os.listdir(earlier)}
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export.export(run.path, str(earlier), tolerance=1e-12, verbose=False)
    assert {name: (earlier / name).read_bytes() for name in os.listdir(earlier)} == before


def test_export_says_up_front_when_memory_is_short(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "_available_memory", lambda: 1 << 20)
    export.export(run.path, str(tmp_path / "onnx"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("warning: exporting this model needs about") and "available" in first


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's memory map")
def test_sampling_reads_only_the_weights_it_needs(run):
    """Checkpoints are memory-mapped: the optimizer state of a training checkpoint (3x the weights
    for Adam) stays in the file when a run is sampled or exported."""
    path = os.path.realpath(os.path.join(run.path, runs.CHECKPOINT))
    tensor = next(iter(runs.load_checkpoint(run.path)["model"].values()))
    address = tensor.data_ptr()
    mapped = []
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
            if start <= address < end:
                mapped.append(line.split()[-1])
    assert mapped == [path]


def test_raw_weights_sample_on_request(run):
    raw, _ = runs.load_run(run.path, weights="raw")
    assert runs.fingerprint(raw) != run.info["fingerprint"]
    argv = ["--run-dir", run.path, "--labels", "1,2", "--num-iter", "4", "--out", ""]
    assert not np.array_equal(_main(argv), _main(argv + ["--weights", "raw"]))


def test_sampling_defaults_to_one_position_per_step(tmp_path, monkeypatch):
    """The paper samples ImageNet's 256 positions in 256 steps: the default is one per step."""
    torch.manual_seed(0)
    model = tb.TokenBridge(tb.TokenBridgeConfig.preset("tiny", image_size=36)).eval()   # 9x9 = 81
    path = save_run(tmp_path / "run", model)
    steps = []

    def sample_tokens(self, labels, num_iter, *args, **kwargs):
        steps.append(num_iter)
        return torch.zeros(len(labels), 81, 16, dtype=torch.long)

    monkeypatch.setattr(tb.TokenBridge, "sample_tokens", sample_tokens)
    _main(["--run-dir", path, "--labels", "1", "--out", ""])
    assert steps == [81]


def test_npz_and_tokens_stream_batch_by_batch_as_numpy_writes_them(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels, tokens = np.arange(10), rng.integers(0, 64, (10, 4, 16))
    with files.npz_writer(str(tmp_path / "s.npz"), 10) as add, \
            files.npy_writer(str(tmp_path / "t.npy"), 10) as write:
        for start in range(0, 10, 4):
            add(images[start:start + 4], labels[start:start + 4])
            write(tokens[start:start + 4])
    np.savez(tmp_path / "whole.npz", arr_0=images, labels=labels)
    got, want = np.load(tmp_path / "s.npz"), np.load(tmp_path / "whole.npz")
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
        np.testing.assert_array_equal(got[key], want[key])
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), tokens)
    with pytest.raises(KeyboardInterrupt):           # killed half-way: no file, no temp file
        with files.npz_writer(str(tmp_path / "k.npz"), 10) as add:
            add(images[:4], labels[:4])
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["s.npz", "t.npy", "whole.npz"]


def _enter_parts(folder, settings):
    with jobs.Parts(folder, settings):
        pass


def test_only_rank_0_writes_the_settings_of_a_parts_folder(tmp_path, monkeypatch):
    import threading
    written = []
    real = files.write_atomic

    def write_atomic(path, write):
        written.append(path)
        real(path, write)

    monkeypatch.setattr(jobs, "write_atomic", write_atomic)
    folder, settings = str(tmp_path / "x.npz.parts"), {"seed": 0}
    monkeypatch.setenv("RANK", "1")
    other = threading.Thread(target=_enter_parts, args=(folder, settings))   # waits for rank 0
    other.start()
    other.join(0.5)
    assert other.is_alive() and written == []
    monkeypatch.setenv("RANK", "0")
    _enter_parts(folder, settings)
    other.join(5)
    assert not other.is_alive() and written == [os.path.join(folder, "settings.json")]


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from lib import jobs
with jobs.Parts({folder!r}, {{"seed": 0}}):
    print("LOCKED", flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks")
def test_one_sampling_job_at_a_time_writes_a_parts_folder(tmp_path):
    """A second job beside a running one stops with the holder's pid; once the holder is killed
    (SIGKILL: no clean-up of its own), its lock is taken over."""
    folder = str(tmp_path / "x.npz.parts")
    code = HOLD_LOCK.format(root=str(ROOT), folder=folder)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        message = rf"being written by another process \(pid {holder.pid}\)"
        with pytest.raises(ValueError, match=message):
            _enter_parts(folder, {"seed": 0})
    finally:
        holder.kill()
        holder.wait()
    _enter_parts(folder, {"seed": 0})


def _torchrun_parser():
    from torch.distributed.run import get_args_parser
    parser = get_args_parser()
    parser.exit = parser.error = lambda *a, **k: (_ for _ in ()).throw(ValueError(a))
    return parser


@pytest.mark.parametrize("script", ["sample.py", "train.py"])
def test_every_flag_passes_through_torchrun(script):
    """torchrun parses the whole command line and stops at an abbreviation of its own options
    (`--run` of --run-path): every flag of the scripts run under torchrun must pass through."""
    module = __import__(script[:-3])
    flags = [option for action in module.get_parser()._actions
             for option in action.option_strings if option.startswith("--")]
    parser = _torchrun_parser()
    for flag in flags:
        args = parser.parse_args(["--nproc-per-node", "2", script, flag, "x"])
        assert args.training_script_args == [flag, "x"], flag
    with pytest.raises(ValueError):
        parser.parse_args(["--nproc-per-node", "2", script, "--run", "x"])   # the check is live


@pytest.mark.slow
def test_torchrun_samples_fid_style_as_one_process_does(run, tmp_path):
    argv = ["--run-dir", run.path, "--num-images", "6", "--batch-size", "2", "--num-iter", "4",
            "--cfg", "2", "--out", "", "--device", "cpu", "--threads", "1"]
    sample.main(sample.get_parser().parse_args(argv + ["--npz", str(tmp_path / "one.npz")]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    command = torchrun + ["sample.py", *argv, "--npz", str(tmp_path / "two.npz")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    np.testing.assert_array_equal(one["labels"], two["labels"])
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "two.npz"]


LAUNCHER = """
import os, subprocess, sys, time
worker = '''
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
from lib import jobs
slow = lambda labels, seed: (time.sleep(0.2), (np.zeros((1, 1)), np.zeros((1, 1, 1, 3))))[1]
jobs.sample_in_batches(slow, np.arange(300), 1, 0)
'''
env = dict(os.environ, TORCHELASTIC_RUN_ID="test")
child = subprocess.Popen([sys.executable, "-c", worker], env=env, start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_rank_stops_when_its_launcher_is_killed(tmp_path):
    """torchrun starts its workers in sessions of their own: a kill of the launcher must not leave
    a rank sampling (and writing) on its own."""
    import signal
    import time
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER.format(root=str(ROOT))],
                                stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    time.sleep(3)                                       # the worker is sampling
    assert _alive(worker)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 20
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(worker)
