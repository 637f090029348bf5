"""Executable evidence that the code does what SPEC.md and the paper say.

Each test names the property it checks. Tiny synthetic data only; the real
MNIST files are used where present and skipped, with a reason, where absent.
"""
import gzip
import io
import json
import math
import os
import signal
import zlib

import pytest
import torch

import datasets
import experiments
import tvae

# The trainable parameter counts of the reference (SPEC §1.3).
REFERENCE_PARAMETERS = {"mnist": 9_803_920, "mnist_vae": 6_465_747, "2d": 5_231_630,
                        "dsprites": 9_716_177, "dsprites_vae": 6_443_551}


def n_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def small_grouper(config, n_caps=2):
    """The experiment's grouper with fewer capsules, for fast tests."""
    config = dict(config, n_caps=min(n_caps, config["n_caps"]))
    return experiments.build_model(config).grouper, config


def brute_force_group(z, u, config, mu):
    """SPEC §1.4 written out: v = Σ over the kernel's offsets of u² read at (τ+δt, i+δc), wrapped."""
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    k_time, k_capsule, _ = config["group_kernel"]
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
            # u²[(τ + dt) mod S, (i + dc) mod D] sits at [τ, i] after rolling by (−dt, −dc).
            v += u2.roll(shifts=(-dt, -dc), dims=(time_axis, unit_axis))
    return (z + mu) / torch.sqrt(v.reshape(z.shape) + config["eps"])


TOPOGRAPHIC = [name for name, c in experiments.EXPERIMENTS.items() if c["grouper"] != "none"]


@pytest.mark.parametrize("name", TOPOGRAPHIC)
def test_grouper_equals_brute_force_neighbourhood_sum(name):
    grouper, config = small_grouper(experiments.EXPERIMENTS[name])
    n = 3 * config["n_transforms"]
    z, u = torch.randn(2, n, config["n_caps"] * config["cap_dim"]).double()
    expected = brute_force_group(z, u, config, grouper.mu.double())
    assert torch.allclose(grouper.double()(z, u), expected, rtol=1e-10)


def test_L0_dsprites_uses_eps_1e_3_and_the_small_eps_elsewhere():
    assert experiments.build_model(experiments.EXPERIMENTS["tvae_L0_dsprites"]).grouper.eps == 1e-3
    assert experiments.build_model(experiments.EXPERIMENTS["tvae_Lhalf_dsprites"]).grouper.eps == 1e-6


def test_shifting_kernel_is_the_band_of_width_2_n_off_diag_plus_1():
    kernel = tvae.topographic_kernel(5, 5, 1)
    assert torch.equal(kernel, (torch.arange(5)[:, None] - torch.arange(5)).abs().le(1).float())
    # Even kernels: offsets −8…9 for 18, so the band is centred on δt = δc, not on the middle.
    kernel = tvae.topographic_kernel(18, 18, 1)
    assert kernel.sum() == 18 + 2 * 17 and kernel[8, 8] == 1 and kernel[0, 0] == 1


@pytest.mark.parametrize("name", ["tvae_Lhalf_mnist", "tvae_Lpartial_dsprites", "bubbles_mnist"])
def test_rolling_z_and_u_in_time_and_capsule_rolls_t_the_same_way(name):
    grouper, config = small_grouper(experiments.EXPERIMENTS[name], n_caps=3)
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    z, u = torch.randn(2, 4 * S, caps * D).double()
    grouper = grouper.double()

    def roll(x):  # one frame later in time, one unit further in every capsule
        return x.view(4, S, caps, D).roll(shifts=(1, 1), dims=(1, 3)).reshape(x.shape)

    assert torch.allclose(grouper(roll(z), roll(u)), roll(grouper(z, u)), rtol=1e-12)


def test_equivariance_error_of_a_perfectly_rolled_code_is_zero():
    S, caps, D = 18, 18, 18
    first = torch.randn(5, 1, caps, D)
    code = torch.cat([first.roll(k, dims=3) for k in range(S)], dim=1)     # frame k = Roll_k(frame 0)
    assert tvae.equivariance_error(code.view(5 * S, -1), S, caps, D) < 1e-3


def test_equivariance_error_of_random_unit_vectors_is_chance_level():
    torch.manual_seed(0)
    error = tvae.equivariance_error(torch.randn(400 * 18, 324), 18, 18, 18)
    assert abs(error - 13_270) < 0.02 * 13_270


def test_equivariance_error_equals_the_cyclic_form_when_cap_dim_is_S():
    S = D = 6
    t = torch.randn(3 * S, 2 * D)
    unit = torch.nn.functional.normalize(t.view(3, S, 2, D), dim=3)
    cyclic = sum((unit.roll((k, k), dims=(1, 3)) - unit).abs().sum() for k in range(1, S)) / 2 / 3
    assert torch.allclose(tvae.equivariance_error(t, S, 2, D), cyclic, rtol=1e-5)


