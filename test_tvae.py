"""Executable evidence that the code does what tvae.py's numbered equations and the paper say.

Each test names the property it checks. The model's tests follow tvae.py's
header: the kernel W and the grouper (Eqs. 2–4), the roll that makes the code
topographic and equivariant, the ELBO (5–8), E_eq (9), log p(x) (10–11), the
roll gain (12), then the pictures and maps; the data's tests follow. Where the
authors' code picks one of two plausible conventions (the reach of an even
window, the roll's direction, the rotation's sense and centre, the hue's
direction), a small example worked by hand pins it. Tiny synthetic data only;
the real MNIST files are used where $TVAE_DATA_DIR holds them and skipped,
with a reason, elsewhere.
"""
import array
import errno
import gzip
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import re
import shlex
import signal
import struct
import subprocess
import sys
import unittest.mock
import warnings
import zipfile
import zlib

import pytest

# torch warns at import when numpy is absent; the project never uses numpy, so that warning is noise.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
import torch  # noqa: E402  (after the filter above)

import datasets
import experiments
import tvae
from datasets import DataError

# ─── The kernel W and the grouper, Eqs. (2)–(4) ──────────────────────────────

def test_window_offsets_of_an_even_kernel_reach_one_further_forward_than_back():
    # Δ(k) = −⌊(k−1)/2⌋ … ⌊k/2⌋: k = 4 gives −1 … 2, k = 5 gives −2 … 2, k = 18 gives −8 … 9.
    assert list(tvae.window_offsets(4)) == [-1, 0, 1, 2]
    assert list(tvae.window_offsets(5)) == [-2, -1, 0, 1, 2]
    assert list(tvae.window_offsets(18)) == list(range(-8, 10))
    assert list(tvae.window_offsets(1)) == [0]


def test_neighbourhood_sum_of_a_1x4_window_sums_one_unit_back_to_two_ahead():
    # One torus row of 6 units holding u² = 1, 10, 100, …: each digit of a sum
    # names one neighbour. With Δ(4) = −1 … 2, v[i] = u²[i−1] + u²[i] + u²[i+1] + u²[i+2],
    # wrapped: v[0] = u²[5] + u²[0] + u²[1] + u²[2] = 100000 + 1 + 10 + 100 = 100111.
    u2 = torch.tensor([[[1.0, 10, 100, 1_000, 10_000, 100_000]]], dtype=torch.float64)
    expected = [100_111, 1_111, 11_110, 111_100, 111_001, 110_011]
    assert tvae.neighbourhood_sum(u2, torch.ones(1, 4)).flatten().tolist() == expected
    # The same window along time (4 × 1 over 6 frames of one unit) reaches the same frames.
    assert tvae.neighbourhood_sum(u2.view(1, 6, 1), torch.ones(4, 1)).flatten().tolist() == expected


def test_shifting_kernel_is_a_band_of_width_2_n_off_diag_plus_1_on_equal_offsets():
    # Rows δ = −2 … 2, columns δc = −2 … 2; W[δ, δc] = 1 where |δc − δ| ≤ 1.
    assert tvae.topographic_kernel(5, 5, 1).tolist() == [[1, 1, 0, 0, 0],
                                                         [1, 1, 1, 0, 0],
                                                         [0, 1, 1, 1, 0],
                                                         [0, 0, 1, 1, 1],
                                                         [0, 0, 0, 1, 1]]
    # An even width: columns δc = −1, 0, 1, 2, so δc = δ = 0 is the second column, not the third.
    assert tvae.topographic_kernel(1, 4, 0).tolist() == [[0, 1, 0, 0]]
    assert tvae.topographic_kernel(4, 1, 0).tolist() == [[0], [1], [0], [0]]
    # 18: offsets −8 … 9, so the band is centred on δ = δc, not on the kernel's middle:
    # 18 ones on the diagonal and 17 on each side of it, including both corners.
    kernel = tvae.topographic_kernel(18, 18, 1)
    assert kernel.sum().item() == 18 + 2 * 17 and kernel[0, 0].item() == kernel[17, 17].item() == 1
    assert tvae.topographic_kernel(3, 2).tolist() == [[1, 1], [1, 1], [1, 1]]   # stationary


def small_grouper(config, n_caps=2):
    """The experiment's grouper with fewer capsules, for fast tests."""
    config = dict(config, n_caps=min(n_caps, config["n_caps"]))
    return experiments.build_model(config).grouper, config


def brute_force_sum(u, config, kernel):
    """W ⊛ u² of Eqs. (2)–(4) written out from the config: Σ over the window of u² read at
    (l+δ, i+δc), wrapped (the kernel is not used: the config alone says what the window is)."""
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    k_time, k_capsule = config["group_kernel"]
    if config["map_shape"]:
        u2 = (u ** 2).view(-1, *config["map_shape"])                    # rows, cols of the map
        time_axis, unit_axis = 1, 2
    else:
        u2 = (u ** 2).view(-1, S, caps, D)
        time_axis, unit_axis = 1, 3
    v = torch.zeros_like(u2)
    for dt in range(-((k_time - 1) // 2), k_time // 2 + 1):
        for dc in range(-((k_capsule - 1) // 2), k_capsule // 2 + 1):
            if config["grouper"] == "shifting" and abs(dc - dt) > config["n_off_diag"]:
                continue
            # u²[(l + dt) mod S, (i + dc) mod D] sits at [l, i] after rolling by (−dt, −dc).
            v += u2.roll(shifts=(-dt, -dc), dims=(time_axis, unit_axis))
    return v.reshape(u.shape)


def plain_sum(u, config, kernel):
    """W ⊛ u² with the grouper's kernel, by tvae.neighbourhood_sum: one (S, D) torus per capsule
    of a sequence (or the 2-D map)."""
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    if config["map_shape"]:
        return tvae.neighbourhood_sum((u ** 2).view(-1, *config["map_shape"]), kernel).reshape(u.shape)
    tori = (u ** 2).view(-1, S, caps, D).transpose(1, 2).reshape(-1, S, D)
    return tvae.neighbourhood_sum(tori, kernel).view(-1, caps, S, D).transpose(1, 2).reshape(u.shape)


TOPOGRAPHIC = [name for name, c in experiments.EXPERIMENTS.items() if c["grouper"] != "none"]


@pytest.mark.parametrize("neighbourhood_sum", [brute_force_sum, plain_sum])
@pytest.mark.parametrize("name", TOPOGRAPHIC)
def test_grouper_of_every_experiment_divides_by_the_neighbourhood_its_config_names(name, neighbourhood_sum):
    # t = (z + mu) / sqrt(W ⊛ u² + eps), Eq. (2), with the sum written out from the config, or
    # summed over the grouper's own kernel the plain way (its fast matrix form must equal both).
    grouper, config = small_grouper(experiments.EXPERIMENTS[name])
    grouper = grouper.double()
    z, u = torch.randn(2, 3 * config["n_transforms"], config["n_caps"] * config["cap_dim"]).double()
    expected = (z + grouper.mu) / torch.sqrt(neighbourhood_sum(u, config, grouper.kernel) + grouper.eps)
    assert torch.allclose(grouper(z, u), expected, rtol=1e-10)


# ─── The roll: a topographic and equivariant code ────────────────────────────

def test_units_sharing_a_window_have_correlated_magnitudes_and_independent_signs():
    # One capsule of 12 units, one frame, a 1 × 3 window and mu = 0:
    # t_i = z_i / sqrt(u²_{i−1} + u²_i + u²_{i+1}). Units 0 and 1 share two of their
    # three u², units 0 and 6 none. Rank (Spearman) correlation, because t is heavy-tailed.
    grouper = tvae.Grouper(tvae.topographic_kernel(1, 3), 1, 1, 12, mu_init=0.0).double()
    z, u = torch.randn(2, 20_000, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = grouper(z, u)

    def rank_correlation(a, b):
        return tvae.pearson(a.argsort().argsort(), b.argsort().argsort()).item()

    assert rank_correlation(t[:, 0].abs(), t[:, 1].abs()) > 0.08
    assert abs(rank_correlation(t[:, 0].abs(), t[:, 6].abs())) < 0.04
    assert abs(tvae.pearson(t[:, 0].sign(), t[:, 1].sign()).item()) < 0.04


def test_a_diagonal_window_over_all_frames_makes_frame_ls_divisor_frame_0s_rolled_by_l():
    # dSprites' L = 1/2 (kT = S, K_W = 1): Eq. (3) sums u²[l + δ, i + δ] over every δ, which is
    # Σ_τ u²[τ, i − l + τ] = v[0, i − l] for any u: the divisor rolls with time before any training.
    S = D = 6
    u2 = torch.rand(1, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = tvae.neighbourhood_sum(u2, tvae.topographic_kernel(S, S, n_off_diag=0))[0]        # (S, D)
    assert all(torch.allclose(v[l], v[0].roll(l)) for l in range(S))
    for kernel in (tvae.topographic_kernel(3, 3, 0), tvae.topographic_kernel(S, S, 1)):    # a shorter
        v = tvae.neighbourhood_sum(u2, kernel)[0]        # window, or a band clipped at its corners
        assert not any(torch.allclose(v[l], v[0].roll(l)) for l in range(1, S))


@pytest.mark.parametrize("name", ["tvae_Lhalf_mnist", "tvae_Lpartial_dsprites", "bubbles_mnist"])
def test_rolling_z_and_u_one_frame_and_one_unit_rolls_t_the_same_way(name):
    grouper, config = small_grouper(experiments.EXPERIMENTS[name], n_caps=3)
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    z, u = torch.randn(2, 4 * S, caps * D).double()
    grouper = grouper.double()

    def roll(x):  # one frame later in time, one unit further in every capsule
        return x.view(4, S, caps, D).roll(shifts=(1, 1), dims=(1, 3)).reshape(x.shape)

    assert torch.allclose(grouper(roll(z), roll(u)), roll(grouper(z, u)), rtol=1e-12)


# ─── The ELBO: decoder, encoders and KLs, Eqs. (5)–(8) ───────────────────────

def tiny_model(grouper=True, S=4, caps=2, D=4):
    kernel = tvae.topographic_kernel(3, 3, 1)
    g = tvae.Grouper(kernel, S, caps, D, mu_init=1.0) if grouper else None
    return tvae.TVAE((1, 5, 5), caps * D, g)


def test_loss_is_bernoulli_nll_plus_both_kls():
    torch.manual_seed(0)
    model, x = tiny_model(), torch.rand(2, 4, 1, 5, 5)
    out = model(x)
    p = out["probs"].clamp(torch.finfo(torch.float32).eps, 1 - torch.finfo(torch.float32).eps)
    nll = -torch.distributions.Bernoulli(probs=p, validate_args=False).log_prob(x.flatten(0, 1).flatten(1)).sum(1)
    assert torch.allclose(out["nll"], nll, rtol=1e-5)
    assert torch.allclose(out["loss"], out["nll"] + out["kl_z"] + out["kl_u"])


def test_kls_are_those_of_each_posterior_from_the_standard_normal_prior():
    torch.manual_seed(0)
    model, x = tiny_model(), torch.rand(2, 4, 1, 5, 5)
    out, flat = model(x), x.flatten(0, 1).flatten(1)
    normal = torch.distributions.Normal
    for encoder, key in ((model.z_encoder, "kl_z"), (model.u_encoder, "kl_u")):
        mean, logvar = encoder(flat)
        kl = torch.distributions.kl_divergence(normal(mean, (0.5 * logvar).exp()), normal(0.0, 1.0)).sum(1)
        assert torch.allclose(out[key], kl, rtol=1e-5)
    assert torch.equal(tiny_model(grouper=False)(x)["kl_u"], torch.zeros(8))     # the VAE has no u


def test_gradients_reach_both_encoders_the_decoder_and_mu():
    model = tiny_model()
    model(torch.rand(2, 4, 1, 5, 5))["loss"].mean().backward()
    for part in (model.z_encoder, model.u_encoder, model.decoder, model.grouper):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


# The trainable parameter counts of the authors' reference implementation.
REFERENCE_PARAMETERS = {"mnist": 9_803_920, "mnist_vae": 6_465_747, "2d": 5_231_630,
                        "dsprites": 9_716_177, "dsprites_vae": 6_443_551}


def n_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,expected", [
    ("tvae_Lhalf_mnist", "mnist"), ("nontvae_mnist", "mnist_vae"), ("tvae_2d_mnist", "2d"),
    ("bubbles_dsprites", "dsprites"), ("nontvae_dsprites", "dsprites_vae")])
def test_parameter_counts_match_the_reference(name, expected):
    assert n_parameters(experiments.build_model(experiments.EXPERIMENTS[name])) == REFERENCE_PARAMETERS[expected]


def test_decoder_init_is_uniform_with_the_fan_of_its_output_units():
    decoder = tvae.BernoulliDecoder(100, (3, 8, 8))
    for weight, fan in [(decoder.hidden[0].weight, 200), (decoder.hidden[2].weight, 300),
                        (decoder.to_pixels.weight, 3 * 64), (decoder.channel_bias, 3 * 64)]:
        bound = fan ** -0.5
        assert weight.abs().max() <= bound
    assert decoder.hidden[2].weight.abs().max() > 0.95 * 300 ** -0.5   # not nn.Linear's 1/√200... nor smaller
    assert decoder.hidden[0].weight.abs().max() > 0.95 * 200 ** -0.5


def test_decoder_has_one_bias_per_channel_shared_by_its_pixels():
    decoder = tvae.BernoulliDecoder(4, (3, 2, 2))
    with torch.no_grad():
        decoder.to_pixels.weight.zero_()
        decoder.channel_bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    probs = decoder(torch.randn(1, 4)).view(3, 4)
    assert torch.allclose(probs, torch.sigmoid(torch.tensor([0.0, 1.0, 2.0]))[:, None].expand(3, 4))


# ─── E_eq, Eq. (9) ───────────────────────────────────────────────────────────

@pytest.mark.parametrize("form", [tvae.equivariance_error, tvae.equivariance_error_by_definition])
def test_equivariance_error_rolls_frame_l0_forward_unit_i_to_i_plus_l1_minus_l0(form):
    # One sequence of S = 2 frames, one capsule of 4 units, each frame already of unit length.
    # Frame 1 moves the lit unit from 0 to 1: Roll_1 [1, 0, 0, 0] = [0, 1, 0, 0] is frame 1, E_eq = 0.
    # Moved the other way, to unit 3: ‖[0, 1, 0, 0] − [0, 0, 0, 1]‖₁ = 2.
    forward = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]])
    backward = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]])
    assert abs(form(forward, 2, 1, 4).item()) < 1e-6
    assert abs(form(backward, 2, 1, 4).item() - 2) < 1e-6


