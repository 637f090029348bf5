"""Every experiment of the paper, one training loop, and the command line.

    python experiments.py tvae_Lhalf_mnist                 # train (Table 1, L = 1/2)
    python experiments.py --list                           # what each experiment reproduces
    python experiments.py --show tvae_Lhalf_mnist          # its whole config
    python experiments.py tvae_Lhalf_mnist --train-sequences 64 --epochs 2   # a quick look
    python experiments.py --report runs/*                  # the paper's tables from finished runs

Read it in this order: the registry EXPERIMENTS (one config per experiment of
the paper, keys named as the authors' code names its options), build_model,
train (the loop), evaluate, the pictures; then the machinery: data plumbing,
the run folder, the benchmark, the report and the command line.
"""
import argparse
import copy
import difflib
import json
import math
import os
import signal
import sys
import time
import warnings
import zlib
from pathlib import Path

# torch warns at import when numpy is absent; this project never uses numpy, so that warning is noise.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
import torch  # noqa: E402  (after the filter above)

import datasets  # noqa: E402
import tvae  # noqa: E402

# ─── The registry: the paper's experiments ───────────────────────────────────
# Shared by all experiments unless overridden: SGD lr 1e-4, momentum 0.9,
# batches of 8 sequences, 100 epochs, evaluation every 5 epochs from epoch 0,
# 10 importance samples for log p(x).
_COMMON = dict(lr=1e-4, momentum=0.9, batch_size=8, max_epochs=100, eval_epochs=5,
               n_is_samples=10, eps=1e-6, mu_init=30.0, n_off_diag=None, map_shape=None,
               train_sequences=None, test_sequences=None, wandb_on=False, table=None)
# MNIST: 18 capsules of 18 units; sequences of S = 18 frames of 28×28 digits, RGB
# (the digit in the red channel) because the hue may change (datasets.py).
_MNIST = dict(_COMMON, data="mnist", train_kind="single", test_kind="single",
              n_caps=18, cap_dim=18, n_transforms=18)
# dSprites: 15 capsules of 15 units; sequences of S = 15 frames of 64×64 sprites,
# from the published file or drawn procedurally (dsprites_source: "file" or "procedural").
_DSPRITES = dict(_COMMON, data="dsprites", train_kind="dsprites", test_kind="dsprites",
                 n_caps=15, cap_dim=15, n_transforms=15, dsprites_source="file", seed=1)


def _shifting(kernel, n_off_diag):
    """Shifting capsules (tvae.py, the grouper): a kT = kC = kernel window that moves one unit per frame.

    The paper's L = kT / (2S) is the share of the capsule the window covers in
    time, and K = 2·n_off_diag + 1 its width in units within a frame.
    """
    return dict(grouper="shifting", group_kernel=(kernel, kernel), n_off_diag=n_off_diag)


def _stationary(k_time, k_capsule):
    """Stationary capsules: every unit within k_time frames × k_capsule units, no shift (Bubbles, L = 0)."""
    return dict(grouper="stationary", group_kernel=(k_time, k_capsule))


_VAE = dict(grouper="none", group_kernel=None, mu_init=None)

EXPERIMENTS = {
    # Figure 3: one capsule of 324 units on an 18×18 torus, 5×5 neighbourhoods, single digits.
    "tvae_2d_mnist": dict(_MNIST, train_kind="none", test_kind="none", grouper="map2d",
                          n_caps=1, cap_dim=324, n_transforms=1, map_shape=(18, 18),
                          group_kernel=(5, 5), mu_init=10.0, batch_size=128, max_epochs=250,
                          seed=1, paper="Figure 3 (2-D topographic map)"),
    # Table 1 and Figure 4, MNIST, S = 18: L = 18/36 = 1/2, 13/36, 5/36; K = 3 throughout.
    "tvae_Lhalf_mnist": dict(_MNIST, table="Table 1", **_shifting(18, 1), seed=1, paper="Table 1, L=1/2"),
    "tvae_Lpartial_mnist": dict(_MNIST, **_shifting(13, 1), seed=2, paper="Figure 4 (MNIST), L=13/36"),
    "tvae_Lshort_mnist": dict(_MNIST, table="Table 1", **_shifting(5, 1), seed=2, paper="Table 1, L=5/36"),
    "bubbles_mnist": dict(_MNIST, table="Table 1", **_stationary(5, 3), seed=1, paper="Table 1, Bubbles"),
    "tvae_L0_mnist": dict(_MNIST, table="Table 1", **_stationary(1, 3), seed=1, paper="Table 1, L=0"),
    "nontvae_mnist": dict(_MNIST, table="Table 1", **_VAE, seed=1, paper="Table 1, VAE"),
    # Figures 1, 6, Section B.4: trained on one transformation at a time, tested on rotation and colour together.
    "tvae_Lpartial_mnist_generalization": dict(
        _MNIST, **_shifting(13, 1), test_kind="dual", seed=2,
        paper="Figures 1, 6, Section B.4 (train single, test rotation+colour)"),
    "tvae_Lpartial_rotcolor_mnist": dict(_MNIST, **_shifting(13, 1), train_kind="dual",
                                         test_kind="dual", seed=1, paper="Figure 23 (rotation+colour)"),
    "tvae_Lpartial_perspective_mnist": dict(_MNIST, **_shifting(13, 1), train_kind="perspective",
                                            test_kind="perspective", seed=1,
                                            paper="Figure 22 (perspective+colour)"),
    # Table 2 and Figure 4, dSprites, S = 15: L = 15/30 = 1/2, 10/30 = 1/3, 5/30 = 1/6; K = 1.
    "tvae_Lhalf_dsprites": dict(_DSPRITES, table="Table 2", **_shifting(15, 0), paper="Table 2, L=1/2"),
    "tvae_Lpartial_dsprites": dict(_DSPRITES, table="Table 2", **_shifting(10, 0), paper="Figure 4 (dSprites), Table 2, L=1/3"),
    "tvae_Lshort_dsprites": dict(_DSPRITES, table="Table 2", **_shifting(5, 0), paper="Table 2, L=1/6"),
    "bubbles_dsprites": dict(_DSPRITES, table="Table 2", **_stationary(5, 5), paper="Table 2, Bubbles"),
    "tvae_L0_dsprites": dict(_DSPRITES, table="Table 2", **_stationary(1, 3), eps=1e-3, paper="Table 2, L=0"),
    "nontvae_dsprites": dict(_DSPRITES, table="Table 2", **_VAE, paper="Table 2, VAE"),
}
for _name, _config in EXPERIMENTS.items():
    _config["name"] = _name


def image_shape(config):
    """(C, H, W) of the experiment's images: RGB digits when colour changes."""
    if config["data"] == "dsprites":
        return (1, 64, 64)
    return (1 if config["train_kind"] == "none" else 3, 28, 28)


