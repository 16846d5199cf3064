"""tools/reproduce.py against naive truths: token entropy and PSNR vs numpy, held_out vs the rows it
must read from a latent cache, the tables' means and spreads vs a recomputation from the runs,
each (run, sampling) scored once, the sign verdicts, and the training commands. Fake run folders:
perturbed digits models and a tiny VAE stand in for trained runs."""
import json
import math

import numpy as np
import pytest
import torch

from tools import reproduce


def naive_entropy(tokens, levels):
    out = []
    for c in range(tokens.shape[-1]):
        counts = np.bincount(tokens[..., c].ravel(), minlength=levels)
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * np.log2(p)).sum()))
    return np.array(out)


def test_token_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    levels = 16
    tokens = rng.integers(0, levels, size=(7, 5, 3))
    tokens[..., 1] = 4                                   # a constant channel: 0 bits
    tokens[..., 2] = rng.integers(0, 2, size=(7, 5))     # two symbols: about 1 bit
    got = reproduce.token_entropy(torch.from_numpy(tokens), levels).numpy()
    np.testing.assert_allclose(got, naive_entropy(tokens, levels), atol=1e-9)
    assert got[1] == 0.0


def test_gaussian_latents_fill_equiprobable_bins():
    """On Gaussian data the calibrated quantizer's tokens have entropy close to log2(levels)."""
    torch.manual_seed(0)
    q = reproduce.tb.GaussianQuantizer(16, 3.0, 2)
    x = torch.randn(20000, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -3.0])
    q.calibrate(x)
    h = reproduce.token_entropy(q.quantize(x), 16)
    assert (h > math.log2(16) - 0.02).all() and (h <= 4.0 + 1e-9).all()


def test_held_out_reads_the_validation_rows_of_the_latent_cache(tmp_path):
    """held_out takes train.py's split and reads only those rows of the memory-mapped cache."""
    n = 5000
    moments = np.zeros((n, 1, 2, 1, 1, 1), np.float32)           # (N, flips, mean|std, C, h, w)
    moments[:, 0, 0] = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)  # mean of image i is i
    npy, meta = reproduce.data.cache_paths(tmp_path)
    np.save(npy, moments)
    # no header yet: not a valid cache
    with pytest.raises(ValueError, match="no complete latent cache"):
        reproduce.held_out(tmp_path)
    header = {"key": {}, "shape": list(moments.shape), "labels": torch.arange(n) % 10,
              "unreadable": torch.zeros(0, dtype=torch.long)}
    reproduce.runs.atomic_save(header, meta)
    images, modes, labels = reproduce.held_out(tmp_path)
    _, val_idx = reproduce.data.split_validation(n, 500)
    assert images.shape == (500, 32, 32, 3) and torch.equal(modes.flatten().long(), val_idx)
    assert torch.equal(labels, val_idx % 10)


def test_guidance_plot_draws_the_coarse_round_and_marks_the_choice(tmp_path):
    """The curves are the coarse round's rows (one sample count, the most steps), never the
    finalists' rescoring on more samples nor the fewer-step rows."""
    def row(cfg, temperature, n=250, steps=16):
        return {"cfg": cfg, "temperature": temperature, "num_iter": steps, "n": n,
                "fd": 40 - 5 * cfg + 10 * temperature, "class_accuracy": 0.8 + 0.04 * cfg}
    coarse = [row(c, t) for c in (1.0, 2.0, 3.0, 4.0) for t in (0.7, 1.0)]
    final = [row(4.0, 0.7, n=1000), row(3.0, 0.7, n=1000), row(4.0, 0.7, n=1000, steps=4)]
    sweep = {**final[-1], "sweep": coarse + final}
    curves, chosen = reproduce.guidance_curves(sweep)
    assert list(curves) == [0.7, 1.0]
    assert [r["cfg"] for r in curves[0.7]] == [1.0, 2.0, 3.0, 4.0]
    assert all(r["n"] == 250 and r["num_iter"] == 16 for c in curves.values() for r in c)
    assert chosen is coarse[6]                  # cfg 4, temperature 0.7, 250 samples
    reproduce.guidance_plot(sweep, tmp_path / "guidance.png")
    from PIL import Image
    assert Image.open(tmp_path / "guidance.png").size == (675, 252)   # 7.5 x 2.8 inches at 90 dpi
    args = reproduce.get_parser().parse_args(["--runs", str(tmp_path)])
    with pytest.raises(ValueError, match="sampling.json is missing"):
        reproduce.part_demo(args, tmp_path, {})


# --- fake runs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_runs():
    """(name -> (model, vae, tuned settings), 12 held-out latents): perturbed digits models and
    one tiny VAE."""
    from lib import data
    torch.manual_seed(0)
    vae = data.build_small_vae(8, 16, width=8).eval()
    modes = torch.randn(12, 16, 4, 4)
    models = {}
    for i, name in enumerate(reproduce.RUNS):
        levels = 16 if name.startswith("levels16") else 64
        config = reproduce.tb.TokenBridgeConfig.preset("digits", levels=levels)
        model = reproduce.tb.TokenBridge(config).calibrate(modes)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        models[name] = (model.eval(), vae, {"cfg": 1.0 + i % 3, "temperature": 1.0, "num_iter": 4})
    return models, modes