def rolled_code(B, S, caps, D):
    """t (B·S, caps·D) whose frame k is frame 0 rolled by k units in every capsule: equivariant."""
    first = torch.randn(B, 1, caps, D)
    return torch.cat([first.roll(k, dims=3) for k in range(S)], dim=1).view(B * S, caps * D)


@pytest.mark.parametrize("form", [tvae.equivariance_error, tvae.equivariance_error_by_definition])
def test_equivariance_error_of_a_perfectly_equivariant_code_is_zero(form):
    assert form(rolled_code(5, 18, 18, 18), 18, 18, 18) < 1e-3


def test_equivariance_error_of_random_unit_vectors_is_chance_level():
    torch.manual_seed(0)
    error = tvae.equivariance_error(torch.randn(400 * 18, 324), 18, 18, 18)
    assert abs(error - 13_270) < 0.02 * 13_270


def cyclic_form(t, S, caps, D):
    """E_eq when cap_dim = S: Σ over every roll k of frame and unit together, each pair once."""
    unit = torch.nn.functional.normalize(t.view(-1, S, caps, D), dim=3)
    return sum((unit.roll((k, k), dims=(1, 3)) - unit).abs().sum() for k in range(1, S)) / 2 / len(unit)


@pytest.mark.parametrize("definition, S, D", [(tvae.equivariance_error_by_definition, 5, 7),
                                              (cyclic_form, 6, 6)], ids=["pairwise", "cyclic"])
def test_fast_equivariance_error_equals_its_definition(definition, S, D):
    t = torch.randn(3 * S, 2 * D)
    assert torch.allclose(tvae.equivariance_error(t, S, 2, D), definition(t, S, 2, D), rtol=1e-5)


# ─── log p(x) by importance sampling, Eqs. (10)–(11) ─────────────────────────

def importance_weights_by_hand(model, x, K):
    """w_k of Eq. (10), (K, N), with torch.distributions, from the noise that log_likelihood draws:
    K draws for z, then K for u."""
    normal = torch.distributions.Normal
    flat = x.flatten(0, 1).flatten(1)                                # (N, C·H·W)
    z_mean, z_logvar = model.z_encoder(flat)
    q_z = normal(z_mean, (0.5 * z_logvar).exp())
    z = z_mean + q_z.scale * torch.randn(K, *z_mean.shape)          # (K, N, d)
    log_w = normal(0.0, 1.0).log_prob(z).sum(-1) - q_z.log_prob(z).sum(-1)
    u = [None] * K
    if model.u_encoder is not None:
        u_mean, u_logvar = model.u_encoder(flat)
        q_u = normal(u_mean, (0.5 * u_logvar).exp())
        u = u_mean + q_u.scale * torch.randn(K, *u_mean.shape)
        log_w += normal(0.0, 1.0).log_prob(u).sum(-1) - q_u.log_prob(u).sum(-1)
    eps = torch.finfo(torch.float32).eps
    for k in range(K):                                               # each draw for the whole batch
        probs = model.decoder(model.group(z[k], u[k])).clamp(eps, 1 - eps)
        log_w[k] += torch.distributions.Bernoulli(probs=probs, validate_args=False).log_prob(flat).sum(-1)
    return log_w


@pytest.mark.parametrize("topographic", [True, False], ids=["tvae", "vae"])
def test_log_likelihood_is_logsumexp_of_the_importance_weights_minus_log_K(topographic):
    torch.manual_seed(0)
    model, x = tiny_model(grouper=topographic), torch.rand(3, 4, 1, 5, 5)
    torch.manual_seed(1)
    log_likelihood = model.log_likelihood(x, 5)
    torch.manual_seed(1)
    with torch.no_grad():
        log_w = importance_weights_by_hand(model, x, 5)
    assert torch.allclose(log_likelihood, torch.logsumexp(log_w, dim=0) - math.log(5), rtol=1e-5)


@pytest.mark.parametrize("K", [1, 7])
def test_log_likelihood_is_exact_for_any_K_when_the_proposal_is_the_posterior(K):
    # Encoders that output N(0, 1) and a decoder that ignores t: the posterior is
    # the prior, every importance weight is log p(x), and so is their estimate.
    torch.manual_seed(0)
    model, x = tiny_model(), torch.rand(3, 4, 1, 5, 5)
    with torch.no_grad():
        for part in (model.z_encoder.net[-1], model.u_encoder.net[-1], model.decoder.to_pixels):
            for p in part.parameters():
                p.zero_()
    probs = torch.sigmoid(model.decoder.channel_bias).expand(12, 25)
    exact = torch.distributions.Bernoulli(probs=probs, validate_args=False).log_prob(x.view(12, 25)).sum(1)
    assert torch.allclose(model.log_likelihood(x, K), exact, rtol=1e-5)


def test_more_importance_samples_give_on_average_at_least_the_elbo():
    torch.manual_seed(0)
    model, x = tiny_model(), torch.rand(8, 4, 1, 5, 5)
    elbo = -model(x)["loss"].mean()
    assert model.log_likelihood(x, 50).mean() >= elbo


# ─── The roll gain and the roll accuracy, Eqs. (12)–(13) ─────────────────────