def build_model(config):
    """The TVAE of an experiment config, with its grouper (None for the VAE baseline)."""
    d = config["n_caps"] * config["cap_dim"]
    if config["grouper"] == "none":
        return tvae.TVAE(image_shape(config), d)
    n_off_diag = config["n_off_diag"] if config["grouper"] == "shifting" else None
    grouper = tvae.Grouper(tvae.topographic_kernel(*config["group_kernel"], n_off_diag),
                           config["n_transforms"], config["n_caps"], config["cap_dim"],
                           config["mu_init"], config["eps"],
                           tuple(config["map_shape"]) if config["map_shape"] else None)
    return tvae.TVAE(image_shape(config), d, grouper)


def sgd(parameters, config, device):
    """SGD with momentum, constant learning rate; the fused kernel where torch has one (faster here)."""
    return torch.optim.SGD(parameters, lr=config["lr"], momentum=config["momentum"],
                           fused=torch.device(device).type in ("cpu", "cuda"))


# ─── Training ────────────────────────────────────────────────────────────────

TERMS = ("loss", "nll", "kl", "eq_error")     # what a training step measures, averaged per epoch


def train_step(model, optimizer, x, config):
    """One SGD step on the ELBO of a batch of sequences x (B, S, C, H, W); returns the terms and t.

    The terms are read to the host once (one wait for the device) and checked
    before the update, so a NaN never reaches the weights.
    """
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    out = model(x)                                                # per-image terms (N,), t (N, d)
    loss = out["loss"].mean()                                     # tvae.py Eq. (8), mean over images
    with torch.no_grad():
        eq = tvae.equivariance_error(out["t"], S, caps, D) if S > 1 else torch.zeros((), device=x.device)
        kl = (out["kl_z"] + out["kl_u"]).mean()
        values = dict(zip(TERMS, torch.stack([loss, out["nll"].mean(), kl, eq]).tolist()))
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteLoss(f"non-finite {', '.join(bad)} (values {values})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return values, out["t"].detach()


def train(config, out_dir, data_dir=None, device="cpu", resume=False, overwrite=False, progress=None):
    """Train one experiment for config['max_epochs'] epochs, writing its files into out_dir.

    Before training and after every eval_epochs epochs (and after the last), an
    evaluation on the fixed test sequences with its pictures; after every epoch,
    a metrics line of the epoch's averages and a checkpoint. A checkpoint is
    also written every CHECKPOINT_EVERY_S seconds within an epoch, so that a run
    killed without warning loses at most that much. Ctrl-C or SIGTERM stops
    after the current step with a checkpoint, and resume=True continues to the
    same result as an unbroken run. Epochs are counted as epochs trained: the
    evaluation at epoch 0 is the untrained model. Returns (the run's metrics
    records, whether a signal stopped it).
    """
    validate_config(config)
    device = torch.device(device)
    with RunFolder(out_dir, config, device, resume, overwrite) as run, StopOnSignal() as stop:
        torch.manual_seed(config["seed"])
        generator = torch.Generator().manual_seed(config["seed"])        # every random choice of the data
        model = build_model(config).to(device)
        optimizer = sgd(model.parameters(), config, device)
        data = load_data(config, data_dir, device)
        state = run.restore(model, optimizer, generator, device)        # epoch, batch, step, plan, sums
        progress = progress or Progress()
        while True:
            if evaluation_due(state, config):
                model.eval()
                run.log({"epoch": state["epoch"], "step": state["step"],
                         **evaluate(model, data, config, run.folder, state["epoch"])})
                state["evaluated"] = state["epoch"]
                run.save(model, optimizer, generator, state)
            if state["epoch"] >= config["max_epochs"] or stop.requested:
                return run.records, stop.requested
            if state["plan"] is None:       # a new epoch: every training sequence once, in a new order
                state.update(plan=data.plan_epoch(generator), batch=0, sums=dict.fromkeys(TERMS, 0.0), offsets=[])
            model.train()
            progress.start_epoch(state["epoch"], config["max_epochs"], len(state["plan"]), state["batch"])
            for rows in state["plan"][state["batch"]:]:
                x, labels = data.batch(rows, generator)                  # (B, S, C, H, W), (B, S, ...)
                try:
                    values, t = train_step(model, optimizer, x, config)
                except NonFiniteLoss as error:
                    raise NonFiniteLoss(f"{error} in epoch {state['epoch'] + 1}, step {state['step'] + 1}; "
                                        f"the last good checkpoint is {run.checkpoint_note()}") from None
                if config["data"] == "dsprites":
                    state["offsets"].append(tvae.capsule_offsets(t, labels, config["n_caps"], config["cap_dim"]))
                state["sums"] = {name: state["sums"][name] + value for name, value in values.items()}
                state["batch"] += 1
                state["step"] += 1
                progress.update(state["batch"] - 1, len(x), state["sums"]["loss"] / state["batch"])
                if stop.requested or run.checkpoint_due():
                    run.save(model, optimizer, generator, state)
                    if stop.requested:
                        return run.records, True
            progress.end_epoch()
            state["epoch"] += 1
            run.log(epoch_record(state, config))
            state["plan"] = None
            run.save(model, optimizer, generator, state)


def evaluation_due(state, config):
    """Evaluate at epochs trained 0, eval_epochs, 2·eval_epochs, … and at the last, each once."""
    epoch = state["epoch"]
    due = epoch % config["eval_epochs"] == 0 or epoch == config["max_epochs"]
    return due and state["evaluated"] != epoch


def epoch_record(state, config):
    """The metrics line of a finished epoch: averages of the training terms over its batches."""
    record = {"epoch": state["epoch"], "step": state["step"],
              **{f"train_{name}": total / len(state["plan"]) for name, total in state["sums"].items()}}
    if config["n_transforms"] == 1:                                      # no sequences, no E_eq
        del record["train_eq_error"]
    if state["offsets"]:
        record["capsule_correlation"] = _correlations(state["offsets"])
    return record


# ─── Evaluation ──────────────────────────────────────────────────────────────

@torch.no_grad()
def evaluate(model, data, config, out_dir, epoch):
    """Test log p(x) (tvae.py Eqs. (10)–(11)) and E_eq (Eq. (9)) on the fixed test sequences, and the pictures.

    Pictures: the capsule traversal of the first test sequence (Figures 1, 4, 6)
    and prior samples; for the 2-D model, Figure 3 (write_figure3) and its
    topography number (tvae.topographic_agreement). dSprites adds Table 2's
    capsule correlations.
    """
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    n_sequences = log_likelihood = eq_error = 0.0
    offsets, first_batch, images, codes, digit_classes = [], None, [], [], []
    roll_sums = {}                                  # transformation kind → Σ (E_static, E_roll, E_self)
    for x, labels, classes in data.test_batches(max(config["batch_size"], 32)):
        out = model(x)
        log_likelihood += model.log_likelihood(x, config["n_is_samples"]).sum().item()
        n_sequences += len(x)
        if S > 1:
            eq_error += tvae.equivariance_error(out["t"], S, caps, D).item() * len(x)
            errors = tvae.roll_errors(model.decoder, x, out["t"], out["probs"], caps, D).cpu()   # (B, 3)
            for kind, error in zip(sequence_kinds(labels, config), errors):
                roll_sums[kind] = roll_sums.get(kind, 0) + error
        if first_batch is None:
            first_batch, first_labels = x, labels
        if config["data"] == "dsprites":
            offsets.append(tvae.capsule_offsets(out["t"], labels, caps, D))
        if config["grouper"] == "map2d":        # kept for the Figure 3 pictures
            images.append(x.flatten(0, 1).cpu())
            codes.append(out["t"].cpu())
            digit_classes.append(classes.cpu())
    record = {"test_sequences": int(n_sequences), "test_log_likelihood": log_likelihood / (n_sequences * S)}
    if S > 1:
        record["test_eq_error"] = eq_error / n_sequences
        gains = {kind: tvae.roll_gains(roll_sums[kind]) for kind in sorted(roll_sums, key=KINDS.index)}
        record["test_roll_gain"] = {kind: roll.item() for kind, (roll, own) in gains.items()}
        record["test_self_gain"] = {kind: own.item() for kind, (roll, own) in gains.items()}
        generator = torch.Generator().manual_seed(config["seed"])    # the same noise every epoch
        rows = [row for i in _traversal_examples(first_labels, config) for row in
                model.capsule_traversal(first_batch[i], caps, D, generator)]       # 3 rows per example
        write_png(out_dir / f"traversal_{epoch:03d}.png", image_grid(rows), _scale(config))
        write_png(out_dir / f"samples_{epoch:03d}.png", image_grid(list(model.sample(4, S))), _scale(config))
    if offsets:
        record["test_capsule_correlation"] = _correlations(offsets)
    if config["grouper"] == "map2d":
        t, classes = torch.cat(codes), torch.cat(digit_classes)
        labels = tvae.class_selectivity(t, classes)
        share, shuffled = tvae.topographic_agreement(labels, tuple(config["map_shape"]),
                                                     generator=torch.Generator().manual_seed(0))
        finite = [None if math.isnan(value) else value for value in (share, shuffled)]   # no pairs: null
        record["test_topography"] = {"selective_units": int((labels >= 0).sum()),
                                     "same_class_neighbours": finite[0], "shuffled": finite[1],
                                     "ratio": share / shuffled if None not in finite and shuffled else None}
        write_figure3(model, first_batch, torch.cat(images), t, classes, labels,
                      config["map_shape"], out_dir, epoch, _scale(config))
    return record


# The transformation a test sequence walks: MNIST 'single' picks one of three, 'dual' and
# 'perspective' walk two together, and a dSprites sequence moves one factor.
KINDS = ("rotation", "scale", "hue", "rotation+hue", "perspective+hue", "orientation", "posX", "posY")
DSPRITES_FACTORS = {1: "scale", 2: "orientation", 3: "posX", 4: "posY"}


def sequence_kinds(labels, config):
    """The name of the transformation each sequence of a test batch walks (its roll gain's row)."""
    if config["data"] == "dsprites":
        moving = (labels[:, 1] != labels[:, 0]).int().argmax(dim=1)        # the factor that changes, (B,)
        return [DSPRITES_FACTORS[f] for f in moving.tolist()]
    if config["test_kind"] == "single":
        return [KINDS[k] for k in labels["transform"].tolist()]            # 0 rotation, 1 scale, 2 hue
    return [{"dual": "rotation+hue", "perspective": "perspective+hue"}[config["test_kind"]]] * len(labels["transform"])


def _traversal_examples(labels, config):
    """Which test sequences of the first batch get a traversal: one per transformation for MNIST 'single'."""
    if config["test_kind"] != "single":
        return [0]
    kinds = labels["transform"].tolist()                        # 0 rotation, 1 scale, 2 hue
    return [kinds.index(kind) for kind in (0, 1, 2) if kind in kinds]


def _correlations(offsets):
    """Per factor, the Pearson correlation of estimated and true capsule offsets (Table 2)."""
    factor, estimate, truth = (torch.cat(part) for part in zip(*offsets))
    correlations = {}
    for f, name in DSPRITES_FACTORS.items():
        r = tvae.pearson(estimate[factor == f], truth[factor == f]).item()
        correlations[name] = r if math.isfinite(r) else None    # None: too few or constant offsets
    return correlations


def _scale(config):
    """How much a picture is enlarged: 3× for MNIST's 28-pixel frames, 2× for dSprites' 64."""
    return max(2, 84 // image_shape(config)[1])


def write_figure3(model, first_batch, images, t, classes, labels, map_shape, out_dir, epoch, scale):
    """The pictures of the 2-D model (Figure 3) from a pass over the test set.

    images (n, C, H, W) and t (n, d) of the n test digits, classes (n,), labels (d,) each unit's class; pictures enlarged scale×.
    """
    write_png(out_dir / f"samples_{epoch:03d}.png", image_grid(list(model.sample(100, 1)[:, 0].split(10))), scale)
    most_active = images[t.abs().argmax(dim=0)]                              # (d, C, H, W)
    write_png(out_dir / f"max_activation_{epoch:03d}.png", image_grid(list(most_active.split(map_shape[1]))), scale)
    class_means = torch.stack([images[classes == c].mean(0).nan_to_num() for c in range(10)])  # (10, C, H, W)
    write_png(out_dir / f"selectivity_{epoch:03d}.png",
              selectivity_picture(labels, map_shape, class_means), scale)
    digits = first_batch[:16]                                                # (16, 1, C, H, W)
    reconstructions = model(digits)["probs"].view(digits.shape)
    write_png(out_dir / f"reconstruction_{epoch:03d}.png", image_grid([digits[:, 0], reconstructions[:, 0]]), scale)


# ─── Pictures: PNG files written with zlib alone ─────────────────────────────

def write_png(path, image, scale=1):
    """Write image (C, H, W), C = 1 (grey) or 3 (RGB), values in [0, 1], as an 8-bit PNG, scale× enlarged."""
    pixels = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)      # nearest neighbour
    channels, height, width = pixels.shape
    rows = pixels.permute(1, 2, 0).reshape(height, width * channels)
    scanlines = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], dim=1)  # filter type 0 per row

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, {1: 0, 3: 2}[channels], 0, 0, 0])
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + chunk(b"IDAT", zlib.compress(bytes(scanlines.flatten().tolist()), 6))
                           + chunk(b"IEND", b""))