def tiny_model(grouper=True, S=4, caps=2, D=4):
    kernel = tvae.topographic_kernel(3, 3, 1)
    g = tvae.Grouper(kernel, S, caps, D, mu_init=1.0) if grouper else None
    return tvae.TVAE((1, 5, 5), caps * D, g)


def test_one_importance_sample_equals_the_single_sample_elbo_of_the_same_draw():
    torch.manual_seed(0)
    model, x = tiny_model(), torch.rand(3, 4, 1, 5, 5)
    torch.manual_seed(1)
    log_likelihood = model.log_likelihood(x, 1)
    torch.manual_seed(1)
    out = model(x)                       # draws the same noise for z, then for u
    flat = x.flatten(0, 1).flatten(1)
    normal = torch.distributions.Normal
    (z_mean, z_logvar), (u_mean, u_logvar) = model.z_encoder(flat), model.u_encoder(flat)
    torch.manual_seed(1)
    z = z_mean + (0.5 * z_logvar).exp() * torch.randn_like(z_mean)
    u = u_mean + (0.5 * u_logvar).exp() * torch.randn_like(u_mean)
    elbo = (-out["nll"]
            + normal(0, 1).log_prob(z).sum(1) - normal(z_mean, (0.5 * z_logvar).exp()).log_prob(z).sum(1)
            + normal(0, 1).log_prob(u).sum(1) - normal(u_mean, (0.5 * u_logvar).exp()).log_prob(u).sum(1))
    assert torch.allclose(log_likelihood, elbo.detach(), rtol=1e-5)


def test_more_importance_samples_give_on_average_at_least_the_elbo():
    torch.manual_seed(0)
    model, x = tiny_model(), torch.rand(8, 4, 1, 5, 5)
    elbo = -model(x)["loss"].mean()
    assert model.log_likelihood(x, 50).mean() >= elbo


def test_the_vae_log_likelihood_has_no_u_terms():
    torch.manual_seed(0)
    model, x = tiny_model(grouper=False), torch.rand(2, 4, 1, 5, 5)
    torch.manual_seed(1)
    log_likelihood = model.log_likelihood(x, 1)
    torch.manual_seed(1)
    out = model(x)
    z_mean, z_logvar = model.z_encoder(x.flatten(0, 1).flatten(1))
    torch.manual_seed(1)
    z = z_mean + (0.5 * z_logvar).exp() * torch.randn_like(z_mean)
    normal = torch.distributions.Normal
    elbo = -out["nll"] + normal(0, 1).log_prob(z).sum(1) - normal(z_mean, (0.5 * z_logvar).exp()).log_prob(z).sum(1)
    assert torch.allclose(log_likelihood, elbo.detach(), rtol=1e-5)
    assert torch.equal(out["kl_u"], torch.zeros(8))


def test_gradients_reach_both_encoders_the_decoder_and_mu():
    model = tiny_model()
    model(torch.rand(2, 4, 1, 5, 5))["loss"].mean().backward()
    for part in (model.z_encoder, model.u_encoder, model.decoder, model.grouper):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_loss_is_bernoulli_nll_plus_both_analytic_kls():
    torch.manual_seed(0)
    model, x = tiny_model(), torch.rand(2, 4, 1, 5, 5)
    out = model(x)
    p = out["probs"].clamp(torch.finfo(torch.float32).eps, 1 - torch.finfo(torch.float32).eps)
    nll = -torch.distributions.Bernoulli(probs=p, validate_args=False).log_prob(x.flatten(0, 1).flatten(1)).sum(1)
    assert torch.allclose(out["nll"], nll, rtol=1e-5)
    assert torch.allclose(out["loss"], out["nll"] + out["kl_z"] + out["kl_u"])


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


def test_capsule_offsets_recover_the_true_index_of_a_rolled_code():
    B, S, caps, D = 6, 15, 4, 15
    # A sequence whose frame i is frame 0 rolled by i; the factor starts at index j0 and wraps at 15.
    start = torch.tensor([0, 3, 7, 14, 9, 1])
    factor = torch.tensor([2, 3, 4, 2, 3, 4])
    labels = torch.zeros(B, S, 5, dtype=torch.long)
    for b in range(B):
        labels[b, :, factor[b]] = (start[b] + torch.arange(S)) % 15
    first = torch.randn(B, 1, caps, D)
    code = torch.cat([first.roll(i, dims=3) for i in range(S)], dim=1).view(B * S, caps * D)
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


def test_prior_samples_and_capsule_traversal_have_the_picture_shapes():
    model = tiny_model()
    assert model.sample(3, 4).shape == (3, 4, 1, 5, 5)
    inputs, reconstructions, rolled = model.capsule_traversal(torch.rand(4, 1, 5, 5), 2, 4)
    assert inputs.shape == reconstructions.shape == (4, 1, 5, 5) and rolled.shape == (4, 1, 5, 5)


def test_capsule_traversal_roll_zero_decodes_frame_zero():
    model = tiny_model()
    _, reconstructions, rolled = model.capsule_traversal(torch.rand(4, 1, 5, 5), 2, 4)
    assert torch.allclose(rolled[0], reconstructions[0])