class Function(torch.nn.Module):
    """A module that applies a given function: a stand-in for an encoder or the decoder."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def test_roll_gain_rolls_frame_0s_code_forward_unit_i_to_i_plus_l():
    # The decoder is the identity; one sequence of S = 3 frames, one capsule of 3 units;
    # each frame's own code is the frame itself, so E_self = 0. Frame 0 is [1, 0, 0].
    # Moving forward, frames 1 and 2 are [0, 1, 0] = Roll_1 and [0, 0, 1] = Roll_2 of it:
    #   E_static = ‖[1,0,0] − [0,1,0]‖² + ‖[1,0,0] − [0,0,1]‖² = 2 + 2 = 4, E_roll = 0,
    #   roll gain = (4 − 0) / 4 = 1; the roll hits both frames, standing still neither.
    # Moving backward, frames 1 and 2 are [0, 0, 1] and [0, 1, 0]: both rolls miss,
    #   E_roll = 2 + 2 = 4, roll gain = (4 − 4) / 4 = 0. The own-code gain is 1 in both.
    identity = Function(lambda t: t)
    forward = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    backward = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    for frames, expected, gain, roll_hits in ((forward, [4, 0, 0], 1, 2), (backward, [4, 4, 0], 0, 0)):
        errors, hits = tvae.roll_scores(identity, frames.view(1, 3, 1, 1, 3), frames, frames, 1, 3)
        assert errors.tolist() == [expected] and hits.tolist() == [[0, roll_hits, 2]]
        roll, own = tvae.roll_gains(errors.sum(dim=0))
        assert (roll.item(), own.item()) == (gain, 1)


def equivariant_toy(roll_direction=1):
    """Sequences whose frame l is the decoding of Roll_l t_0: a fixed decoder, codes rolled per frame.

    Returns the arguments of tvae.roll_scores: (decoder, x, t, probs, n_caps, cap_dim). The
    S = 6 frames of each sequence are all different.
    """
    B, S, n_caps, D = 3, 6, 2, 6
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(n_caps * D, 20), torch.nn.Sigmoid())
    first = torch.randn(B, n_caps, D)
    t = torch.stack([first.roll(roll_direction * l, dims=2) for l in range(S)], dim=1).view(B * S, -1)
    with torch.no_grad():
        probs = decoder(t)
    return decoder, probs.view(B, S, 1, 4, 5), t, probs, n_caps, D


def test_an_exact_replay_has_roll_gain_equal_to_its_own_code_gain_and_roll_accuracy_1():
    with torch.no_grad():
        errors, hits = tvae.roll_scores(*equivariant_toy())              # (B, 3): static, roll, own
    roll, own = tvae.roll_gains(errors.sum(dim=0))
    assert errors[:, 0].min() > 0 and torch.equal(errors[:, 1], errors[:, 2])
    assert roll.item() == own.item() == 1.0
    assert hits.tolist() == [[0, 5, 5]] * 3                                # every frame l = 1…5


def test_a_roll_the_other_way_hits_only_the_middle_frame():
    # Rolled backward, decode(Roll_l t_0) is frame S − l: right only where l = S − l = 3.
    with torch.no_grad():
        errors, hits = tvae.roll_scores(*equivariant_toy(roll_direction=-1))
    roll, own = tvae.roll_gains(errors.sum(dim=0))
    assert own.item() == 1.0 and roll.item() < 0.5
    assert hits.tolist() == [[0, 1, 5]] * 3


def test_predicting_the_mean_frame_passes_the_roll_gain_but_not_the_roll_accuracy():
    # Blur: every frame l ≥ 1 predicted by its sequence's mean frame, which replays nothing,
    # with decode(t_0) = frame 0. On frames about equally far apart (random pixels) the
    # gain is about (S + 1) / (2S) ≈ 0.53; the accuracy is at most one frame of S − 1.
    S, B, P = 18, 4, 400
    frames = torch.rand(B, S, P, generator=torch.Generator().manual_seed(0))
    blur = torch.where(torch.arange(S)[:, None] == 0, frames, frames.mean(dim=1, keepdim=True))
    decoder = Function(lambda codes: blur.reshape(B * S, P))             # row b·S + l: Roll_l t_0
    x, own_codes = frames.view(B, S, 1, 1, P), frames.reshape(B * S, P)
    with torch.no_grad():
        errors, hits = tvae.roll_scores(decoder, x, torch.zeros(B * S, S), own_codes, 1, S)
    roll, own = tvae.roll_gains(errors.sum(dim=0))
    assert roll.item() == pytest.approx((S + 1) / (2 * S), abs=0.03) and own.item() == 1.0
    assert hits[:, 1].max() <= 1 and hits[:, 2].tolist() == [S - 1] * B


def test_predictions_are_scored_against_the_input_not_the_reconstruction():
    # The decoder replays the input exactly under the roll, but the reconstruction is a
    # blank: scored against it, the roll would miss every frame.
    decoder, x, t, _, n_caps, D = equivariant_toy()
    blank = torch.zeros(x.shape[0] * x.shape[1], 20)
    with torch.no_grad():
        errors, hits = tvae.roll_scores(decoder, x, t, blank, n_caps, D)
    assert hits[:, 1].tolist() == [5] * 3 and errors[:, 1].max() == 0
    assert hits[:, 2].max() <= 1 and errors[:, 2].min() > 0


def test_equal_frames_are_ties_and_ties_are_hits():
    # A factor that returns to its first value: frames 0 and 2 are equal, so standing still
    # predicts frame 2 as well as any frame can. Roll_2 t_0 = [0, 0, 1] is equally far (2)
    # from every frame: a tie too, so a hit.
    identity = Function(lambda t: t)
    frames = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])
    _, hits = tvae.roll_scores(identity, frames.view(1, 3, 1, 1, 3), frames, frames, 1, 3)
    assert hits.tolist() == [[1, 2, 2]]


def test_roll_gain_of_an_untrained_model_is_near_zero():
    torch.manual_seed(0)
    S, n_caps, D = 18, 18, 18
    grouper = tvae.Grouper(tvae.topographic_kernel(13, 13, 1), S, n_caps, D, mu_init=30.0)
    model = tvae.TVAE((3, 28, 28), n_caps * D, grouper)
    digits = torch.zeros(16, 28, 28)
    digits[:, 8:20, 11:17] = torch.rand(16, 12, 6)
    x, _ = datasets.mnist_sequences(digits, "single", colour=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        errors, _ = tvae.roll_scores(model.decoder, x, out["t"], out["probs"], n_caps, D)
    roll, own = tvae.roll_gains(errors.sum(dim=0))
    assert abs(roll.item()) < 0.05 and abs(own.item()) < 0.05


# ─── Capsule traversal, prior samples and Figure 3's maps ────────────────────

def point_posterior_model(S, n_caps, D, kernel, mu):
    """A TVAE with σ = 0 posteriors, z = the image and u = 1, and the identity as decoder.

    Images are (1, n_caps, D): each row is one capsule. t is then an affine map of
    the image, t = (x + mu) / sqrt(W ⊛ 1 + eps).
    """
    model = tvae.TVAE((1, n_caps, D), n_caps * D, tvae.Grouper(kernel, S, n_caps, D, mu_init=mu))
    point = torch.tensor(-math.inf)                                   # log σ² of σ = 0
    model.z_encoder = Function(lambda x: (x, point.expand_as(x)))
    model.u_encoder = Function(lambda x: (torch.ones_like(x), point.expand_as(x)))
    model.decoder = Function(lambda t: t)
    return model


def test_capsule_traversal_rolls_frame_0s_capsule_forward_unit_i_to_i_plus_k():
    # A 1 × 1 window and u = 1 give W ⊛ u² = 1; with mu = 0, t = x / sqrt(1 + 10⁻⁶) ≈ x.
    # Frame 0 lights unit 0 of a 4-unit capsule. Rolled by k = 0, 1, 2, 3 it lights unit
    # 0, 1, 2, 3: the four decodings are the rows of the 4 × 4 identity, not its mirror.
    model = point_posterior_model(2, 1, 4, tvae.topographic_kernel(1, 1), mu=0.0)
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]).view(2, 1, 1, 4)
    _, _, rolled = model.capsule_traversal(x, 1, 4)
    assert rolled.shape == (4, 1, 1, 4)
    torch.testing.assert_close(rolled.view(4, 4), torch.eye(4), atol=1e-5, rtol=0)


def test_capsule_traversal_of_an_equivariant_model_replays_the_sequence():
    # Point posteriors and the identity as decoder: t is an affine map of the
    # image. Each image is two capsules of 5 units; frame k is frame 0 rolled by k
    # units in both, so the code is exactly equivariant and rolling frame 0's
    # capsules by k must decode to frame k's reconstruction.
    S, n_caps, D = 5, 2, 5
    model = point_posterior_model(S, n_caps, D, tvae.topographic_kernel(3, 3, 1), mu=0.5)
    first = torch.rand(1, n_caps, D)
    x = torch.stack([first.roll(k, dims=2) for k in range(S)])       # (S, 1, n_caps, D)
    inputs, reconstructions, rolled = model.capsule_traversal(x, n_caps, D)
    assert torch.equal(inputs, x) and rolled.shape == reconstructions.shape == x.shape
    assert torch.allclose(rolled, reconstructions)


def test_capsule_traversal_decodes_a_posterior_sample_not_the_means():
    # The reconstructions must be the decoding of z and u drawn as Eq. (6)
    # draws them, z's noise first, from the generator given; and the roll by 0
    # is frame 0's reconstruction.
    S, n_caps, D = 4, 3, 4
    torch.manual_seed(0)
    grouper = tvae.Grouper(tvae.topographic_kernel(3, 3, 1), S, n_caps, D, mu_init=2.0)
    model = tvae.TVAE((1, 6, 6), n_caps * D, grouper)
    x = torch.rand(S, 1, 6, 6)
    _, reconstructions, rolled = model.capsule_traversal(x, n_caps, D, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    _, q_z, q_u = model.encode(x[None])
    z = tvae.reparameterise(*q_z, torch.randn(S, n_caps * D, generator=generator))
    u = tvae.reparameterise(*q_u, torch.randn(S, n_caps * D, generator=generator))
    with torch.no_grad():
        expected = model.decoder(model.group(z, u)).view(S, 1, 6, 6)
    assert torch.allclose(reconstructions, expected)
    assert torch.allclose(rolled[0], reconstructions[0])
    again = model.capsule_traversal(x, n_caps, D, torch.Generator().manual_seed(7))
    assert torch.equal(again[1], reconstructions)


def test_prior_samples_decode_the_grouper_of_standard_normal_z_and_u():
    torch.manual_seed(0)
    model = tiny_model()
    torch.manual_seed(1)
    samples = model.sample(3, 4)
    torch.manual_seed(1)
    z, u = torch.randn(12, 8), torch.randn(12, 8)                    # the draws sample() makes: z, then u
    with torch.no_grad():
        expected = model.decoder(model.grouper(z, u)).view(3, 4, 1, 5, 5)
    assert samples.shape == (3, 4, 1, 5, 5) and torch.allclose(samples, expected)


def test_capsule_offsets_recover_the_true_index_of_a_rolled_code():
    B, S, caps, D = 6, 15, 4, 15
    # A sequence whose frame i is frame 0 rolled by i; the factor starts at index j0 and wraps at 15.
    start = torch.tensor([0, 3, 7, 14, 9, 1])
    factor = torch.tensor([2, 3, 4, 2, 3, 4])
    labels = torch.zeros(B, S, 5, dtype=torch.long)
    for b in range(B):
        labels[b, :, factor[b]] = (start[b] + torch.arange(S)) % 15
    code = rolled_code(B, S, caps, D)
    found_factor, estimate, truth = tvae.capsule_offsets(code, labels, caps, D)
    assert torch.equal(found_factor, factor) and torch.equal(truth, start)
    assert torch.equal(estimate, start)
    assert torch.isclose(tvae.pearson(estimate, truth), torch.tensor(1.0, dtype=torch.double))


def test_class_selectivity_labels_units_that_prefer_a_class():
    torch.manual_seed(0)
    classes = torch.arange(10).repeat(50)
    t = torch.randn(500, 12)
    t[:, 0] += 5 * (classes == 3)                     # unit 0 fires for threes
    t[:, 1] += 5 * (classes == 7)
    labels = tvae.class_selectivity(t, classes)
    assert labels[0] == 3 and labels[1] == 7 and (labels[2:] == -1).all()


def test_topography_of_a_map_of_class_bands_is_counted_pair_by_pair_and_shuffling_gives_chance():
    labels = torch.arange(324) // 36                 # 9 classes, each a band of 2 rows of the 18×18 map
    labels[labels == 8] = -1                         # the last band prefers no class: its pairs do not count
    share, shuffled = tvae.topographic_agreement(labels, (18, 18), generator=torch.Generator().manual_seed(0))
    # Pairs of selective units: 16·18 along rows (all alike) + 15·18 across (8·18 alike, within a band).
    assert share == (16 * 18 + 8 * 18) / (16 * 18 + 15 * 18)
    assert abs(shuffled - 35 / 287) < 0.01           # chance: another unit of one's own class, of the 288 selective


# ─── tvae.py in the README ───────────────────────────────────────────────────

README_HEADING = "## Use tvae.py in your own code"


def readme_snippet(path):
    """The ```python block of the README section README_HEADING; None where the README has no such section."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    heading = re.search(rf"^{re.escape(README_HEADING)}[ \t]*$", text, re.M)
    if heading is None:
        return None
    section = re.split(r"^## ", text[heading.end():], maxsplit=1, flags=re.M)[0]
    block = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert block, f"README.md's section '{README_HEADING}' has no ```python block"
    return block.group(1)