def image_grid(rows, pad=2, background=0.5):
    """Lay out rows of images [(n_i, C, H, W), …] on one canvas (C', H', W'), grey between cells."""
    channels = max(row.shape[1] for row in rows)
    _, _, height, width = rows[0].shape
    n_cols = max(len(row) for row in rows)
    canvas = torch.full((channels, pad + len(rows) * (height + pad), pad + n_cols * (width + pad)), background)
    for r, row in enumerate(rows):
        for c, image in enumerate(row.detach().cpu().float()):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            canvas[:, top:top + height, left:left + width] = image.expand(channels, -1, -1)
    return canvas


# Ten distinguishable colours for the digit classes of the selectivity map (Figure 3); no grey,
# which is the colour between cells, and no black, which marks units without a class.
CLASS_COLOURS = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                              [148, 103, 189], [140, 86, 75], [227, 119, 194], [255, 255, 255],
                              [188, 189, 34], [23, 190, 207]]) / 255


def selectivity_picture(labels, map_shape, class_means):
    """The class-selectivity map of Figure 3 as one RGB image.

    labels (d,): the class each unit prefers, or −1 (black). Units are drawn as
    solid squares on the rows × cols map; under it, the legend row: the mean
    test digit of each class 0…9 (class_means (10, C, H, W)) tinted in its colour.
    """
    colours = torch.cat([CLASS_COLOURS, torch.zeros(1, 3)])[labels.cpu()]       # −1 → black, (d, 3)
    height, width = class_means.shape[2:]
    cells = colours[:, :, None, None].expand(-1, -1, height, width)              # (d, 3, H, W)
    means = class_means.cpu().mean(1, keepdim=True)                             # grey, (10, 1, H, W)
    legend = means / means.amax(dim=(2, 3), keepdim=True).clamp(min=1e-8) * CLASS_COLOURS[:, :, None, None]
    return image_grid([*cells.split(map_shape[1]), legend])