@pytest.fixture
def patched(fake_runs, trained, monkeypatch, tmp_path):
    """reproduce on the fake runs, all finished but `missing`; counts every sample_scores call."""
    models, modes = fake_runs
    calls, missing = [], set()
    labels = torch.arange(len(modes)) % 10
    monkeypatch.setattr(reproduce, "load", lambda run: models[run.name])
    monkeypatch.setattr(reproduce, "held_out", lambda run: (None, modes, labels))
    monkeypatch.setattr(reproduce, "is_finished", lambda run: run.name not in missing)
    monkeypatch.setattr(reproduce.digit_metrics, "load_feature_net", lambda *a, **k: trained[:2])
    real_scores = reproduce.digit_metrics.sample_scores

    def counted(model, *args, **kwargs):
        calls.append((id(model), tuple(sorted(kwargs.items()))))
        return real_scores(model, *args, **kwargs)
    monkeypatch.setattr(reproduce.digit_metrics, "sample_scores", counted)
    return calls, missing


@pytest.mark.slow
def test_tables_are_the_mean_and_spread_of_their_runs_each_scored_once(patched, tmp_path, capsys):
    calls, missing = patched
    missing.add("ar-208ep")
    argv = ["--runs", str(tmp_path), "--out", str(tmp_path / "docs"),
            "--parts", "generation,budget", "--samples", "10"]
    results = reproduce.main(reproduce.get_parser().parse_args(argv))
    assert "make it with: train.py --out" in capsys.readouterr().out  # the skipped row says how
    assert [s["label"] for s in results["budget"]] == [r.label for r in reproduce.BUDGET[:-1]]
    assert len(calls) == len(set(calls))                              # no (model, settings) twice
    kept = [row for row in reproduce.GENERATION + reproduce.BUDGET if not set(row.runs) & missing]
    scored = {(run, row.sampling) for row in kept for run in row.runs}
    assert len(calls) == 2 * len(scored)                              # tuned + unguided
    for summary in results["generation"] + results["budget"]:
        fds = [r["tuned"]["fd"] for r in summary["per_run"]]
        assert summary["tuned"]["fd"] == pytest.approx([np.mean(fds), (max(fds) - min(fds)) / 2])
        assert [r["tuned"]["n"] for r in summary["per_run"]] == [10] * len(fds)
        tuned = [reproduce.load(tmp_path / run)[2] for run in summary["runs"]]
        assert summary["settings"] == tuned
    assert all("sign" in s for s in results["generation"][1:])
    assert results["generation"][-1]["per_run"][0]["tuned"]["position_order"] == "confidence"
    table = (tmp_path / "docs" / "results.md").read_text()
    assert all(row.label in table for row in reproduce.GENERATION)
    saved = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert saved["generation"][1]["label"] == "parallel head"
    assert (tmp_path / "docs" / "ablation_samples.png").is_file()


def test_channel_temperatures_sample_each_slot_at_its_own(fake_runs):
    model = fake_runs[0]["demo"][0]
    labels = torch.arange(6) % 10
    plain = model.sample_tokens(labels, num_iter=4, temperature=0.7, seed=3)
    # generate's own temperature is ignored
    with reproduce.channel_temperatures((0.7,) * 16):
        assert torch.equal(model.sample_tokens(labels, num_iter=4, temperature=5.0, seed=3), plain)

    # one step: every position from one context
    one_step = model.sample_tokens(labels, num_iter=1, temperature=0.7, seed=3)
    with reproduce.channel_temperatures((0.7,) * 15 + (0.0,)):      # the last slot greedy
        last_greedy = model.sample_tokens(labels, num_iter=1, temperature=0.7, seed=3)
    assert reproduce.tb.sample_from_logits.__name__ == "sample_from_logits"  # restored
    first, last = model.quantizer.order[:1], model.quantizer.order[-1]
    assert torch.equal(last_greedy[..., first], one_step[..., first])
    assert not torch.equal(last_greedy[..., last], one_step[..., last])


@pytest.mark.slow
def test_channels_part_per_slot_nll_and_schedules(patched, fake_runs, tmp_path):
    argv = ["--runs", str(tmp_path), "--out", str(tmp_path / "docs"),
            "--parts", "channels", "--samples", "10"]
    results = reproduce.main(reproduce.get_parser().parse_args(argv))
    assert [s["label"] for s in results["channels"]] == [r.label for r in reproduce.CHANNEL_ROWS]
    _, modes = fake_runs
    for summary in results["channels"]:
        for r in summary["per_run"]:
            model = fake_runs[0][r["run"]][0]
            overall = reproduce.validation_bits(model, modes, torch.arange(len(modes)) % 10)
            assert np.mean(r["bits"]) == pytest.approx(overall)    # slots average to the NLL
        assert set(summary["schedules"]) == set(reproduce.SCHEDULES)
    assert "| 16 | mean |" in (tmp_path / "docs" / "results.md").read_text()