def test_readme_snippet_runs_as_written():
    snippet = readme_snippet(pathlib.Path(__file__).parent / "README.md")
    if snippet is None:
        pytest.skip(f"README.md has no section '{README_HEADING}' yet")
    exec(compile(snippet, "README.md snippet", "exec"), {"__name__": "readme_snippet"})


# ─── MNIST files ─────────────────────────────────────────────────────────────

def write_idx(path, magic, values):
    """A gzipped IDX file: big-endian magic, one uint32 per dimension, then the uint8 values."""
    header = struct.pack(f">I{values.dim()}I", magic, *values.shape)
    path.write_bytes(gzip.compress(header + bytes(values.flatten().tolist())))


@pytest.fixture
def tiny_mnist(tmp_path):
    """Ten digits of random pixels as both train and test files; returns (folder, images, labels)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(256, (10, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(10, dtype=torch.uint8)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)
    return tmp_path, images, labels


def test_idx_files_parse_to_uint8_images_and_int64_labels(tiny_mnist):
    folder, images, labels = tiny_mnist
    got_images, got_labels = datasets.load_mnist(folder, train=False)
    assert got_images.dtype == torch.uint8 and got_labels.dtype == torch.int64
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels.long())


def test_split_trains_on_the_seeded_four_fifths_of_the_training_digits(tiny_mnist):
    folder, images, _ = tiny_mnist
    split = datasets.mnist_train_test(folder, seed=0)
    train_images, train_labels = split["train"]
    assert len(train_images) == 10 - 10 // 5 and len(split["test"][0]) == 10
    assert torch.equal(train_images, images[train_labels])           # label i marks digit i: pairs kept
    assert torch.equal(datasets.mnist_train_test(folder, seed=0)["train"][1], train_labels)
    assert not torch.equal(datasets.mnist_train_test(folder, seed=1)["train"][1], train_labels)


@pytest.mark.parametrize("damage", ["truncated gzip", "short payload", "not gzip"])
def test_damaged_idx_file_is_a_data_error_naming_it(tiny_mnist, damage):
    folder, images, _ = tiny_mnist
    path = folder / "t10k-images-idx3-ubyte.gz"
    if damage == "truncated gzip":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "short payload":                                  # valid gzip, header promises more
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    else:
        path.write_bytes(b"not a gzip file")
    with pytest.raises(DataError, match=str(path)):
        datasets.load_mnist(folder, train=False)


def test_wrong_magic_number_is_a_data_error_naming_the_file(tiny_mnist):
    folder, images, _ = tiny_mnist
    path = folder / "t10k-images-idx3-ubyte.gz"
    write_idx(path, 2049, images)                                    # a labels magic on the images file
    with pytest.raises(DataError, match=str(path)):
        datasets.load_mnist(folder, train=False)


def test_missing_files_offline_are_one_line_naming_the_folder_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ["http://127.0.0.1:9/"])   # discard port: refused at once
    with pytest.raises(DataError) as error:
        datasets.load_mnist(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "--data-dir" in message and "train-images-idx3-ubyte.gz" in message
    assert list(tmp_path.iterdir()) == []                           # no partial download left behind


def test_downloads_are_kept_only_with_the_published_md5(tiny_mnist, tmp_path_factory, monkeypatch):
    mirror, _, _ = tiny_mnist
    target = tmp_path_factory.mktemp("download")
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", [mirror.as_uri() + "/"])
    with pytest.raises(DataError, match="MD5"):                     # tiny files: not the published ones
        datasets.load_mnist(target, train=False)
    assert list(target.iterdir()) == []
    md5 = {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in mirror.iterdir()}
    monkeypatch.setattr(datasets, "MNIST_MD5", md5)
    images, _ = datasets.load_mnist(target, train=False)
    assert len(images) == 10
    assert sorted(p.name for p in target.iterdir()) == ["t10k-images-idx3-ubyte.gz",
                                                        "t10k-labels-idx1-ubyte.gz"]


def real_mnist_dir():
    """The folder $TVAE_DATA_DIR when it holds the four real MNIST files, else None."""
    folder = os.environ.get("TVAE_DATA_DIR")
    if folder and all((pathlib.Path(folder) / name).exists() for name in datasets.MNIST_MD5):
        return pathlib.Path(folder)
    return None


def test_real_mnist_files_hold_60000_train_and_10000_test_digits():
    folder = real_mnist_dir()
    if folder is None:
        pytest.skip("real MNIST files not found (set TVAE_DATA_DIR)")
    images, labels = datasets.load_mnist(folder)
    assert images.shape == (60000, 28, 28) and labels[0] == 5     # the famous first digit is a 5
    split = datasets.mnist_train_test(folder)
    assert len(split["train"][0]) == 48000 and split["test"][0].shape == (10000, 28, 28)


# ─── Image operations ────────────────────────────────────────────────────────

def test_rotate_scale_at_angle_0_scale_1_is_the_identity():
    images = torch.rand(3, 2, 28, 28)
    out = datasets.rotate_scale(images, torch.zeros(3), torch.ones(3))
    assert torch.allclose(out, images, atol=1e-5)


def rotate_one_pixel(x, y, angle, scale=1.0):
    """A 28 × 28 image lit at column x, row y, rotated and scaled by rotate_scale."""
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, y, x] = 1
    return datasets.rotate_scale(image, torch.tensor([float(angle)]), torch.tensor([scale]))[0, 0]


@pytest.mark.parametrize("x, y, angle, scale, to_x, to_y", [
    (20, 10, 90, 1.0, 10, 8), (20, 10, 180, 1.0, 8, 18), (20, 10, 270, 1.0, 18, 20),
    (20, 10, -90, 1.0, 18, 20), (14, 14, 90, 1.0, 14, 14), (14, 14, 180, 1.0, 14, 14),
    (20, 10, 0, 2.0, 26, 6), (20, 10, 90, 2.0, 6, 2)])
def test_rotate_scale_turns_anticlockwise_about_14_14_where_opencvs_matrix_sends_a_pixel(
        x, y, angle, scale, to_x, to_y):
    # The pixel at column x = 20, row y = 10 (y down) sits 6 right of and 4 above the
    # centre (14, 14). Anticlockwise on the screen, right turns into up and up into left:
    #   +90°: 6 right → 6 up, 4 up → 4 left: column 14 − 4 = 10, row 14 − 6 = 8.
    #   180°: 6 left, 4 down: column 8, row 18.   +270° = −90°: 4 right, 6 down: column 18, row 20.
    # (A clockwise +90° would land at column 18, row 20; a centre at (13.5, 13.5) at row 7.)
    # The pixel at (14, 14) stays: with pixel centres at integers, (W/2, H/2) is a fixed point.
    # Scale 2 doubles the offset (+6, −4) to (+12, −8): column 26, row 6; turned by 90°, 2, 6.
    a, b = scale * math.cos(math.radians(angle)), scale * math.sin(math.radians(angle))
    opencv = (round(a * x + b * y + (1 - a) * 14 - b * 14),          # getRotationMatrix2D
              round(-b * x + a * y + b * 14 + (1 - a) * 14))
    out = rotate_one_pixel(x, y, angle, scale)
    assert opencv == (to_x, to_y) and abs(out[to_y, to_x].item() - 1) < 1e-4
    if scale == 1:
        assert abs(out.sum().item() - 1) < 1e-4                     # the pixel moved, whole


def test_shift_hue_by_a_full_turn_is_the_identity():
    images = torch.rand(4, 3, 5, 5)
    assert torch.allclose(datasets.shift_hue(images, torch.full((4,), 2 * math.pi)), images, atol=1e-5)
    assert torch.allclose(datasets.shift_hue(images, torch.zeros(4)), images, atol=1e-5)


@pytest.mark.parametrize("turn, rgb", [(1 / 6, (1, 1, 0)), (1 / 3, (0, 1, 0)), (2 / 3, (0, 0, 1)),
                                       (-1 / 3, (0, 0, 1))],
                         ids=["60deg-yellow", "120deg-green", "240deg-blue", "minus-120deg-blue"])
def test_shift_hue_turns_pure_red_towards_green_first(turn, rgb):
    # The HSV hue circle runs red (0°) → yellow (60°) → green (120°) → cyan → blue (240°)
    # → magenta → red. A positive shift moves along it: a third of a turn makes red
    # green, not blue. Value and saturation stay: half-bright red becomes half-bright.
    image = torch.tensor([[[[1.0, 0.5]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # (1, 3, 1, 2): red, dark red
    out = datasets.shift_hue(image, torch.tensor([2 * math.pi * turn]))
    expected = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) * torch.tensor([1.0, 0.5])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_perspective_at_angle_0_is_the_identity():
    images = torch.rand(2, 3, 28, 28)
    assert torch.equal(datasets.perspective(images, torch.zeros(2)), images)


def test_perspective_at_180_degrees_is_the_181_degree_view():
    images = torch.rand(2, 1, 28, 28)
    assert torch.equal(datasets.perspective(images, torch.tensor([180.0, 181.0]))[0],
                       datasets.perspective(images, torch.tensor([181.0, 181.0]))[0])


def reference_homography(angle, h=28, w=28):
    """The reference's source→destination homography A2·T·R·A1 for phi = gamma = angle, in float64 Python."""
    def matmul(p, q):
        return [[sum(a * b for a, b in zip(row, col)) for col in zip(*q)] for row in p]
    g = math.radians(angle)
    c, s = math.cos(g), math.sin(g)
    f = math.hypot(h, w) / (2 * s)
    a1 = [[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1], [0, 0, 1]]
    ry = [[c, 0, -s, 0], [0, 1, 0, 0], [s, 0, c, 0], [0, 0, 0, 1]]
    rz = [[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    t = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, f], [0, 0, 0, 1]]
    a2 = [[f, 0, w / 2, 0], [0, f, h / 2, 0], [0, 0, 1, 0]]
    return matmul(a2, matmul(t, matmul(ry, matmul(rz, a1))))        # Rx = I: theta = 0