# ─── Progress on long runs ───────────────────────────────────────────────────

def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """step/total, sequences/second, running loss, time left: in place on a terminal, else a line every 30 s."""

    def __init__(self, stream=sys.stderr, every=30.0):
        self.stream, self.in_place = stream, stream.isatty()
        self.every = 0.2 if self.in_place else every
        self.last = 0.0

    def start_epoch(self, epoch, n_epochs, n_batches, done):
        self.epoch, self.n_epochs, self.n_batches = epoch, n_epochs, n_batches
        self.t0, self.done0 = time.perf_counter(), done

    def update(self, batch, sequences, running_loss):
        now = time.perf_counter()
        if now - self.last < self.every and batch + 1 < self.n_batches:
            return
        self.last = now
        rate = (batch + 1 - self.done0) / max(now - self.t0, 1e-9)          # batches per second
        left = (self.n_batches - batch - 1) / rate
        left_run = left + (self.n_epochs - self.epoch - 1) * self.n_batches / rate
        line = (f"epoch {self.epoch + 1}/{self.n_epochs}  step {batch + 1}/{self.n_batches}  "
                f"{rate * sequences:.1f} seq/s  loss {running_loss:.1f}  "
                f"left: epoch {_duration(left)}, run {_duration(left_run)}")
        self.stream.write(f"\r{line}\033[K" if self.in_place else line + "\n")
        self.stream.flush()

    def end_epoch(self):
        if self.in_place:
            self.stream.write("\n")



# ─── Data: the same three calls for MNIST and dSprites ───────────────────────
# An epoch is planned up front as a (n_batches, B, k) tensor of what to draw, so
# a checkpoint can hold it and a resumed run continues mid-epoch exactly where
# the interrupted one stopped. Sequences are generated batch by batch on the
# training device (datasets.py); random choices come from one CPU generator.

class MnistData:
    """MNIST digits on the device; their transformation sequences (datasets.py) made per batch."""

    def __init__(self, config, data_dir, device):
        split = datasets.mnist_train_test(data_dir, seed=config["seed"])
        self.train_digits = split["train"][0].to(device)
        self.test_digits, self.test_classes = (part.to(device) for part in split["test"])
        self.config = config

    def plan_epoch(self, generator):
        """Each training digit once, shuffled: (n_batches, B, 1) digit indices."""
        order = torch.randperm(len(self.train_digits), generator=generator)
        return _whole_batches(order[:self.config["train_sequences"]], self.config["batch_size"])[..., None]

    def batch(self, rows, generator):
        """x (B, S, C, H, W) and labels for one row of the plan."""
        digits = self.train_digits[rows[:, 0].to(self.train_digits.device)]
        return datasets.mnist_sequences(digits, self.config["train_kind"],
                                        image_shape(self.config)[0] == 3, generator)

    def test_batches(self, batch_size):
        """The fixed test sequences: the same for every evaluation of every run with this seed."""
        generator = torch.Generator().manual_seed(self.config["seed"])
        n = min(len(self.test_digits), self.config["test_sequences"] or len(self.test_digits))
        for start in range(0, n, batch_size):
            digits = self.test_digits[start:min(start + batch_size, n)]
            x, labels = datasets.mnist_sequences(digits, self.config["test_kind"],
                                                 image_shape(self.config)[0] == 3, generator)
            yield x, labels, self.test_classes[start:start + len(digits)]


class DspritesData:
    """The dSprites sub-grid on the device (the real file or the procedural renderer)."""

    TEST_SEQUENCES = 1024   # dSprites has no test split: a fixed set of sequences for evaluation

    def __init__(self, config, data_dir, device):
        if config["dsprites_source"] == "procedural":
            grid = datasets.render_dsprites()
        else:
            grid = datasets.load_dsprites(Path(data_dir) / datasets.DSPRITES_FILE)
        self.grid = grid.to(device)
        self.config = config

    def plan_epoch(self, generator):
        """Every grid point once as a start, shuffled, with a random factor: (n_batches, B, 6)."""
        batches = [torch.cat([starts, factors[:, None]], dim=1) for starts, factors in
                   datasets.dsprites_epoch(self.config["train_sequences"], self.config["batch_size"], generator)]
        if not batches:
            raise datasets.DataError(f"fewer sequences ({self.config['train_sequences']}) than one batch")
        return torch.stack(batches)

    def batch(self, rows, generator):
        rows = rows.to(self.grid.device)
        return datasets.dsprites_sequences(self.grid, rows[:, :5], rows[:, 5], self.config["n_transforms"])

    def test_batches(self, batch_size):
        generator = torch.Generator().manual_seed(self.config["seed"])
        n = self.config["test_sequences"] or self.TEST_SEQUENCES   # in whole batches
        for starts, factors in datasets.dsprites_epoch(n, min(batch_size, n), generator):
            x, labels = datasets.dsprites_sequences(self.grid, starts.to(self.grid.device),
                                                    factors.to(self.grid.device), self.config["n_transforms"])
            yield x, labels, None


def _whole_batches(order, batch_size):
    """(n,) → (n // batch_size, batch_size): the last partial batch is dropped ."""
    n_batches = len(order) // batch_size
    if n_batches == 0:
        raise datasets.DataError(f"fewer sequences ({len(order)}) than one batch ({batch_size})")
    return order[:n_batches * batch_size].view(n_batches, batch_size)


def load_data(config, data_dir, device):
    """The experiment's data on the device: MnistData or DspritesData."""
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise datasets.DataError(f"--data-dir {data_dir} is a file; it must be a folder for the data files")
    if config["data"] == "mnist":
        return MnistData(config, data_dir, device)
    return DspritesData(config, data_dir, device)




# ─── The run folder: what a run writes, and the rules that keep it whole ──────

class RunError(RuntimeError):
    """A run cannot start or go on; str() is one line that says why and what to do."""