def test_sign_verdict_needs_the_runs_ranges_apart():
    def summary(*fds):
        return {"per_run": [{"tuned": {"fd": f}} for f in fds]}
    base = summary(20.0, 22.0)
    assert reproduce.sign_verdict(base, summary(23.0, 30.0), +1) == "agrees"
    assert reproduce.sign_verdict(base, summary(15.0, 19.0), +1) == "reversed"
    assert reproduce.sign_verdict(base, summary(21.0, 30.0), +1).startswith("not separated")
    assert reproduce.pm((0.9712, 0.004), percent=True) == "97.1% ± 0.4"
    assert reproduce.pm((3.0, 0.0)) == "3.0"


def test_sign_verdicts_pair_each_row_with_its_own_runs(monkeypatch, tmp_path):
    """With a middle row's runs missing, every later row keeps its own paper_sign."""
    fds = {"demo": 20.0, "ar-s1": 22.0, "default-order": 30.0, "default-order-s1": 31.0,
           "levels16": 30.0, "levels16-s1": 32.0}

    def row_scores(args, row, net, cache):      # the confidence row samples better than the demo
        shift = -10.0 if row.sampling else 0.0
        per_run = [{"tuned": {"fd": fds[run] + shift}} for run in row.runs]
        return {"label": row.label, "per_run": per_run}
    monkeypatch.setattr(reproduce, "row_scores", row_scores)
    monkeypatch.setattr(reproduce, "is_finished", lambda run: run.name in fds)
    results = {}
    args = reproduce.get_parser().parse_args(["--runs", str(tmp_path)])
    reproduce.part_table(args, results, None, {}, "generation", reproduce.GENERATION)
    signs = {s["label"]: s.get("sign") for s in results["generation"]}
    assert list(signs.values()) == [None, "agrees", "agrees", "ours better"], signs


@pytest.mark.slow
def test_reconstruction_rows_against_numpy(fake_runs, trained):
    models, modes = fake_runs
    model, vae, _ = models["demo"]
    images = reproduce.data.decode(vae, modes.flip(0))              # some other images
    labels = torch.arange(12) % 10
    rows = reproduce.reconstruction_rows(model, vae, images, modes, labels, trained[0])
    assert [r["levels"] for r in rows] == list(reproduce.LEVELS)
    for row in rows:
        decoded = reproduce.data.decode_levels(vae, model.quantizer, modes, row["levels"])
        error = decoded.astype(np.float64) / 255 - images.astype(np.float64) / 255
        mse = np.mean(error ** 2)
        assert row["mse"] == pytest.approx(mse, rel=1e-6)
        assert row["psnr"] == pytest.approx(-10 * np.log10(mse), rel=1e-6)
        if row["levels"] != "continuous":
            quantizer = model.quantizer.with_levels(row["levels"])
            tokens = quantizer.quantize(reproduce.tb.patchify(modes)).numpy()
            assert row["entropy_mean"] == pytest.approx(naive_entropy(tokens, row["levels"]).mean())

    # the continuous decoding against itself: no distance
    continuous = reproduce.data.decode_levels(vae, model.quantizer, modes, "continuous")
    same = reproduce.reconstruction_rows(model, vae, continuous, modes, labels, trained[0])
    assert same[0]["mse"] == 0 and same[0]["fd"] == pytest.approx(0, abs=1e-2)


def test_train_missing_runs_the_demo_first_with_the_commands_of_runs(monkeypatch, tmp_path):
    commands = []

    def run(command, check):
        commands.append(command)
    monkeypatch.setattr(reproduce.subprocess, "run", run)
    (tmp_path / "parallel").mkdir()
    for f in (reproduce.runs.CHECKPOINT, reproduce.SAMPLING_FILE, "metrics.json"):
        (tmp_path / "parallel" / f).write_text("{}")                # finished: not retrained
    reproduce.train_missing(tmp_path, ["levels16", "parallel", "demo", "levels16"])
    demo_vae = str(tmp_path / "demo" / "vae")
    assert [c[1:] for c in commands] == [
        ["train.py", "--out", str(tmp_path / "demo")],
        ["train.py", "--out", str(tmp_path / "levels16"), "--vae", demo_vae, "--levels", "16"]]


def test_bad_parts_and_sample_counts_are_one_line_errors(tmp_path):
    cases = [(["--parts", "generation,nll"], "unknown --parts nll"),
             (["--samples", "3"], "--samples"),
             (["--parts", "reconstruction", "--runs", str(tmp_path)],
              "not a finished run.*--train-missing")]
    for argv, match in cases:
        with pytest.raises(ValueError, match=match):
            reproduce.main(reproduce.get_parser().parse_args(["--out", str(tmp_path), *argv]))