@pytest.mark.parametrize("angle", [40.0, 200.0])
def test_perspective_reads_every_pixel_from_where_the_reference_homography_says(angle):
    # Channels x, y and 1: bilinear sampling reproduces them exactly wherever all
    # four neighbours lie inside, so each output pixel tells its source point.
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    image = torch.stack([xs, ys, torch.ones_like(xs)])[None]
    out = datasets.perspective(image, torch.tensor([angle]))[0]
    inside = (out[2] - 1).abs() < 1e-5
    assert inside.sum() > 100
    m = reference_homography(angle)
    sources = zip(out[0][inside].tolist(), out[1][inside].tolist())
    for (dst_y, dst_x), (src_x, src_y) in zip(inside.nonzero().tolist(), sources):
        u, v, z = (row[0] * src_x + row[1] * src_y + row[2] for row in m)
        assert (u / z, v / z) == pytest.approx((dst_x, dst_y), abs=2e-3)


# ─── MNIST sequences ─────────────────────────────────────────────────────────

def sample_digits(b=6):
    g = torch.Generator().manual_seed(1)
    return torch.randint(256, (b, 28, 28), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("kind", datasets.SEQUENCE_KINDS)
@pytest.mark.parametrize("colour", [True, False])
def test_sequences_have_shape_b_s_c_28_28_in_0_1(kind, colour):
    x, labels = datasets.mnist_sequences(sample_digits(), kind, colour, torch.Generator().manual_seed(0))
    S = 1 if kind == "none" else 18
    assert x.shape == (6, S, 3 if colour else 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 + 1e-6
    assert labels["transform"].shape == (6,)
    for name in ("angle", "scale", "hue"):
        assert labels[name].shape == (6, S) and labels[name].dtype == torch.int64


def test_plain_sequences_are_the_digit_in_the_red_channel():
    digits = sample_digits()
    x, _ = datasets.mnist_sequences(digits, "none", True)
    assert torch.equal(x[:, 0, 0], digits / 255) and x[:, :, 1:].abs().sum() == 0


def test_single_sequences_walk_exactly_the_labelled_factor_one_step_per_frame():
    x, labels = datasets.mnist_sequences(sample_digits(64), "single", True, torch.Generator().manual_seed(0))
    index = torch.stack([labels["angle"], labels["scale"], labels["hue"]], dim=1)   # (B, 3, S)
    walks = (index.diff(dim=2) % 18 == 1).all(dim=2)                  # +1 per frame, 17 wraps to 0
    still = (index == index[:, :, :1]).all(dim=2)
    assert (walks ^ still).all()                                      # each factor either walks or stays
    assert torch.equal(walks, torch.nn.functional.one_hot(labels["transform"], 3).bool())
    assert set(labels["transform"].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("kind", ["dual", "perspective"])
def test_dual_sequences_walk_angle_and_hue_together_at_scale_1(kind):
    _, labels = datasets.mnist_sequences(sample_digits(), kind, True, torch.Generator().manual_seed(0))
    for name in ("angle", "hue"):
        assert (labels[name].diff(dim=1) % 18 == 1).all()
    assert (labels["scale"] == -1).all() and (labels["transform"] == -1).all()


@pytest.mark.parametrize("kind", ["single", "dual", "perspective"])
def test_sequence_frames_are_the_labelled_transforms_of_the_digit(kind):
    digits = sample_digits(3)
    x, labels = datasets.mnist_sequences(digits, kind, True, torch.Generator().manual_seed(0))
    frames = (digits / 255).repeat_interleave(18, dim=0)[:, None]     # (N, 1, 28, 28), frame fastest
    angles = datasets.MNIST_ANGLES[labels["angle"].flatten()]
    if kind == "perspective":
        frames = datasets.perspective(frames, angles)
    else:
        scale_idx = labels["scale"].flatten()
        scales = torch.where(scale_idx >= 0, datasets.MNIST_SCALES[scale_idx.clamp(min=0)], 1.0)
        frames = datasets.rotate_scale(frames, angles, scales)
    frames = torch.cat([frames, torch.zeros_like(frames), torch.zeros_like(frames)], dim=1)
    frames = datasets.shift_hue(frames, datasets.MNIST_HUES[labels["hue"].flatten()])
    assert torch.allclose(x.flatten(0, 1), frames, atol=1e-6)


def test_same_seed_gives_the_same_sequences():
    digits = sample_digits()
    first = datasets.mnist_sequences(digits, "single", True, torch.Generator().manual_seed(3))
    again = datasets.mnist_sequences(digits, "single", True, torch.Generator().manual_seed(3))
    other = datasets.mnist_sequences(digits, "single", True, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and all(torch.equal(first[1][k], again[1][k]) for k in first[1])
    assert not torch.equal(first[0], other[0])


def test_every_experiment_is_tested_on_the_same_sequences_whatever_its_training_seed(mnist_dir, rendered):
    half, short = (experiments.EXPERIMENTS[name] for name in ("tvae_Lhalf_mnist", "tvae_Lshort_mnist"))
    assert half["seed"] != short["seed"] and half["test_seed"] == short["test_seed"]
    sprites = dict(experiments.EXPERIMENTS["tvae_Lhalf_dsprites"], dsprites_source="procedural")
    for a, b in ((half, short), (sprites, dict(sprites, seed=7))):
        with unittest.mock.patch.object(datasets, "render_dsprites", lambda: rendered):
            first, second = (next(experiments.load_data(c, mnist_dir, "cpu").test_batches(8)) for c in (a, b))
        assert torch.equal(first[0], second[0])


# ─── dSprites ────────────────────────────────────────────────────────────────

def npy_bytes(payload, shape, descr="|u1"):
    """A version 1.0 .npy file: magic, little-endian header length, header dict padded to 64 bytes, data."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape})
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + payload


class TouchOnUnpickle:
    """Pickles to an instruction that creates a file when unpickled: a trap for whoever unpickles."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def write_npz(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


@pytest.fixture(scope="module")
def index_npz(tmp_path_factory):
    """The real file's layout, 1×4-pixel images whose bytes spell their own index; a trapped metadata."""
    folder = tmp_path_factory.mktemp("dsprites")
    indices = array.array("i", range(737280))
    assert indices.itemsize == 4
    sentinel = folder / "unpickled"
    metadata = npy_bytes(pickle.dumps(TouchOnUnpickle(sentinel)), (), descr="|O")
    write_npz(folder / datasets.DSPRITES_FILE, {"imgs.npy": npy_bytes(indices.tobytes(), (737280, 1, 4)),
                                                "metadata.npy": metadata})
    return folder / datasets.DSPRITES_FILE, sentinel, metadata


def test_load_dsprites_keeps_scales_1_to_5_and_every_second_index_below_30(index_npz):
    path, _, _ = index_npz
    grid = datasets.load_dsprites(path)
    assert grid.shape == (3, 5, 15, 15, 15, 1, 4) and grid.dtype == torch.uint8
    got = grid.view(torch.int32).flatten()                            # each image's index in the full file
    every_second = torch.arange(0, 30, 2)
    shape, scale, orient, pos_x, pos_y = torch.meshgrid(
        torch.arange(3), torch.arange(1, 6), every_second, every_second, every_second, indexing="ij")
    expected = (((shape * 6 + scale) * 40 + orient) * 32 + pos_x) * 32 + pos_y    # row-major in the full grid
    assert torch.equal(got, expected.flatten().int())
    assert torch.equal(datasets.load_dsprites(path.parent), grid)  # a folder: the published name in it


def test_load_dsprites_downloads_into_a_folder_that_does_not_exist_yet(index_npz, tmp_path, monkeypatch):
    path, _, _ = index_npz
    monkeypatch.setattr(datasets, "DSPRITES_URL", path.as_uri())
    folder = tmp_path / "new" / "data"
    assert datasets.load_dsprites(folder).shape == (3, 5, 15, 15, 15, 1, 4)
    assert [p.name for p in folder.iterdir()] == [datasets.DSPRITES_FILE]


def test_load_dsprites_never_unpickles_the_metadata(index_npz):
    path, sentinel, metadata = index_npz
    datasets.load_dsprites(path)
    assert not sentinel.exists()
    pickle.loads(metadata[metadata.index(b"\n") + 1:])               # the entry really was a trap
    assert sentinel.exists()
    sentinel.unlink()


@pytest.mark.parametrize("entries", [
    "not a zip",
    {"metadata.npy": b""},                                           # no imgs.npy
    {"imgs.npy": npy_bytes(bytes(16), (4, 2, 2))},                   # wrong number of images
    {"imgs.npy": npy_bytes(bytes(737280 * 4), (737280, 1, 1), descr="<f4")},   # wrong dtype
    {"imgs.npy": npy_bytes(bytes(1000), (737280, 1, 1))},            # truncated
    {"imgs.npy": npy_bytes(bytes(737281), (737280, 1, 1))},          # longer than its header
    {"imgs.npy": b"\x93NUMPY\x01\x00\x04\x00{{{\n"},                 # unparseable header
], ids=["not-zip", "no-imgs", "shape", "dtype", "truncated", "too-long", "header"])
def test_bad_dsprites_file_is_a_data_error_naming_it(tmp_path, entries):
    path = tmp_path / datasets.DSPRITES_FILE
    if isinstance(entries, str):
        path.write_bytes(entries.encode())
    else:
        write_npz(path, entries)
    with pytest.raises(DataError, match=str(path)):
        datasets.load_dsprites(path)


def test_corrupt_compressed_dsprites_data_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / datasets.DSPRITES_FILE
    g = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(256, (737280,), generator=g, dtype=torch.uint8).tolist())   # incompressible
    write_npz(path, {"imgs.npy": npy_bytes(noise, (737280, 1, 1))})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                                     # flip one byte of the deflate stream
    path.write_bytes(data)
    with pytest.raises(DataError, match=str(path)):
        datasets.load_dsprites(path)


def test_missing_dsprites_offline_names_the_path_the_url_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DSPRITES_URL", "http://127.0.0.1:9/" + datasets.DSPRITES_FILE)
    with pytest.raises(DataError) as error:
        datasets.load_dsprites(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / datasets.DSPRITES_FILE) in message
    assert datasets.DSPRITES_URL in message and "--data-dir" in message and "--dsprites procedural" in message
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def rendered():
    return datasets.render_dsprites()


def test_rendered_grid_is_binary_with_the_sub_grid_shape(rendered):
    assert rendered.shape == (3, 5, 15, 15, 15, 64, 64) and rendered.dtype == torch.uint8
    assert rendered.max() == 1                                       # 0/1 only (uint8, nothing above 1)
    assert rendered.flatten(-2).any(dim=-1).all()                     # no pose renders empty


def test_rendered_shapes_differ_at_the_same_pose(rendered):
    square, ellipse, heart = rendered[:, 2, 3, 7, 7]
    assert not torch.equal(square, ellipse) and not torch.equal(ellipse, heart)
    assert not torch.equal(square, heart)


def test_rendered_sprites_grow_with_scale(rendered):
    area = rendered[:, :, :, 5:10, 5:10].flatten(-2).sum(-1)        # poses away from the edges
    assert (area.diff(dim=1) > 0).all()


def test_an_epoch_visits_every_start_point_once_in_full_batches():
    batches = list(datasets.dsprites_epoch(None, 8, torch.Generator().manual_seed(0)))
    starts = torch.cat([s for s, _ in batches])
    factors = torch.cat([f for _, f in batches])
    assert len(batches) == 50625 // 8 and all(len(s) == 8 for s, _ in batches)
    flat = torch.tensor([15 ** 3 * 5, 15 ** 3, 15 ** 2, 15, 1]) @ starts.T    # row-major sub-grid index
    assert len(flat.unique()) == len(flat) == 50624
    assert set(factors.tolist()) == {1, 2, 3, 4}
    assert (starts.max(dim=0).values == torch.tensor([2, 4, 14, 14, 14])).all()
    few = list(datasets.dsprites_epoch(20, 8, torch.Generator().manual_seed(0)))
    assert len(few) == 2 and torch.equal(few[0][0], batches[0][0])


def test_dsprites_sequences_advance_one_factor_by_one_per_frame_with_wraparound():
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(256, (3, 5, 15, 15, 15, 2, 2), generator=g, dtype=torch.uint8)
    starts = torch.tensor([[0, 3, 0, 0, 0], [1, 0, 9, 2, 3], [2, 1, 1, 14, 5], [0, 0, 0, 0, 13]])
    factors = torch.tensor([1, 2, 3, 4])
    x, labels = datasets.dsprites_sequences(grid, starts, factors)
    assert x.shape == (4, 15, 1, 2, 2) and x.dtype == torch.float32 and labels.shape == (4, 15, 5)
    sizes = torch.tensor([3, 5, 15, 15, 15])
    for b in range(4):
        moving = factors[b].item()
        expected = starts[b].repeat(15, 1)
        expected[:, moving] = (starts[b, moving] + torch.arange(15)) % sizes[moving]
        assert torch.equal(labels[b], expected)
    assert torch.equal(x[:, :, 0], grid[labels.unbind(-1)].float())


# ─── Plumbing: the training loop, the run folder and the command line ────────

@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """A tiny MNIST look-alike: 40 training and 12 test 'digits' in the four standard files."""
    folder = tmp_path_factory.mktemp("mnist")
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        images[:, 8:20, 10:16] = torch.randint(100, 256, (n, 12, 6), generator=generator, dtype=torch.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (torch.arange(n) % 10).to(torch.uint8))
    return folder


def quick_config(name, **overrides):
    """The experiment's config, cut down to one short epoch on a few sequences."""
    config = dict(experiments.EXPERIMENTS[name], max_epochs=1, batch_size=4, train_sequences=8,
                  test_sequences=2, n_is_samples=2, n_caps=min(2, experiments.EXPERIMENTS[name]["n_caps"]))
    config.update(overrides)
    return config


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def measured(records):
    """Metrics records without the wall-clock time, which no two runs share."""
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_every_experiment_runs_one_short_epoch_end_to_end(name, tmp_path, mnist_dir, rendered, monkeypatch):
    monkeypatch.setattr(datasets, "render_dsprites", lambda: rendered)
    config = quick_config(name, test_sequences=12 if name == "tvae_2d_mnist" else 2)
    if config["data"] == "dsprites":
        config["dsprites_source"] = "procedural"
    records = experiments.train(config, tmp_path, mnist_dir, "cpu")
    assert read_metrics(tmp_path) == records
    untrained, train_line, test_line = records                 # evaluated before and after the epoch
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (1, 2), (1, 2)]
    assert untrained.keys() == test_line.keys()
    for key in ("train_loss", "train_nll", "train_kl", "test_log_likelihood"):
        assert math.isfinite((train_line | test_line)[key])
    if config["n_transforms"] > 1:
        assert math.isfinite(train_line["train_eq_error"]) and math.isfinite(test_line["test_eq_error"])
        assert test_line["test_roll_gain"].keys() == test_line["test_self_gain"].keys()
        assert all(math.isfinite(v) for v in test_line["test_roll_gain"].values())
        assert (tmp_path / "traversal_001.png").exists() and (tmp_path / "samples_001.png").exists()
    if config["data"] == "dsprites":
        assert set(test_line["test_capsule_correlation"]) == {"scale", "orientation", "posX", "posY"}
    if config["grouper"] == "map2d":
        for picture in ("samples", "max_activation", "selectivity", "reconstruction"):
            assert (tmp_path / f"{picture}_001.png").exists()
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(config))
    assert (tmp_path / "checkpoint.pt").exists()


def test_roll_gain_is_recorded_per_transformation_kind_of_the_test_sequences(tmp_path, mnist_dir):
    config = quick_config("tvae_Lshort_mnist", max_epochs=0, test_sequences=12)
    [record] = experiments.train(config, tmp_path, mnist_dir)
    data = experiments.load_data(config, mnist_dir, "cpu")
    kinds = {("rotation", "scale", "hue")[k] for _, labels, _ in data.test_batches(32, 12)
             for k in labels["transform"].tolist()}
    assert list(record["test_roll_gain"]) == [k for k in ("rotation", "scale", "hue") if k in kinds]
    assert len(kinds) > 1
    for name in ("roll", "still", "self"):
        shares = record[f"test_{name}_accuracy"]
        assert list(shares) == list(record["test_roll_gain"]) and all(0 <= v <= 1 for v in shares.values())


def test_load_data_without_a_data_dir_reads_the_default_folder(index_npz, monkeypatch):
    monkeypatch.setenv("TVAE_DATA_DIR", str(index_npz[0].parent))
    data = experiments.load_data(experiments.EXPERIMENTS["bubbles_dsprites"], None, "cpu")
    assert data.grid.shape == (3, 5, 15, 15, 15, 1, 4)


class StopAt(experiments.Progress):
    """A progress display that sends this process a signal (SIGINT: Ctrl-C) at its k-th report."""

    def __init__(self, k=None, signal_number=signal.SIGINT):
        super().__init__(io.StringIO())
        self.k, self.signal_number, self.reports = k, signal_number, 0

    def evaluated(self, *args):
        self.reports += 1
        if self.reports == self.k:
            os.kill(os.getpid(), self.signal_number)

    update = evaluated                            # a training step is a report too


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, mnist_dir):
    """(config, metrics, weights) of 2 epochs of 3 steps, evaluated at 0, 1 and 2 (one test batch each)."""
    config = quick_config("tvae_Lshort_mnist", max_epochs=2, train_sequences=12, eval_epochs=1)
    folder = tmp_path_factory.mktemp("unbroken")
    records = experiments.train(config, folder, mnist_dir, progress=StopAt())
    return config, records, torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