class NonFiniteLoss(RunError):
    """The loss became NaN or infinite; the run stops before the update, leaving the last checkpoint."""


# Keys that --resume may change in a saved run: they apply from the resumed step on.
# Everything else fixes the model, the data or the test set, and is refused.
CHANGEABLE_ON_RESUME = ("max_epochs", "eval_epochs", "lr", "momentum", "n_is_samples", "test_sequences", "wandb_on")
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt")
CHECKPOINT_EVERY_S = 600          # within an epoch: what a run killed without warning can lose


class RunFolder:
    """The files of one run in out_dir: config.json, metrics.jsonl, checkpoint.pt and the pictures.

    Opening it (a `with` block) takes a lock file holding this process's id, so
    that a second run into the same folder is refused; a lock left by a killed
    process is noticed and replaced. A folder that holds a run is continued
    only with resume=True (the checkpoint's config must be the same experiment,
    changed at most in CHANGEABLE_ON_RESUME) and replaced only with overwrite=True.
    """

    def __init__(self, out_dir, config, device, resume=False, overwrite=False):
        self.folder, self.config, self.device = Path(out_dir), config, str(device)
        self.resume, self.overwrite = resume, overwrite
        self.checkpoint_path, self.metrics_path = self.folder / "checkpoint.pt", self.folder / "metrics.jsonl"
        self.lock_path = self.folder / ".lock"
        self.records, self.checkpoint, self.wandb = [], None, None

    def __enter__(self):
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunError(f"--out {self.folder}: cannot make that folder ({error.strerror})") from None
        self._lock()
        try:
            self._open()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc):
        self._unlock()

    def _lock(self):
        for _ in range(2):
            try:
                descriptor = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _read_pid(self.lock_path)
                if pid is not None and _alive(pid):
                    raise RunError(f"--out {self.folder} is in use by another run (process {pid}); "
                                   f"wait for it to end, or choose another --out") from None
                print(f"warning: removing a stale lock {self.lock_path} (its process {pid} is gone)", file=sys.stderr)
                self.lock_path.unlink(missing_ok=True)
                continue
            except OSError as error:
                raise RunError(f"--out {self.folder}: cannot write there ({error.strerror})") from None
            with os.fdopen(descriptor, "w") as f:
                f.write(str(os.getpid()))
            return
        raise RunError(f"--out {self.folder}: cannot take its lock file {self.lock_path}")

    def _unlock(self):
        if _read_pid(self.lock_path) == os.getpid():
            self.lock_path.unlink(missing_ok=True)

    def _open(self):
        """Check the folder against resume/overwrite, read what a resumed run needs, write config.json."""
        holds_run = any((self.folder / name).exists() for name in RUN_FILES)
        if self.resume:
            self.checkpoint = self._read_checkpoint()
            self._check_changes(self.checkpoint["config"])
            self.records = self.checkpoint["metrics"]
        elif holds_run and not self.overwrite:
            raise RunError(f"--out {self.folder} holds a run already: continue it with --resume, "
                           f"or replace it with --overwrite")
        elif holds_run:                                     # --overwrite: nothing of the old run stays
            for path in [*(self.folder / name for name in RUN_FILES), *self.folder.glob("*.png")]:
                path.unlink(missing_ok=True)
        _write_atomically(self.folder / "config.json", json.dumps(self.config, indent=2) + "\n")
        _write_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
        if self.config["wandb_on"]:
            self.wandb = _start_wandb(self.config, self.folder)
        self.started = self.saved_at = time.perf_counter()
        self.wall_before = self.checkpoint["state"]["wall_s"] if self.checkpoint else 0.0

    def _read_checkpoint(self):
        if not self.checkpoint_path.exists():
            raise RunError(f"--resume: no checkpoint in {self.folder} (start without --resume)")
        try:   # weights_only: a checkpoint is data; torch refuses to run code a crafted file asks for
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as error:          # whatever torch.load meets in a damaged or foreign file
            first_line = (str(error).splitlines() or [""])[0][:200]
            raise RunError(f"cannot read {self.checkpoint_path} ({type(error).__name__}: {first_line}); "
                           f"start again with --overwrite, or into another --out") from None

    def _check_changes(self, saved):
        """Refuse a resume under another name or with changes that cannot apply to a saved run."""
        if saved["name"] != self.config["name"]:
            raise RunError(f"--resume: {self.folder} holds a run of {saved['name']}, not {self.config['name']}")
        changed = {key: (saved.get(key), value) for key, value in self.config.items()
                   if _as_json(saved.get(key)) != _as_json(value)}
        fixed = sorted(set(changed) - set(CHANGEABLE_ON_RESUME))
        if fixed:
            old, new = changed[fixed[0]]
            raise RunError(f"--resume: {fixed[0]} cannot change in a saved run (it ran with {json.dumps(old)}, "
                           f"asked {json.dumps(new)}); start a new run with another --out")
        self.changes = changed

    def restore(self, model, optimizer, generator, device):
        """The run's state: fresh, or the checkpoint's (weights, optimizer, RNGs) with the allowed changes applied.

        Prints the run's first line: the experiment, the device, and where it starts (with what changed).
        """
        where = f"{self.config['name']}: {self.config['paper']}; {self.device}; "
        if self.checkpoint is None:
            print(where + f"writing to {self.folder}", file=sys.stderr)
            return {"epoch": 0, "batch": 0, "step": 0, "plan": None, "sums": None, "offsets": [], "wall_s": 0.0,
                    "evaluated": -1}
        model.load_state_dict(self.checkpoint["model"])
        optimizer.load_state_dict(self.checkpoint["optimizer"])
        for group in optimizer.param_groups:      # what config.json says is what runs from here
            group.update(lr=self.config["lr"], momentum=self.config["momentum"])
        rng = self.checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["data"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        state = self.checkpoint["state"]
        changes = "; ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in self.changes.items())
        print(where + f"resuming {self.folder} after {state['epoch']} epochs, step {state['step']}"
              + (f", with {changes}" if changes else ""), file=sys.stderr)
        self.checkpoint = None                    # free the memory; the state lives on in the loop
        return state

    def wall_s(self):
        """Seconds this run has trained and evaluated, over all its resumptions."""
        return round(self.wall_before + time.perf_counter() - self.started, 1)

    def log(self, record):
        """Append one metrics line (with the wall-clock time and the device) to metrics.jsonl."""
        record.update(wall_s=self.wall_s(), device=self.device)
        self.records.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def save(self, model, optimizer, generator, state):
        """Write checkpoint.pt atomically: a kill at any moment leaves the old or the new one."""
        state["wall_s"] = self.wall_s()
        rng = {"torch": torch.get_rng_state(), "data": generator.get_state()}
        if self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        temporary = self.checkpoint_path.with_name("checkpoint.pt.tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                    "rng": rng, "config": self.config, "metrics": self.records}, temporary)
        os.replace(temporary, self.checkpoint_path)
        self.saved_at = time.perf_counter()

    def checkpoint_due(self):
        return time.perf_counter() - self.saved_at >= CHECKPOINT_EVERY_S

    def checkpoint_note(self):
        return str(self.checkpoint_path) if self.checkpoint_path.exists() else "not written yet"


def _read_pid(path):
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:           # it exists, and belongs to someone else
        pass
    return True


def _as_json(value):
    """A value as config.json stores it (tuples become lists), for comparing configs."""
    return json.loads(json.dumps(value))


def _write_atomically(path, text):
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _start_wandb(config, out_dir):
    """Weights & Biases logging, imported only when a config asks for it (wandb_on)."""
    try:
        import wandb
    except ImportError:
        raise RunError("this config sets wandb_on, but wandb is not installed "
                       "(pip install wandb, or --set wandb_on=false)") from None
    wandb.init(project="topographic-vae", name=config["name"], config=config, dir=str(out_dir))
    return wandb


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, number, frame):
        self.requested = True
        self._restore()
        print(f"\n{signal.Signals(number).name}: stopping after the current step (or evaluation) to save "
              f"a checkpoint; a second one stops at once", file=sys.stderr)

    def _restore(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def __exit__(self, *exc):
        self._restore()


# ─── Checking a config before anything runs ──────────────────────────────────

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_POSITIVE_INT = (lambda v: _is_int(v) and v > 0, "a positive integer")
_RULES = {
    "batch_size": _POSITIVE_INT, "eval_epochs": _POSITIVE_INT,
    "max_epochs": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (0: only evaluate the untrained model)"),
    "n_is_samples": _POSITIVE_INT, "n_caps": _POSITIVE_INT, "cap_dim": _POSITIVE_INT,
    "n_transforms": _POSITIVE_INT,
    "seed": (_is_int, "an integer"),
    "train_sequences": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null (all)"),
    "test_sequences": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null (all)"),
    "lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "eps": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "mu_init": (lambda v: v is None or _is_number(v), "a number"),
    "n_off_diag": (lambda v: v is None or (_is_int(v) and v >= 0), "a non-negative integer"),
    "wandb_on": (lambda v: isinstance(v, bool), "true or false"),
    "data": (lambda v: v in ("mnist", "dsprites"), "mnist or dsprites"),
    "grouper": (lambda v: v in ("shifting", "stationary", "map2d", "none"), "shifting, stationary, map2d or none"),
    "dsprites_source": (lambda v: v in ("file", "procedural"), "file or procedural"),
}


class ConfigError(RunError):
    """A config value that no run can use (exit status 2, like a bad option)."""


def validate_config(config):
    """Raise ConfigError naming the first bad key, its value and what is allowed; else return None."""
    def bad(key, allowed):
        raise ConfigError(f"config key {key}={json.dumps(config.get(key))}: must be {allowed}")

    name = config.get("name")
    if name not in EXPERIMENTS:
        bad("name", "the name of an experiment (--list shows them)")
    missing = sorted(EXPERIMENTS[name].keys() - config.keys())
    if missing:
        raise ConfigError(f"the config of {name} lacks the key(s) {', '.join(missing)}")
    for key, (ok, allowed) in _RULES.items():
        if key in config and not ok(config[key]):
            bad(key, allowed)
    kinds = datasets.SEQUENCE_KINDS if config["data"] == "mnist" else ("dsprites",)
    for key in ("train_kind", "test_kind"):
        if config[key] not in kinds:
            bad(key, " or ".join(kinds))
    S, frames = config["n_transforms"], config["train_kind"]
    if config["data"] == "mnist" and S != (1 if frames == "none" else datasets.N_FRAMES_MNIST):
        bad("n_transforms", f"{1 if frames == 'none' else datasets.N_FRAMES_MNIST}, the frames of a {frames} sequence")
    if config["data"] == "dsprites" and S < 2:
        bad("n_transforms", "at least 2 for dSprites sequences")
    if config["train_sequences"] is not None and config["train_sequences"] < config["batch_size"]:
        bad("train_sequences", f"at least one batch ({config['batch_size']})")
    if config["grouper"] == "none":
        return
    kernel = config["group_kernel"]
    if not (isinstance(kernel, (list, tuple)) and len(kernel) == 2 and all(_is_int(k) and k > 0 for k in kernel)):
        bad("group_kernel", "two positive integers (frames, units)")
    if config["grouper"] == "map2d":
        shape = config["map_shape"]
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(_is_int(k) and k > 0 for k in shape)
                and config["n_caps"] == 1 and math.prod(shape) == config["cap_dim"]):
            bad("map_shape", f"two positive integers whose product is cap_dim ({config['cap_dim']}), with n_caps 1")
        torus, keys = shape, ("map_shape", "map_shape")
    else:
        torus, keys = (S, config["cap_dim"]), ("n_transforms", "cap_dim")
    for k, size, key in zip(kernel, torus, keys):
        if k > size:
            bad(key, f"at least the kernel's {k} (group_kernel {json.dumps(list(kernel))})")
    if config["grouper"] == "shifting" and config["n_off_diag"] is None:
        bad("n_off_diag", "a non-negative integer for shifting capsules")
    if not _is_number(config["mu_init"]):
        bad("mu_init", "a number for a topographic model")


# ─── Benchmark: where a training step's time goes ────────────────────────────

def benchmark(name, data_dir=None, device="cpu", dsprites_source="file", repeats=7, steps=10):
    """Print the median time of a training step and the shares of its parts, measured in one run.

    A step is what train() does per batch: make the batch of sequences, then
    train_step (forward, E_eq, the terms read to the host, backward, SGD). The data, the grouper (forward + backward) with E_eq,
    and a plain MLP of the same layers are timed alone in the same run, so
    their shares are ratios that survive a noisy machine.
    """
    config = dict(EXPERIMENTS[name], dsprites_source=dsprites_source) if name.endswith("dsprites") else EXPERIMENTS[name]
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = sgd(model.parameters(), config, device)
    S, caps, D, B = config["n_transforms"], config["n_caps"], config["cap_dim"], config["batch_size"]
    generator = torch.Generator().manual_seed(0)
    data = load_data(config, data_dir, device)
    rows = data.plan_epoch(generator)[0]

    def make_batch():
        return data.batch(rows, generator)[0]

    def step():
        train_step(model, optimizer, make_batch(), config)

    z = torch.randn(B * S, caps * D, device=device, requires_grad=True)
    u = torch.randn(B * S, caps * D, device=device, requires_grad=True)

    def grouper_and_eq():
        t = model.group(z, u)
        t.sum().backward()
        tvae.equivariance_error(t.detach(), S, caps, D).item()

    # The floor: a plain MLP with the same Linear layers (two encoders, one decoder) and SGD.
    n_pixels, d = math.prod(image_shape(config)), caps * D
    mlp = torch.nn.ModuleList([torch.nn.Sequential(
        torch.nn.Linear(n_pixels, 3 * d), torch.nn.ReLU(), torch.nn.Linear(3 * d, 2 * d), torch.nn.ReLU(),
        torch.nn.Linear(2 * d, 2 * d)) for _ in range(2)] + [torch.nn.Sequential(
        torch.nn.Linear(d, 2 * d), torch.nn.ReLU(), torch.nn.Linear(2 * d, 3 * d), torch.nn.ReLU(),
        torch.nn.Linear(3 * d, n_pixels))]).to(device)
    mlp_optimizer = sgd(mlp.parameters(), config, device)
    images = make_batch().flatten(0, 1).flatten(1)

    def mlp_step():
        z = mlp[0](images)[:, :d] + mlp[1](images)[:, :d]
        loss = (mlp[2](z) - images).pow(2).sum()
        mlp_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mlp_optimizer.step()
        loss.item()

    def median_ms(fn):
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / steps * 1e3)
        return sorted(times)[len(times) // 2]

    step_ms, data_ms, grouper_ms = median_ms(step), median_ms(make_batch), median_ms(grouper_and_eq)
    mlp_ms = median_ms(mlp_step)
    print(f"{name} on {device} ({torch.get_num_threads()} threads), batch {B} sequences x {S} frames "
          f"x {'x'.join(map(str, image_shape(config)))}, median of {repeats} x {steps} steps")
    print(f"  training step (data + forward + E_eq + backward + SGD): {step_ms:8.2f} ms  "
          f"= {B / step_ms * 1e3:7.1f} sequences/s")
    print(f"  making the batch of sequences alone:                     {data_ms:8.2f} ms  "
          f"= {100 * data_ms / step_ms:5.1f}% of a step, {B / data_ms * 1e3:7.1f} sequences/s")
    print(f"  grouper (forward + backward) and E_eq alone:             {grouper_ms:8.2f} ms  "
          f"= {100 * grouper_ms / step_ms:5.1f}% of a step")
    print(f"  a plain MLP step with the same Linear layers (the floor): {mlp_ms:8.2f} ms  "
          f"= {B / mlp_ms * 1e3:7.1f} sequences/s; the TVAE step takes {step_ms / mlp_ms:.2f}x as long")




# ─── Report: the paper's tables from finished runs ───────────────────────────

def read_run(folder):
    """(config, metrics records) of a run folder; RunError when either file is missing or unreadable."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise RunError(f"--report: {folder} is not a readable run folder ({error})") from None
    return config, records


def _number(value, digits=1):
    return "–" if value is None else f"{value:,.{digits}f}"


def _correlation_cells(record, key):
    values = (record or {}).get(key) or {}
    return [_number(values.get(factor), 2) for factor in ("scale", "orientation", "posX", "posY")]


def report(folders):
    """Markdown: one table per paper table (Table 1, Table 2, Figure 3) and the evaluations of each run.

    Reads only config.json and metrics.jsonl. log p(x) is ours (with − log K,
    tvae.py Eqs. (10)–(11)); the paper's convention adds log K back.
    """
    runs = [(Path(folder), *read_run(folder)) for folder in folders]
    paper_order = {name: i for i, name in enumerate(EXPERIMENTS)}
    runs.sort(key=lambda run: (paper_order.get(run[1]["name"], len(paper_order)),
                               max((r["step"] for r in run[2]), default=0)))     # as in the paper, untrained first
    lines = []

    def table(title, header, rows):
        if rows:
            lines.extend([f"### {title}", "", "| " + " | ".join(header) + " |",
                          "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows), ""])

    def evaluations(records):
        return [r for r in records if "test_log_likelihood" in r]

    def trained(evaluation):
        return evaluation["epoch"]

    def common(config, last):
        return [f"`{config['name']}`", str(trained(last)), f"{last['step']:,}"], [
            f"{last['wall_s'] / 3600:.2f}" if "wall_s" in last else "–", last.get("device", "–")]

    mnist, dsprites = [], []
    for folder, config, records in runs:
        tested = evaluations(records)
        paper = config.get("paper", "")
        if not tested or ("Table 1" not in paper and "Table 2" not in paper):
            continue                                            # e.g. Figure 4's run: its own table below
        last = tested[-1]
        head, tail = common(config, last)
        log_k = math.log(config["n_is_samples"])
        test_set = "all" if config["test_sequences"] is None else f"{config['test_sequences']:,}"
        if config["data"] == "mnist":
            mnist.append(head + [f"{config['test_kind']}, {test_set}", f"{len(tested)}",
                                 _number(last.get("test_eq_error"), 0),
                                 _number(last["test_log_likelihood"]),
                                 _number(last["test_log_likelihood"] + log_k)] + tail)
        else:
            train_lines = [r for r in records if "capsule_correlation" in r]
            dsprites.append(head + [config["dsprites_source"], _number(last.get("test_eq_error"), 0),
                                    _number(last["test_log_likelihood"])]
                            + _correlation_cells(last, "test_capsule_correlation")
                            + _correlation_cells(train_lines[-1] if train_lines else None, "capsule_correlation")
                            + tail)
    table("Table 1: MNIST sequences (epochs 0: the untrained model)",
          ["experiment", "epochs", "steps", "test sequences", "evaluations", "test E_eq", "test log p(x)",
           "paper's convention (+log K)", "hours", "device"], mnist)
    table("Table 2: dSprites sequences (epochs 0: the untrained model)",
          ["experiment", "epochs", "steps", "sprites", "test E_eq", "test log p(x)",
           "test corr. scale", "orientation", "posX", "posY",
           "train corr. scale (last epoch)", "orientation", "posX", "posY", "hours", "device"], dsprites)
    for folder, config, records in runs:
        tested = evaluations(records)
        if config["grouper"] == "map2d" and tested:
            rows = [[str(trained(r)), f"{r['step']:,}", _number(r["test_log_likelihood"]),
                     str(r["test_topography"]["selective_units"]),
                     _number(r["test_topography"]["same_class_neighbours"], 3),
                     _number(r["test_topography"]["shuffled"], 3), _number(r["test_topography"]["ratio"], 2),
                     f"{r['wall_s'] / 3600:.2f}"] for r in tested if "test_topography" in r]
            table(f"Figure 3: `{config['name']}` in {folder}, topography over epochs",
                  ["epochs", "steps", "test log p(x)", "selective units", "same-class neighbours",
                   "shuffled positions", "ratio", "hours"], rows)
        elif len(tested) > 2:
            test_set = "all" if config["test_sequences"] is None else f"the first {config['test_sequences']:,}"
            rows = [[str(trained(r)), f"{r['step']:,}", _number(r["test_log_likelihood"]),
                     _number(r.get("test_eq_error"), 0), f"{r['wall_s'] / 3600:.2f}"] for r in tested]
            table(f"`{config['name']}` in {folder}, evaluations over epochs ({test_set} test sequences)",
                  ["epochs", "steps", "test log p(x)", "test E_eq", "hours"], rows)
    lines += ["### Last evaluation of each run", ""]
    for folder, config, records in runs:
        tested = evaluations(records)
        lines.append(f"- `{folder}` ({config['name']}): " + (f"`{json.dumps(tested[-1])}`" if tested else "none yet"))
    return "\n".join(lines)


# ─── Command line ────────────────────────────────────────────────────────────

def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _key_value(text):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value              # a bare word is a string


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line on stderr (exit status 2)."""

    def error(self, message):
        print(f"error: {message} (python experiments.py --help explains the options)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    parser = _Parser(
        prog="experiments.py",
        description="Train one experiment of 'Topographic VAEs learn Equivariant Capsules' "
                    "(Keller & Welling, NeurIPS 2021). Writes config.json, metrics.jsonl, "
                    "checkpoint.pt and PNG pictures into --out.",
        epilog="experiments: " + ", ".join(EXPERIMENTS) + ". Example: python experiments.py "
               "tvae_Lhalf_mnist --train-sequences 64 --epochs 2 --data-dir ~/data/mnist")
    parser.add_argument("name", nargs="?", help="the experiment to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list every experiment with the figure or table it reproduces")
    parser.add_argument("--show", action="store_true",
                        help="print NAME's whole config (the registry's, with this command line's changes) and exit")
    parser.add_argument("--report", nargs="+", type=Path, metavar="DIR",
                        help="print Markdown tables (Table 1, Table 2, Figure 3, evaluations over epochs) "
                             "from the config.json and metrics.jsonl of these run folders")
    parser.add_argument("--benchmark", action="store_true",
                        help="time a training step of NAME (default tvae_Lhalf_mnist) and the shares of its parts")
    parser.add_argument("--epochs", type=_non_negative_int,
                        help="total number of epochs (max_epochs), counting those already done when resuming; "
                             "0 only evaluates the untrained model (a baseline)")
    parser.add_argument("--batch-size", type=_positive_int, help="sequences per batch (batch_size)")
    parser.add_argument("--lr", type=_positive_float, help="SGD learning rate (lr)")
    parser.add_argument("--seed", type=int, help="seed of initialisation, data order and sequences (seed)")
    parser.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, VALUE read as JSON (e.g. --set n_is_samples=20); repeatable")
    parser.add_argument("--train-sequences", type=_positive_int,
                        help="train on the first N sequences of each epoch only (quick runs)")
    parser.add_argument("--test-sequences", type=_positive_int,
                        help="evaluate on the first N test sequences only (default: all; 1024 for dSprites)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or mps (default: CUDA, else MPS, else the CPU)")
    parser.add_argument("--data-dir", type=Path,
                        help="folder holding the MNIST .gz files or the dSprites .npz, or where they are "
                             "downloaded (default: $TVAE_DATA_DIR, else ./data)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/NAME)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint; only max_epochs, eval_epochs, lr, "
                             "momentum, n_is_samples, test_sequences and wandb_on may change")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run that --out holds (its metrics, checkpoint and pictures are deleted)")
    parser.add_argument("--dsprites", choices=("file", "procedural"),
                        help="dSprites images from the published .npz (the default) or drawn by the "
                             "procedural renderer (dsprites_source); a resumed run keeps its own")
    return parser, parser.parse_args(argv)


def resolve_name(name):
    """The experiment called name, or exit 2 with the closest names."""
    if name in EXPERIMENTS:
        return name
    lower = {n.lower(): n for n in EXPERIMENTS}
    close = [lower[n] for n in difflib.get_close_matches(name.lower(), lower, n=3, cutoff=0.5)]
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    print(f"error: unknown experiment {name!r}.{hint} ('python experiments.py --list' shows all 16.)",
          file=sys.stderr)
    sys.exit(2)


def _same_kind(old, new):
    """JSON-compatible type check: ints may replace floats, lists replace tuples, bools only bools."""
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, (int, float))
    if isinstance(old, (list, tuple)):
        return isinstance(new, (list, tuple)) and len(new) == len(old)
    return type(new) is type(old)


