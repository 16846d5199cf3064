"""Tests of the core (tokenbridge.py), each against an independent truth: scipy for the
quantizer tables, numpy's FFT for the spectra, a naive re-computation for the fast paths."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import tokenbridge as tb

DATA = Path(__file__).parent / "data"


def tiny(**overrides):
    torch.manual_seed(0)
    return tb.TokenBridge(tb.TokenBridgeConfig.preset("tiny", **overrides)).eval()


# --- 1. quantizer ------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [16, 64])
def test_tables_match_scipy(levels):
    q = tb.GaussianQuantizer(levels=levels, std_range=3.0)
    b = np.clip(scipy.stats.norm.ppf(np.arange(levels + 1) / levels), -3, 3)
    centers = scipy.stats.truncnorm(b[:-1], b[1:]).mean()
    assert q.boundaries.shape == (levels + 1,) and q.centers.shape == (levels,)
    np.testing.assert_allclose(q.boundaries.numpy(), b, atol=1e-6)
    np.testing.assert_allclose(q.centers.numpy(), centers, atol=1e-6)


def test_tables_are_finite_when_the_clamp_empties_the_end_bins():
    """At 1024 levels the end bins lie beyond ±3σ (Φ(-3) > 1/1024): the clamp leaves them
    empty."""
    q = tb.GaussianQuantizer(levels=1024, std_range=3.0)
    b = q.boundaries.numpy().astype(np.float64)
    empty = b[1:] == b[:-1]
    assert empty[0] and empty[-1] and torch.isfinite(q.centers).all()
    assert (q.centers.diff() >= 0).all() and q.centers.abs().max() <= 3.0
    expected = scipy.stats.truncnorm(b[:-1][~empty], b[1:][~empty]).mean()
    np.testing.assert_allclose(q.centers.numpy()[~empty], expected, atol=1e-5)
    assert q.centers[0] == -3.0 and q.centers[-1] == 3.0      # an empty bin is its edge
    x = torch.randn(1000, 16) * 2
    error = q.dequantize(q.quantize(x)) - x.clamp(-3, 3)      # the clamp edge decodes to itself
    assert error.abs().max() < 0.1


def test_bins_are_equiprobable_after_calibration():
    levels, n = 64, 100_000
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([5.0, -2.0, 0.0, 0.3]), torch.tensor([0.1, 3.0, 1.0, 0.02])
    x = mean + std * torch.randn(n, 4, generator=g)
    q = tb.GaussianQuantizer(levels, channels=4).calibrate(x)
    np.testing.assert_allclose(q.mean.numpy(), x.mean(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(q.std.numpy(), x.std(0).numpy(), rtol=1e-4)
    idx = q.quantize(x)
    for c in range(4):
        share = torch.bincount(idx[:, c], minlength=levels).double() / n
        error = (share - 1 / levels).abs().max()
        assert error < 0.2 / levels, f"channel {c} bins are not equiprobable"


def test_quantize_is_the_bin_lookup():
    q = tb.GaussianQuantizer(16, channels=3).calibrate(torch.randn(1000, 3) * 2 + 1)
    x = torch.randn(5000, 3) * 3 + 1
    u = ((x - q.mean) / q.std).clamp(-3, 3)
    naive = (u.unsqueeze(-1) >= q.boundaries[1:-1]).sum(-1)          # b_k <= u counts bins passed
    assert torch.equal(q.quantize(x), naive)
    unit = tb.GaussianQuantizer(16, channels=1)                      # mean 0, std 1: u = x exactly
    inner = unit.boundaries[1:-1, None]                              # b_1 .. b_15, one per row
    assert torch.equal(unit.quantize(inner)[:, 0], torch.arange(1, 16))      # b_k is in bin k


def test_dequantize_inverts_quantize():
    x = torch.randn(500, 4) * torch.tensor([1, 2, 3, 4.0])
    q = tb.GaussianQuantizer(64, channels=4).calibrate(x)
    i = torch.arange(64).unsqueeze(-1).expand(-1, 4)
    assert torch.equal(q.quantize(q.dequantize(i)), i)
    expected = q.centers * q.std[1] + q.mean[1]                      # channel 1's bin means
    np.testing.assert_allclose(q.dequantize(i)[:, 1].numpy(), expected.numpy())


# --- 2. frequency order ------------------------------------------------------------------------

def test_low_frequency_share_matches_numpy():
    x = torch.randn(2500, 3, 8, 6)                                   # several chunks
    x_np = x.numpy().astype(np.float64)
    x_np = x_np - x_np.mean(axis=(-2, -1), keepdims=True)
    power = (np.abs(np.fft.fft2(x_np)) ** 2).sum(0)
    fy, fx = np.meshgrid(np.fft.fftfreq(8), np.fft.fftfreq(6), indexing="ij")
    low = np.hypot(fy, fx) <= 0.25
    expected = (power * low).sum((1, 2)) / power.sum((1, 2))
    np.testing.assert_allclose(tb.low_frequency_share(x).numpy(), expected, rtol=1e-10)


def test_frequency_order_recovers_a_known_ranking():
    g = torch.Generator().manual_seed(0)
    n, c, s = 32, 6, 16
    smoothness = torch.randperm(c, generator=g).double() / (c - 1)    # 1 = all low frequency
    noise = torch.randn(n, c, s, s, generator=g, dtype=torch.float64)
    kernel = torch.ones(1, 1, 5, 5, dtype=torch.float64) / 25       # blur: a low-pass field
    smooth = torch.nn.functional.conv2d(noise.view(-1, 1, s, s), kernel, padding=2).view(n, c, s, s)
    smooth = smooth / smooth.std()
    x = smoothness.view(1, c, 1, 1) * smooth + (1 - smoothness.view(1, c, 1, 1)) * noise.roll(1, 0)
    assert torch.equal(tb.frequency_order(x), torch.argsort(smoothness, descending=True))


def test_calibrate_sets_frequency_or_default_order():
    lat = torch.randn(16, 16, 8, 8)
    lat[:, 3] = torch.linspace(-1, 1, 8).view(1, 8, 1)               # channel 3 is a smooth ramp
    assert tiny().calibrate(lat).quantizer.order[0] == 3
    assert torch.equal(tiny(order="default").calibrate(lat).quantizer.order, torch.arange(16))


# --- 3. configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("preset, official", [("large", "tokenbridge_large"),
                                              ("huge", "tokenbridge_huge"),
                                              ("bench-s", "tokenbridge_small_bench")])
def test_preset_parameter_counts_match_the_official_models(preset, official):
    shapes = json.loads((DATA / "official_state_dict_shapes.json").read_text())[official]["shapes"]
    buffers = {"channel_mask", "reconstruction_values", "boundaries"}
    expected = sum(math.prod(s) for k, s in shapes.items() if k not in buffers)
    with torch.device("meta"):
        model = tb.TokenBridge(tb.TokenBridgeConfig.preset(preset))
    assert model.num_params() == expected
    if preset == "large":
        assert round(expected / 1e6, 1) == 486.9


def test_config_round_trips_through_a_plain_dict():
    cfg = tb.TokenBridgeConfig.preset("bench-s", head="parallel")
    assert tb.TokenBridgeConfig.from_dict(cfg.to_dict()) == cfg


# --- 4-5. backbone -----------------------------------------------------------------------------

def naive_backbone(backbone, values, mask, labels):
    """Image by image, with plain boolean indexing: the reference for the batched gather/scatter."""
    S, out = backbone.buffer_size, []
    for v, m, label in zip(values, mask, labels, strict=True):
        buffer = backbone.class_embedding(label[None]).expand(S, -1)
        x = torch.cat([buffer, backbone.z_proj(v)]) + backbone.encoder_pos_embed[0]
        x = backbone.z_proj_ln(x)
        visible = torch.cat([torch.ones(S, dtype=torch.bool), ~m])
        h = x[visible][None]
        for block in backbone.encoder_blocks:
            h = block(h)
        d = backbone.mask_token[0].repeat(len(visible), 1)
        d[visible] = backbone.decoder_embed(backbone.encoder_norm(h))[0]
        d = d[None] + backbone.decoder_pos_embed
        for block in backbone.decoder_blocks:
            d = block(d)
        out.append(backbone.decoder_norm(d)[0, S:] + backbone.output_pos_embed[0])
    return torch.stack(out)


def test_backbone_batched_gather_equals_image_by_image(perturb):
    model = perturb(tiny())
    values = torch.randn(3, 64, 16)
    mask = torch.rand(3, 64).argsort(-1) < 40                        # 40 masked in every image
    labels = torch.tensor([1, 10, 4])                                # 10 = the null class
    naive = naive_backbone(model.backbone, values, mask, labels)
    torch.testing.assert_close(model.backbone(values, mask, labels), naive, atol=1e-5, rtol=1e-5)


def test_backbone_refuses_unequal_mask_counts():
    model = tiny()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :5] = True
    with pytest.raises(ValueError, match="same number of masked positions"):
        model.backbone(torch.randn(2, 64, 16), mask, torch.tensor([0, 1]))


def test_masked_positions_carry_no_information(perturb):
    model = perturb(tiny())
    values, mask = torch.randn(2, 64, 16), torch.rand(2, 64).argsort(-1) < 32
    other = torch.where(mask.unsqueeze(-1), torch.randn(2, 64, 16), values)
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(model.backbone(values, mask, labels),
                               model.backbone(other, mask, labels))


# --- 6. AR head --------------------------------------------------------------------------------

def stepwise_logits(head, cond, tokens):
    cache, prev, out = head.empty_cache(len(cond)), torch.zeros(len(cond), dtype=torch.long), []
    for t in range(head.channels):
        logits, cache = head.step(cond, prev, torch.tensor(t), cache)
        out.append(logits)
        prev = tokens[:, t]
    return torch.stack(out, 1)


@pytest.mark.parametrize("head", ["ar", "parallel"])
def test_cached_head_equals_teacher_forced(head, perturb):
    model = perturb(tiny(head=head))
    cond, tokens = torch.randn(10, 64), torch.randint(0, 64, (10, 16))
    forced = model.head(cond, tokens[:, :-1])                        # (10, 16, 64)
    stepwise = stepwise_logits(model.head, cond, tokens)
    torch.testing.assert_close(stepwise, forced, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.head(cond, tokens[:, :5]), forced[:, :6], atol=1e-5, rtol=1e-5)


def test_ar_head_uses_previous_channels_and_parallel_head_ignores_them(perturb):
    cond, a, b = torch.randn(4, 64), torch.randint(0, 64, (4, 15)), torch.randint(0, 64, (4, 15))
    ar, parallel = perturb(tiny()), perturb(tiny(head="parallel"))
    assert not torch.allclose(ar.head(cond, a)[:, 1:], ar.head(cond, b)[:, 1:])
    torch.testing.assert_close(parallel.head(cond, a), parallel.head(cond, b))


def test_greedy_channel_sampling_follows_the_teacher_forced_argmax(perturb):
    model = perturb(tiny()).calibrate(torch.randn(8, 16, 8, 8))
    model.quantizer.order.copy_(torch.randperm(16))
    cond = torch.randn(6, 64)
    tokens, _ = model._sample_channels(cond, torch.rand(6, 16), temperature=0)
    in_generation_order = tokens[:, model.quantizer.order]
    greedy = model.head(cond, in_generation_order[:, :-1]).argmax(-1)
    assert torch.equal(greedy, in_generation_order)


def test_a_captured_sampler_gives_the_eager_tokens(perturb):
    """capture_sampler: the channel step traced by torch.compile as one graph (fullgraph: a
    graph break would raise) and replayed with the same operators: the same tokens."""
    from torch._dynamo import reset
    from torch._dynamo.utils import counters
    model = perturb(tiny()).calibrate(torch.randn(8, 16, 8, 8)).eval()
    kw = dict(num_iter=4, cfg=2.0, temperature=0.9, seed=1)
    orders = ("random", "confidence")
    eager = [model.sample_tokens([0, 1, 10], position_order=order, **kw) for order in orders]
    reset()
    counters.clear()
    try:
        model.capture_sampler()
        captured = [model.sample_tokens([0, 1, 10], position_order=order, **kw)
                    for order in orders]
        assert counters["stats"]["unique_graphs"] >= 1
    finally:
        reset()
    assert all(torch.equal(a, b) for a, b in zip(eager, captured, strict=True))


def test_sampling_decodes_one_position_per_step_by_default():
    """The paper's setting (256 steps for 256 positions), and no error on a model of fewer
    positions than some fixed default (the digits: 16)."""
    model = tb.TokenBridge(tb.TokenBridgeConfig.preset("digits")).eval()
    steps = []
    model.sample_tokens([1], on_step=lambda s, tokens, mask: steps.append(int(mask.sum())))
    assert steps == list(range(15, -1, -1))


def test_inverse_cdf_sampling_matches_numpy():
    logits, u = torch.randn(500, 64) * 3, torch.rand(500)
    token, logp = tb.sample_from_logits(logits, u, temperature=0.7)
    p = scipy.special.softmax(logits.double().numpy() / 0.7, axis=-1)
    expected = np.array([np.searchsorted(np.cumsum(row), x, side="right")
                         for row, x in zip(p, u.double().numpy(), strict=True)])
    assert (token.numpy() != expected).sum() <= 1                   # a float near-tie may flip one
    chosen = p[np.arange(500), token.numpy()]
    np.testing.assert_allclose(logp.numpy(), np.log(chosen), rtol=1e-4, atol=1e-6)


# --- 7. training and sampling ------------------------------------------------------------------

def test_loss_falls_on_a_tiny_fixed_dataset():
    torch.manual_seed(0)
    model = tb.TokenBridge(tb.TokenBridgeConfig.preset("tiny"))
    latents, labels = torch.randn(4, 16, 8, 8), torch.arange(4)
    model.calibrate(latents)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = model(latents, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and abs(losses[0] - math.log(64)) < 1.0  # starts near uniform
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_loss_is_the_mean_cross_entropy_over_position_channel_pairs(perturb):
    model = perturb(tiny()).train().calibrate(torch.randn(8, 16, 8, 8))
    latents, labels = torch.randn(3, 16, 8, 8), torch.tensor([1, 5, 9])
    torch.manual_seed(7)
    loss = model(latents, labels)
    torch.manual_seed(7)  # the same draws, in forward's order: the mask, then the label drop
    mask = model.random_mask(3, latents.device)
    drop = torch.rand(3) < model.config.label_drop_prob
    dropped = torch.where(drop, model.config.num_classes, labels)
    logits, targets = model.token_logits(latents, dropped, mask)     # (M, C, K), (M, C)
    logp = logits.double().log_softmax(-1)
    pairs = [-logp[m, c, targets[m, c]] for m in range(len(targets)) for c in range(16)]
    assert len(pairs) == int(mask.sum()) * 16
    torch.testing.assert_close(loss.double(), torch.stack(pairs).mean(), rtol=1e-6, atol=1e-6)


def test_guidance_weight_schedules():
    def w(left, **kw):
        return tb.guidance_weight(3.1, 256, left, **kw)

    assert w(256) == 1.0 and w(128) == pytest.approx(2.05) and w(0) == 3.1  # linear: 1 -> cfg
    # the official clamp ends at 3.0918 and acts only when no position is left
    assert w(0, official_clamp=True) == pytest.approx(1 + 2.1 * 255 / 256)
    assert w(7, official_clamp=True) == w(7)
    assert all(w(left, schedule="constant") == 3.1 for left in (256, 100, 0))


def test_cfg_schedule_and_unconditional_labels_reach_the_sampler(perturb):
    model = perturb(tiny()).calibrate(torch.randn(8, 16, 8, 8))
    kw = dict(num_iter=4, cfg=3.0, seed=0)
    linear = model.sample_tokens([1, 2], **kw)
    assert not torch.equal(linear, model.sample_tokens([1, 2], cfg_schedule="constant", **kw))
    # unconditional: guidance changes nothing
    null = [model.config.num_classes] * 2
    uncond = model.sample_tokens(null, **kw)
    assert torch.equal(uncond, model.sample_tokens(null, **{**kw, "cfg": 5.0}))
    assert not torch.equal(uncond, linear)
    # training has no null class
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        model(torch.randn(2, 16, 8, 8), torch.tensor(null))


def test_mask_schedule_is_the_cosine_schedule():
    for n, steps in [(64, 1), (64, 16), (64, 64), (256, 64)]:
        left = tb.mask_schedule(n, steps)
        assert left[-1] == 0 and len(left) == steps
        before = [n] + left[:-1]
        # at least one position per step
        assert all(a > b for a, b in zip(before, left, strict=True))
        for s in range(steps - 1):
            cosine = int(np.floor(n * np.cos(np.pi / 2 * (s + 1) / steps)))
            assert left[s] == max(1, min(before[s] - 1, cosine))


def test_random_mask_follows_the_truncated_normal_ratio():
    model = tiny()
    masks = [model.random_mask(3, "cpu") for _ in range(300)]
    counts = np.array([int(m[0].sum()) for m in masks])
    assert all(bool((m.sum(-1) == m[0].sum()).all()) for m in masks)      # one ratio per batch
    assert counts.min() >= math.ceil(64 * 0.7) and counts.max() <= 64
    expected = scipy.stats.truncnorm((0.7 - 1) / 0.25, 0, loc=1, scale=0.25).mean()
    assert 0 <= counts.mean() / 64 - expected <= 1 / 64 + 0.015           # ceil adds < 1/64


@pytest.mark.parametrize("kw", [dict(), dict(cfg=3.0), dict(cfg=3.0, cfg_mode="logits"),
                                dict(position_order="confidence", cfg=2.0)])
def test_generate_is_deterministic_for_a_seed_and_differs_across_seeds(kw, perturb):
    model = perturb(tiny()).calibrate(torch.randn(8, 16, 8, 8))
    a = model.generate([1, 2], num_iter=4, seed=0, **kw)
    assert a.shape == (2, 16, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, model.generate([1, 2], num_iter=4, seed=0, **kw))
    assert not torch.equal(a, model.generate([1, 2], num_iter=4, seed=1, **kw))


def test_guidance_mode_reaches_the_sampler(perturb):
    """At cfg 3 guiding the features and guiding the logits are different samplers (the head is
    not linear), and both differ from no guidance."""
    model = perturb(tiny())
    kw = dict(num_iter=3, seed=5)
    feats = model.sample_tokens([3, 4], cfg=3.0, cfg_mode="features", **kw)
    logits = model.sample_tokens([3, 4], cfg=3.0, cfg_mode="logits", **kw)
    unguided = model.sample_tokens([3, 4], **kw)
    assert not torch.equal(feats, logits) and not torch.equal(feats, unguided)


def test_feature_guidance_commutes_with_the_head_projection(perturb):
    model, w = perturb(tiny()), 2.7
    z_c, z_u = torch.randn(5, 64), torch.randn(5, 64)
    p = model.head.project
    torch.testing.assert_close(p(z_u + w * (z_c - z_u)), p(z_u) + w * (p(z_c) - p(z_u)),
                               atol=1e-5, rtol=1e-5)


def test_confidence_order_without_noise_keeps_the_most_likely_positions(perturb):
    model = perturb(tiny()).calibrate(torch.randn(8, 16, 8, 8))
    # With one step per position the first step keeps exactly one position: the argmax score.
    tokens = model.sample_tokens([0], num_iter=64, position_order="confidence",
                                 confidence_noise=0.0, seed=3)
    rng = np.random.default_rng(3)
    u = torch.from_numpy(rng.random((1, 64, 16))).float()
    values = torch.zeros(1, 64, 16) + model.quantizer.mean
    unknown = torch.ones(1, 64, dtype=torch.bool)                    # the first step: all unknown
    cond = model.condition(values, unknown, torch.tensor([0]))
    first, score = model._sample_channels(cond[0], u[0], 1.0)
    best = int(score.argmax())
    assert torch.equal(tokens[0, best], first[best])


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("latents, labels, message", [
    (torch.randn(2, 8, 8, 8), torch.tensor([0, 1]), "expected latents"),
    (torch.randn(2, 16, 4, 4), torch.tensor([0, 1]), "expected latents"),
    (torch.full((2, 16, 8, 8), float("nan")), torch.tensor([0, 1]), "NaN"),
    (torch.randn(2, 16, 8, 8), torch.tensor([0, 10]), r"labels must lie in \[0, 10\)"),
    (torch.randn(2, 16, 8, 8), torch.tensor([-1, 0]), "labels must lie"),
    (torch.randn(2, 16, 8, 8), torch.tensor([0.0, 1.0]), "integer"),
    (torch.randn(2, 16, 8, 8), torch.tensor([0, 1, 2]), "3 labels for a batch of 2"),
])
def test_bad_training_input_is_refused_clearly(latents, labels, message):
    with pytest.raises(ValueError, match=message):
        tiny()(latents, labels)


@pytest.mark.parametrize("kw, message", [
    (dict(num_iter=0), r"num_iter must be in \[1, 64\]"), (dict(num_iter=65), "num_iter"),
    (dict(labels=[11]), "labels must lie"), (dict(temperature=-1), "temperature"),
    (dict(cfg_mode="both"), "cfg_mode"), (dict(position_order="raster"), "position_order"),
])
def test_bad_sampling_input_is_refused_clearly(kw, message):
    args = dict(labels=[0], num_iter=2) | kw
    with pytest.raises(ValueError, match=message):
        tiny().sample_tokens(**args)


def test_bad_quantizer_input_is_refused_clearly():
    with pytest.raises(ValueError, match="levels must be >= 2"):
        tb.GaussianQuantizer(levels=1)
    with pytest.raises(ValueError, match="levels must be >= 2"):
        tb.TokenBridgeConfig.preset("tiny", levels=1)
    q = tb.GaussianQuantizer(16, channels=4)
    with pytest.raises(ValueError, match=r"expected channel-last tokens \(\.\.\., 4\)"):
        q.quantize(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN or inf"):
        q.calibrate(torch.tensor([[1.0, 2, 3, float("inf")]] * 3))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
        q.dequantize(torch.full((2, 4), 16))
    with pytest.raises(ValueError, match="divisible"):
        tb.TokenBridgeConfig(image_size=30, vae_stride=4)
    with pytest.raises(ValueError, match="unknown preset"):
        tb.TokenBridgeConfig.preset("giant")