# Stops at report k (of a step or a test batch) of each start, leaving a checkpoint after `epochs`. Ctrl-C:
# in the untrained evaluation; in epoch 1 at step 2 of 3 (that start evaluated the untrained model again first);
# in the evaluation after epoch 1; in the last one. SIGTERM: in epoch 1; at epoch 2's last step, not yet logged.
@pytest.mark.parametrize("stops, epochs, signal_number", [([1, 3, 4, 5], [0, 0, 1, 2], signal.SIGINT),
                                                          ([3, 7], [0, 1], signal.SIGTERM)])
def test_a_run_stopped_at_any_moment_and_resumed_ends_as_an_unbroken_one(stops, epochs, signal_number, unbroken,
                                                                           tmp_path, mnist_dir):
    config, records, weights = unbroken
    for k, epoch in zip(stops, epochs):
        with pytest.raises(KeyboardInterrupt):
            experiments.train(config, tmp_path, mnist_dir, resume=(tmp_path / "checkpoint.pt").exists(),
                              progress=StopAt(k, signal_number))
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["epoch"] == epoch
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL             # handlers restored
    resumed = experiments.train(config, tmp_path, mnist_dir, resume=True, progress=StopAt())
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert measured(resumed) == measured(records) and all(torch.equal(weights[k], saved[k]) for k in weights)


def run_cli(capsys, data_dir, out, *options, name="tvae_Lshort_mnist"):
    """experiments.main on a tiny run (2 capsules, a batch of 4 sequences, 2 test sequences): status, stderr lines."""
    status = experiments.main([name, "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu",
                               "--train-sequences", "4", "--batch-size", "4", "--test-sequences", "2",
                               "--set", "n_is_samples=1", "--set", "n_caps=2", "--epochs", "1", *options])
    return status, capsys.readouterr().err.strip().splitlines()


def test_epochs_are_counted_as_epochs_trained_in_metrics_pictures_and_progress(tmp_path, mnist_dir, capsys):
    status, err = run_cli(capsys, mnist_dir, tmp_path, "--epochs", "2", "--set", "eval_epochs=2")
    assert status == 0 and [(r["epoch"], r["step"], "train_loss" in r) for r in read_metrics(tmp_path)] == \
           [(0, 0, False), (1, 1, True), (2, 2, True), (2, 2, False)]
    assert sorted(p.name for p in tmp_path.glob("traversal_*.png")) == ["traversal_000.png", "traversal_002.png"]
    starts = ["evaluating the untrained model on 2 test sequences", "evaluated 2/2 test sequences  ",
              "epoch 1/2  step 1/1  loss", "epoch 2/2  step 1/1  loss", "evaluating after 2 epochs on 2 test",
              "evaluated 2/2 test sequences  "]                        # each on its own line
    assert len(err) == 8 and all(line.startswith(start) for line, start in zip(err[1:7], starts))


def test_epochs_0_evaluates_the_untrained_model_only(tmp_path, mnist_dir, capsys):
    assert run_cli(capsys, mnist_dir, tmp_path, "--epochs", "0")[0] == 0 and (tmp_path / "traversal_000.png").exists()
    assert [(r["epoch"], r["step"], "test_sequences" in r) for r in read_metrics(tmp_path)] == [(0, 0, True)]


@pytest.mark.parametrize("function", ["train_step", "evaluate"])      # stopped in training, in the last evaluation
def test_a_stopped_run_says_in_its_last_line_where_it_stopped_and_how_to_go_on(function, tmp_path, mnist_dir,
                                                                               monkeypatch, capsys):
    calls, original = [], getattr(experiments, function)

    def stopped_at_the_second(*args):              # of 2 steps, of 2 evaluations
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)
    monkeypatch.setattr(experiments, function, stopped_at_the_second)
    status, err = run_cli(capsys, mnist_dir, tmp_path, "--train-sequences", "8")
    epochs = {"train_step": "0 epochs", "evaluate": "1 epoch"}[function]
    assert status == 130 and err[-1].startswith(f"stopped; {tmp_path} keeps the run after {epochs}; continue with: ")
    monkeypatch.undo()
    assert experiments.main(shlex.split(err[-1].split("continue with: ")[1])[2:]) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 1]