def resolve_config(name, args, parser):
    """The registry's config with the command line's overrides; with --resume, the run's saved config."""
    config = copy.deepcopy(EXPERIMENTS[name])
    if args.resume:
        saved = args.out / "config.json"
        try:
            config = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RunError(f"--resume: cannot read {saved} ({error})") from None
        if not isinstance(config, dict) or config.get("name") != name:
            held = config.get("name") if isinstance(config, dict) else None
            raise RunError(f"--resume: {args.out} holds a run of {held}, not {name}")
    overrides = dict(args.set)
    for key, value in [("max_epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                       ("seed", args.seed), ("train_sequences", args.train_sequences),
                       ("test_sequences", args.test_sequences), ("dsprites_source", args.dsprites)]:
        if value is not None:
            overrides[key] = value
    if config.get("data") != "dsprites":
        overrides.pop("dsprites_source", None)          # --dsprites means nothing to MNIST
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        parser.error(f"unknown config key(s) {', '.join(unknown)}; the keys are: {', '.join(sorted(config))}")
    for key, value in overrides.items():    # a value must have the type of the one it replaces
        old = config[key]
        if old is not None and value is not None and not _same_kind(old, value):
            parser.error(f"--set {key}={json.dumps(value)}: expected a value like {json.dumps(old)}")
    config.update(overrides)
    return config


def _resume_command(name, args):
    """The command line that continues this run."""
    words = ["python experiments.py", name, "--resume", "--out", str(args.out)]
    if args.data_dir:
        words += ["--data-dir", str(args.data_dir)]
    if args.device != "auto":
        words += ["--device", args.device]
    return " ".join(words)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.list:
        for name, config in EXPERIMENTS.items():
            print(f"{name:36s} {config['paper']}")
        return 0
    try:
        if args.report:
            print(report(args.report))
            return 0
        if args.show:
            name = resolve_name(args.name or parser.error("--show: name the experiment to show"))
            args.resume, args.out = False, None
            print(json.dumps(resolve_config(name, args, parser), indent=2))
            return 0
        device = pick_device(args.device)
        if args.benchmark:
            benchmark(resolve_name(args.name or "tvae_Lhalf_mnist"), args.data_dir, device, args.dsprites or "file")
            return 0
        if args.name is None:
            parser.error("name the experiment to run (--list shows them)")
        name = resolve_name(args.name)
        args.out = args.out or Path("runs") / name
        config = resolve_config(name, args, parser)
        records, interrupted = train(config, args.out, args.data_dir or datasets.default_data_dir(), device,
                                     args.resume, args.overwrite)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (datasets.DataError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if (args.out / "checkpoint.pt").exists():
            print(f"stopped at once; the last checkpoint is kept. Continue with: {_resume_command(name, args)}",
                  file=sys.stderr)
        else:
            print("stopped at once, before the first checkpoint", file=sys.stderr)
        return 130
    if interrupted:
        print(f"stopped; the checkpoint is saved. Continue with: {_resume_command(name, args)}", file=sys.stderr)
        return 130
    print(f"done: {json.dumps(records[-1])}", file=sys.stderr)
    return 0


def pick_device(name="auto"):
    """CUDA, else Apple MPS, else the CPU; or the device named, if this machine has it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return device


if __name__ == "__main__":
    sys.exit(main())