def test_registry_holds_the_16_paper_experiments_with_the_named_options():
    assert len(experiments.EXPERIMENTS) == 16
    keys = {"n_caps", "cap_dim", "n_transforms", "mu_init", "n_off_diag", "group_kernel", "lr",
            "momentum", "max_epochs", "eval_epochs", "batch_size", "n_is_samples",
            "max_transform_len", "seed", "wandb_on"}
    for config in experiments.EXPERIMENTS.values():
        assert keys <= config.keys()
    assert experiments.EXPERIMENTS["tvae_Lpartial_mnist"]["group_kernel"] == (13, 13, 1)
    assert experiments.EXPERIMENTS["tvae_L0_dsprites"]["eps"] == 1e-3


# ─── The training function and the command line (experiments.py) ─────────────

def write_idx_gz(path, array):
    """A standard IDX file (gzip): magic 0x0000080N (N = number of dims, uint8 data), dims, bytes."""
    header = bytes([0, 0, 8, array.dim()]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(array.flatten().tolist()))


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """A tiny MNIST look-alike: 40 training and 12 test 'digits' in the four standard files."""
    folder = tmp_path_factory.mktemp("mnist")
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        images[:, 8:20, 10:16] = torch.randint(100, 256, (n, 12, 6), generator=generator, dtype=torch.uint8)
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).to(torch.uint8))
    return folder


@pytest.fixture(scope="module")
def procedural_dsprites():
    return datasets.render_dsprites()


def quick_config(name, **overrides):
    """The experiment's config, cut down to one short epoch on a few sequences."""
    config = dict(experiments.EXPERIMENTS[name], max_epochs=1, batch_size=4, train_sequences=8,
                  test_sequences=2, n_is_samples=2)
    config.update(overrides)
    return config


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_every_experiment_runs_one_short_epoch_end_to_end(name, tmp_path, mnist_dir, procedural_dsprites, monkeypatch):
    monkeypatch.setattr(datasets, "render_dsprites", lambda: procedural_dsprites)
    config = quick_config(name, test_sequences=12 if name == "tvae_2d_mnist" else 2)
    records, interrupted = experiments.train(config, tmp_path, mnist_dir, "cpu", dsprites_source="procedural")
    assert not interrupted
    saved = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert saved == records and all({"epoch", "step"} <= r.keys() for r in saved)
    train_line, test_line = saved
    for key in ("train_loss", "train_nll", "train_kl", "test_log_likelihood"):
        assert math.isfinite((train_line | test_line)[key])
    if config["n_transforms"] > 1:
        assert math.isfinite(train_line["train_eq_error"]) and math.isfinite(test_line["test_eq_error"])
        assert (tmp_path / "traversal_000.png").exists()
    if config["data"] == "dsprites":
        assert set(train_line["capsule_correlation"]) == {"scale", "orientation", "posX", "posY"}
    if config["grouper"] == "map2d":
        for picture in ("samples", "max_activation", "selectivity", "reconstruction"):
            assert (tmp_path / f"{picture}_000.png").exists()
    assert json.loads((tmp_path / "config.json").read_text())["name"] == name
    assert (tmp_path / "checkpoint.pt").exists()


class InterruptAt(experiments.Progress):
    """A progress display that presses Ctrl-C (sends SIGINT) after a given step."""

    def __init__(self, step):
        super().__init__(io.StringIO())
        self.step, self.steps = step, 0

    def update(self, batch, sequences, running_loss):
        self.steps += 1
        if self.steps == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, mnist_dir):
    config = quick_config("tvae_Lshort_mnist", max_epochs=2, train_sequences=12, eval_epochs=1)
    whole, _ = experiments.train(config, tmp_path / "whole", mnist_dir, progress=InterruptAt(None))
    _, interrupted = experiments.train(config, tmp_path / "parts", mnist_dir, progress=InterruptAt(2))
    assert interrupted                                   # stopped mid-epoch 0, after step 2 of 3
    resumed, interrupted = experiments.train(config, tmp_path / "parts", mnist_dir, resume=True,
                                             progress=InterruptAt(None))
    assert not interrupted and resumed == whole
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_unknown_name_exits_2_and_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as stop:
        experiments.main(["tvae_lhalf_mnist"])
    assert stop.value.code == 2 and "tvae_Lhalf_mnist" in capsys.readouterr().err


def test_list_names_all_16_experiments(capsys):
    assert experiments.main(["--list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 16


def test_a_nan_loss_stops_the_run_naming_the_step_and_term(tmp_path, mnist_dir, capsys):
    status = experiments.main(["tvae_Lshort_mnist", "--data-dir", str(mnist_dir), "--out", str(tmp_path),
                               "--train-sequences", "8", "--set", "mu_init=NaN", "--device", "cpu"])
    error = capsys.readouterr().err
    assert status == 1 and "step 1" in error and "loss" in error and "Traceback" not in error


def test_png_writer_output_decodes_back_to_the_pixels_written(tmp_path):
    image = torch.rand(3, 5, 7)
    experiments.write_png(tmp_path / "a.png", image)
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