@pytest.mark.parametrize("file, error", [
    ("checkpoint.pt", RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")),
    ("metrics.jsonl", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))])
def test_a_full_disk_is_one_line_and_the_run_goes_on_from_its_last_checkpoint_once_there_is_space(
        file, error, tmp_path, mnist_dir, monkeypatch, capsys):
    writes, write = [], experiments.RunFolder._write

    def fourth_write_fails(self, name, write_to):      # after the last evaluation
        writes.extend([name] if name == file else [])
        if writes.count(file) == 4:
            def write_to(path):
                path.write_bytes(b"the first bytes")
                raise error
        return write(self, name, write_to)
    monkeypatch.setattr(experiments.RunFolder, "_write", fourth_write_fails)
    status, err = run_cli(capsys, mnist_dir, tmp_path)
    assert status == 1 and err[-1].startswith(f"error: cannot write {file} in {tmp_path} (")
    assert "--resume" in err[-1] and "Traceback" not in "".join(err) and not list(tmp_path.glob("*.tmp"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 1
    monkeypatch.undo()
    assert run_cli(capsys, mnist_dir, tmp_path, "--resume")[0] == 0         # the evaluation, again
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 1]


def test_a_second_run_into_a_run_is_refused_naming_the_choices_and_leaves_the_first_as_it_was(
        tmp_path, mnist_dir, capsys):
    assert run_cli(capsys, mnist_dir, tmp_path, "--epochs", "2", "--set", "eval_epochs=1")[0] == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    status, err = run_cli(capsys, mnist_dir, tmp_path)
    assert status == 1 and len(err) == 1 and "--resume" in err[0] and "another --out" in err[0]
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_a_start_that_fails_its_checks_says_why_in_a_line_and_creates_nothing(tmp_path, mnist_dir, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ["http://127.0.0.1:9/"])      # offline: a closed local port
    status, err = run_cli(capsys, tmp_path / "empty", tmp_path / "run")
    assert status == 1 and len(err) == 1 and str(tmp_path / "empty") in err[0] and "--data-dir" in err[0]
    (a_file := tmp_path / "a_file").write_text("")
    status, err = run_cli(capsys, a_file, tmp_path / "run")
    assert status == 1 and len(err) == 1 and f"missing from {a_file}" in err[0] and "File exists" in err[0]
    assert not (tmp_path / "run").exists()
    status, err = run_cli(capsys, mnist_dir, a_file)
    assert status == 1 and len(err) == 1 and f"--out {a_file}" in err[0]
    assert run_cli(capsys, mnist_dir, tmp_path / "run")[0] == 0                  # the same command, with data
    status, err = run_cli(capsys, mnist_dir, tmp_path / "other", "--resume")
    assert status == 1 and len(err) == 1 and "no checkpoint" in err[0]


def test_resume_refuses_another_experiment_seed_model_or_data(tmp_path, mnist_dir, capsys):
    assert run_cli(capsys, mnist_dir, tmp_path)[0] == 0
    for change, key in [(["--seed", "5"], "seed"), (["--set", "cap_dim=9"], "cap_dim"),
                        (["--train-sequences", "8"], "train_sequences")]:
        status, err = run_cli(capsys, mnist_dir, tmp_path, "--resume", "--epochs", "2", *change)
        assert status in (1, 2) and len(err) == 1 and re.search(rf"\b{key}\b", err[0])
    status, [err] = run_cli(capsys, mnist_dir, tmp_path, "--resume", "--show", name="tvae_Lhalf_mnist")
    assert status == 1 and err.startswith(f"error: --resume: {tmp_path} holds a run of tvae_Lshort_mnist, not "
                                          f"tvae_Lhalf_mnist; continue it with: ")    # the folder's own first
    assert experiments.main(shlex.split(err.split("continue it with: ")[1])[2:]) == 0   # a complete run: says so


def test_resume_reads_the_checkpoint_alone_and_writes_config_json_and_metrics_from_it(tmp_path, mnist_dir, capsys):
    assert run_cli(capsys, mnist_dir, tmp_path)[0] == 0
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, momentum="fast", n_caps=7)))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1, "st')                                     # a write cut short
    assert run_cli(capsys, mnist_dir, tmp_path, "--resume", "--epochs", "2")[0] == 0
    assert json.loads((tmp_path / "config.json").read_text()) == config | {"max_epochs": 2}
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 1, 2, 2]


def test_resume_of_a_complete_run_says_how_to_extend_it_and_a_new_learning_rate_applies(tmp_path, mnist_dir, capsys):
    assert run_cli(capsys, mnist_dir, tmp_path)[0] == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    status, err = run_cli(capsys, mnist_dir, tmp_path, "--resume")
    assert status == 0 and len(err) == 1 and "holds a complete run of tvae_Lshort_mnist (1 epoch)" in err[0]
    assert (tmp_path / "metrics.jsonl").read_text() == before
    extend = shlex.split(err[0].split("epochs in all: ")[1].replace(" N", " 2"))[2:]
    assert experiments.main([*extend, "--lr", "0.003"]) == 0
    assert "resuming" in (err := capsys.readouterr().err) and "after 1 epoch, step 1; lr 0.0001 -> 0.003" in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 0.003
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.003


def test_a_folder_in_use_by_a_run_is_refused_and_freed_when_that_process_dies(tmp_path, mnist_dir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
                               str(tmp_path / ".lock")], stdout=subprocess.PIPE)
    holder.stdout.readline()                                             # it holds the lock now
    status, err = run_cli(capsys, mnist_dir, tmp_path)
    assert status == 1 and len(err) == 1 and "in use" in err[0]
    holder.kill()                                                        # SIGKILL: no clean-up of its own
    holder.wait()
    assert run_cli(capsys, mnist_dir, tmp_path)[0] == 0


def test_a_checkpoint_is_loaded_as_data_and_never_runs_code(tmp_path, mnist_dir, capsys):
    assert run_cli(capsys, mnist_dir, tmp_path)[0] == 0
    trap = tmp_path / "code_ran"
    torch.save({"model": TouchOnUnpickle(trap)}, tmp_path / "checkpoint.pt")
    status, err = run_cli(capsys, mnist_dir, tmp_path, "--resume", "--epochs", "2")
    assert status == 1 and len(err) == 1 and "cannot read" in err[0] and not trap.exists()


BAD_VALUES = [(["--set", "eval_epochs=0"], "eval_epochs"), (["--set", "n_is_samples=0"], "n_is_samples"),
              (["--batch-size", "-2"], "batch_size"), (["--epochs", "-1"], "max_epochs"),
              (["--test-sequences", "-5"], "test_sequences"), (["--lr", "-1"], "lr"),
              (["--set", "cap_dim=4"], "cap_dim"), (["--set", "n_transforms=4"], "n_transforms"),
              (["--set", "momentum=1.5"], "momentum"), (["--set", "n_caps=abc"], "n_caps"),
              (["--set", "group_kernel=[3]"], "group_kernel"), (["--set", "colour=1"], "colour"),
              (["--epochs", "two"], "--epochs"), (["--device", "gpu"], "cpu, cuda, cuda:N or mps"),
              (["--set", "lr"], "KEY=VALUE"), (["--dsprites", "real"], "--dsprites")]


def exit_status(argv):
    """experiments.main's exit status, also where argparse exits for it."""
    try:
        return experiments.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("option, named", BAD_VALUES)
def test_a_bad_value_or_option_is_one_line_naming_it_before_any_data_is_read(option, named, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ["http://127.0.0.1:9/"])      # reading data would fail
    status = exit_status(["tvae_Lshort_mnist", "--data-dir", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "run"), *option])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and named in err[0]
    assert not (tmp_path / "run").exists()


def test_a_nan_loss_stops_the_run_before_the_update_naming_the_epoch_and_term(tmp_path, mnist_dir, capsys):
    status, err = run_cli(capsys, mnist_dir, tmp_path, "--lr", "1e30", "--train-sequences", "12")
    assert status == 1 and "non-finite loss" in err[-1] and "in epoch 1;" in err[-1]
    assert str(tmp_path / "checkpoint.pt") in err[-1] and "Traceback" not in " ".join(err)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["step"] == 0   # the untrained one


def test_importing_without_numpy_prints_no_warning():
    code = "import sys; sys.modules['numpy'] = None; import experiments, torch; torch.zeros(1).tolist()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent)
    assert result.returncode == 0 and "NumPy" not in result.stderr, result.stderr


def test_show_prints_the_whole_resolved_config(capsys):
    assert experiments.main(["--show", "tvae_Lhalf_mnist", "--lr", "0.002"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == dict(json.loads(json.dumps(experiments.EXPERIMENTS["tvae_Lhalf_mnist"])), lr=0.002)


def test_an_unknown_name_is_one_line_naming_every_experiment(capsys):
    assert exit_status(["tvae_lhalf_mnist"]) == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert "'tvae_lhalf_mnist'" in error and all(name in error for name in experiments.EXPERIMENTS)


def test_list_names_all_16_experiments(capsys):
    assert experiments.main(["--list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 16


# The report reads run folders into the paper's tables: tiny synthetic folders, no training.

def write_run(folder, name, evaluations, torn_tail=None, **config_changes):
    """A run folder of experiment `name`: its config.json, and metrics.jsonl of the given evaluation records."""
    folder.mkdir(parents=True)
    config = {key: value for key, value in experiments.EXPERIMENTS[name].items() if key != "table"} | config_changes
    (folder / "config.json").write_text(json.dumps(config))
    lines = [json.dumps({"wall_s": 36.0 * (i + 1), "device": "cpu", **r}) for i, r in enumerate(evaluations)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + (torn_tail or ""))
    return folder


def evaluation(epoch, step, log_p=-100.0, eq=500.0, **extra):
    return {"epoch": epoch, "step": step, "test_log_likelihood": log_p, "test_eq_error": eq, **extra}


def table_rows(markdown, title_start):
    """The rows of the table whose ### title starts with title_start, each as header → cell."""
    block = markdown.split(f"### {title_start}", 1)[1].split("\n\n")[1]
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in block.splitlines()]
    return [dict(zip(header, row)) for row in rows]


def test_a_run_with_another_training_seed_is_a_row_of_its_own_that_names_the_seed(tmp_path):
    runs = [write_run(tmp_path / name, "nontvae_mnist", [evaluation(e, 6000 * e) for e in (0, 40)], seed=seed)
            for name, seed in (("a", 1), ("b", 3))]
    rows = table_rows(experiments.report(runs), "Table 1")
    assert [row["experiment"] for row in rows] == ["`nontvae_mnist`"] * 2 + ["`nontvae_mnist` (seed 3)"] * 2


def test_another_seed_joins_a_table_only_at_the_budget_the_registry_seeds_reached(tmp_path):
    runs = [write_run(tmp_path / "vae", "nontvae_mnist", [evaluation(e, 6000 * e) for e in (0, 40, 100)]),
            write_run(tmp_path / "vae3", "nontvae_mnist", [evaluation(e, 6000 * e) for e in (0, 40)], seed=3)]
    assert [(row["experiment"], row["epochs"]) for row in table_rows(experiments.report(runs), "Table 1")] == [
        ("`nontvae_mnist`", "0"), ("`nontvae_mnist`", "100")]
    assert [(row["experiment"], row["epochs"]) for row in table_rows(experiments.report(runs, epochs=40), "Table 1")] == [
        ("`nontvae_mnist`", "0"), ("`nontvae_mnist`", "40"), ("`nontvae_mnist` (seed 3)", "0"),
        ("`nontvae_mnist` (seed 3)", "40")]           # the registry's seed first, though it trained longer


def test_table1_shows_the_papers_convention_log_k_above_ours(tmp_path):
    run = write_run(tmp_path / "a", "tvae_Lhalf_mnist", [evaluation(2, 12000, log_p=-100.0)], n_is_samples=10)
    row, = table_rows(experiments.report([run]), "Table 1")
    assert row["test log p(x)"] == "-100.0"
    assert row["paper's convention (+log K)"] == f"{-100.0 + math.log(10):,.1f}" == "-97.7"


def test_a_table_compares_its_runs_in_the_papers_order_after_the_most_epochs_all_reached(tmp_path):
    folders = [write_run(tmp_path / "vae", "nontvae_mnist", [evaluation(e, 6000 * e) for e in (0, 5, 10)]),
               write_run(tmp_path / "half", "tvae_Lhalf_mnist", [evaluation(e, 6000 * e) for e in (0, 5, 7)]),
               write_run(tmp_path / "sprites", "tvae_Lhalf_dsprites", [evaluation(e, 6328 * e) for e in (0, 5)])]
    text = experiments.report(folders)
    assert "### Table 1: MNIST sequences after 5 epochs" in text
    assert [(row["experiment"], row["epochs"]) for row in table_rows(text, "Table 1")] == [
        ("`tvae_Lhalf_mnist`", "0"), ("`tvae_Lhalf_mnist`", "5"), ("`nontvae_mnist`", "0"), ("`nontvae_mnist`", "5")]
    assert [row["epochs"] for row in table_rows(text, "Table 2")] == ["0", "5"]


def test_a_table_row_of_a_run_is_its_last_evaluation_after_its_untrained_one(tmp_path):
    run = write_run(tmp_path / "a", "tvae_Lhalf_mnist", [evaluation(e, 6000 * e) for e in (0, 5, 10)])
    assert [row["epochs"] for row in table_rows(experiments.report([run]), "Table 1")] == ["0", "10"]
    trained = write_run(tmp_path / "b", "tvae_Lhalf_mnist", [evaluation(e, 6000 * e) for e in (1, 6)])
    assert [row["epochs"] for row in table_rows(experiments.report([trained]), "Table 1")] == ["6"]


def test_report_epochs_compares_runs_of_unequal_length_at_one_budget(tmp_path, capsys):
    run = write_run(tmp_path / "a", "tvae_Lpartial_dsprites", [evaluation(e, 6328 * e) for e in (0, 5, 10, 15, 20)])
    assert experiments.main(["--report", str(run), "--epochs", "10"]) == 0
    assert [row["epochs"] for row in table_rows(capsys.readouterr().out, "Table 2")] == ["0", "10"]
    assert [row["epochs"] for row in table_rows(experiments.report([run], epochs=12), "Table 2")] == ["0", "10"]
    assert [row["epochs"] for row in table_rows(experiments.report([run], epochs=0), "Table 2")] == ["0"]


def test_table_membership_comes_from_the_registry_not_the_paper_string(tmp_path):
    figure4 = write_run(tmp_path / "f4", "tvae_Lpartial_mnist", [evaluation(1, 6000)], paper="Table 1, L=13/36")
    table1 = write_run(tmp_path / "t1", "tvae_L0_mnist", [evaluation(1, 6000)], paper="")
    table2 = write_run(tmp_path / "t2", "tvae_Lpartial_dsprites", [evaluation(1, 6000)])
    text = experiments.report([figure4, table1, table2])
    assert [row["experiment"] for row in table_rows(text, "Table 1")] == ["`tvae_L0_mnist`"]
    assert [row["experiment"] for row in table_rows(text, "Table 2")] == ["`tvae_Lpartial_dsprites`"]


def test_a_torn_last_line_is_ignored_a_torn_middle_line_is_an_error(tmp_path):
    run = write_run(tmp_path / "a", "tvae_Lhalf_mnist", [evaluation(0, 0), evaluation(5, 30000)],
                    torn_tail='{"epoch": 10, "step": 600')
    config, records, table = experiments.read_run(run)
    assert config["name"] == "tvae_Lhalf_mnist" and [r["epoch"] for r in records] == [0, 5]
    (run / "metrics.jsonl").write_text('{"epoch": 0, "st\n' + json.dumps(evaluation(5, 30000)) + "\n")
    with pytest.raises(experiments.RunError, match="not a readable run folder"):
        experiments.read_run(run)


def test_an_unreadable_folder_is_a_one_line_run_error(tmp_path):
    with pytest.raises(experiments.RunError) as error:
        experiments.report([tmp_path / "nothing"])
    assert "nothing" in str(error.value) and "\n" not in str(error.value)


def test_tables_over_epochs_print_every_10th_evaluation_and_the_last(tmp_path):
    epochs = list(range(0, 121, 5))                                      # 25 evaluations
    run = write_run(tmp_path / "a", "tvae_Lpartial_mnist", [evaluation(e, 6000 * e) for e in epochs])
    rows = table_rows(experiments.report([run]), "`tvae_Lpartial_mnist`")
    assert [row["epochs"] for row in rows] == ["0", "50", "100", "120"]
    assert rows[-1]["steps"] == "720,000" and rows[-1]["hours"] == "0.25"


def test_roll_gains_and_accuracies_appear_per_transformation_kind(tmp_path):
    gains = {"rotation": 0.5, "scale": 0.25, "hue": 0.75}
    accuracies = {f"test_{name}_accuracy": {kind: share for kind in gains}
                  for name, share in (("roll", 0.5), ("still", 0.0), ("self", 1.0))}
    mnist = write_run(tmp_path / "m", "tvae_Lhalf_mnist", [evaluation(2, 12000, test_roll_gain=gains, **accuracies)])
    factors = {"scale": 0.1, "orientation": 0.2, "posX": 0.3, "posY": 0.4}
    sprites = write_run(tmp_path / "d", "bubbles_dsprites", [evaluation(1, 6328, test_roll_gain=factors)])
    dual = write_run(tmp_path / "g", "tvae_Lpartial_mnist_generalization",
                     [evaluation(e, e, test_roll_gain={"rotation+hue": e / 10}) for e in (0, 1, 2)])
    text = experiments.report([mnist, sprites, dual])
    row, = table_rows(text, "Table 1")
    assert [row[f"roll gain {kind}"] for kind in gains] == ["0.50", "0.25", "0.75"]
    assert row["roll accuracy hue (still, own)"] == "0.50 (0.00, 1.00)"
    row, = table_rows(text, "Table 2")
    assert [row[f"roll gain {kind}"] for kind in factors] == ["0.10", "0.20", "0.30", "0.40"]
    assert [row["roll gain rotation+hue"] for row in table_rows(text, "`tvae_Lpartial_mnist_generalization`")] == [
        "0.00", "0.20"]                                             # the first and the last of 3 evaluations


def test_missing_values_print_as_a_dash_and_columns_no_run_has_are_left_out(tmp_path):
    correlations = {"scale": 0.9, "orientation": None, "posX": 0.5, "posY": 0.5}
    gains = {"test_roll_gain": {"scale": 0.5}, "test_capsule_correlation": dict(correlations, orientation=0.3)}
    runs = [write_run(tmp_path / "d", "nontvae_dsprites", [evaluation(1, 6328, test_capsule_correlation=correlations)]),
            write_run(tmp_path / "b", "bubbles_dsprites", [evaluation(1, 6328, **gains)])]
    bubbles, vae = table_rows(experiments.report(runs), "Table 2")             # the paper's order
    assert vae["test corr. scale"] == "0.90" and vae["test corr. orientation"] == "–"
    assert vae["roll gain scale"] == "–" and bubbles["roll gain scale"] == "0.50" and vae["test E_eq"] == "500"
    assert "roll gain posX" not in vae and "roll accuracy scale (still, own)" not in vae   # no run has them


def test_figure3_shows_the_topography_over_epochs(tmp_path):
    topography = {"selective_units": 232, "same_class_neighbours": 0.885, "shuffled": 0.115, "ratio": 7.7}
    run = write_run(tmp_path / "map", "tvae_2d_mnist",
                    [{"epoch": e, "step": 375 * e, "test_log_likelihood": -121.1, "test_topography": topography}
                     for e in (0, 5, 10)])
    rows = table_rows(experiments.report([run]), "`tvae_2d_mnist`")
    assert [row["epochs"] for row in rows] == ["0", "10"]
    assert (rows[-1]["same class neighbours"], rows[-1]["ratio"]) == ("0.885", "7.70")


def test_the_committed_results_are_read():
    folders = sorted(pathlib.Path(__file__).parent.glob("results/*"))
    if not folders:
        pytest.skip("no results/ beside this file")
    text = experiments.report(folders)
    assert all(f"### {title}" in text for title in ("Table 1", "Table 2", "`tvae_2d_mnist`"))
    tables = [experiments.read_run(folder)[2] for folder in folders]
    assert len(table_rows(text, "Table 1")) <= 2 * tables.count("Table 1")    # a second seed may lag
    assert len(table_rows(text, "Table 1")) >= 10 and len(table_rows(text, "Table 2")) == 12


def test_png_writer_output_decodes_back_to_the_pixels_written(tmp_path):
    image = torch.rand(3, 5, 7)
    datasets.write_png(tmp_path / "a.png", image)
    data = (tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, position = {}, 8
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        chunks[kind] = data[position + 8:position + 8 + length]
        assert zlib.crc32(kind + chunks[kind]) == int.from_bytes(data[position + 8 + length:position + 12 + length], "big")
        position += 12 + length
    assert int.from_bytes(chunks[b"IHDR"][:4], "big") == 7 and int.from_bytes(chunks[b"IHDR"][4:8], "big") == 5
    rows = torch.tensor(list(zlib.decompress(chunks[b"IDAT"])), dtype=torch.uint8).view(5, 1 + 7 * 3)
    assert (rows[:, 0] == 0).all()
    expected = (image * 255).round().to(torch.uint8).permute(1, 2, 0).reshape(5, 21)
    assert torch.equal(rows[:, 1:], expected)
