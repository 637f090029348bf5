"""Every experiment of the paper, one training function, and the command line.

    python experiments.py tvae_Lhalf_mnist                 # train (Table 1, L = 1/2)
    python experiments.py --list                           # what each experiment reproduces
    python experiments.py tvae_Lhalf_mnist --train-sequences 64 --epochs 2   # a quick look

The registry EXPERIMENTS maps each name of SPEC §3 to its config; the keys are
named as the authors' code names its options. `train` runs any of them.
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
import zlib
from pathlib import Path

import torch

import datasets
import tvae

# ─── The registry (SPEC §3) ──────────────────────────────────────────────────
# Shared by all experiments unless overridden: SGD lr 1e-4, momentum 0.9,
# batches of 8 sequences, 100 epochs, evaluation every 5 epochs from epoch 0.
_COMMON = dict(lr=1e-4, momentum=0.9, batch_size=8, max_epochs=100, eval_epochs=5,
               n_is_samples=10, eps=1e-6, mu_init=30.0, n_off_diag=None, map_shape=None,
               train_sequences=None, test_sequences=None, wandb_on=False)
# MNIST: 18 capsules of 18 units, sequences of 18 frames of RGB 28×28 digits (SPEC §2.1).
_MNIST = dict(_COMMON, data="mnist", train_kind="single", test_kind="single",
              n_caps=18, cap_dim=18, n_transforms=18, max_transform_len=18)
# dSprites: 15 capsules of 15 units, sequences of 15 frames of 64×64 sprites (SPEC §2.2).
_DSPRITES = dict(_COMMON, data="dsprites", train_kind="dsprites", test_kind="dsprites",
                 n_caps=15, cap_dim=15, n_transforms=15, max_transform_len=30, seed=1)


def _shifting(kernel, n_off_diag):
    return dict(grouper="shifting", group_kernel=(kernel, kernel, 1), n_off_diag=n_off_diag)


def _stationary(k_time, k_capsule):
    return dict(grouper="stationary", group_kernel=(k_time, k_capsule, 1))


_VAE = dict(grouper="none", group_kernel=None, mu_init=None)

EXPERIMENTS = {
    "tvae_2d_mnist": dict(_MNIST, train_kind="none", test_kind="none", grouper="map2d",
                          n_caps=1, cap_dim=324, n_transforms=1, map_shape=(18, 18),
                          group_kernel=(5, 5, 1), mu_init=10.0, batch_size=128, max_epochs=250,
                          seed=1, paper="Figure 3 (2-D topographic map)"),
    "tvae_Lhalf_mnist": dict(_MNIST, **_shifting(18, 1), seed=1, paper="Table 1, L=1/2"),
    "tvae_Lpartial_mnist": dict(_MNIST, **_shifting(13, 1), seed=2, paper="Figure 4 (MNIST)"),
    "tvae_Lshort_mnist": dict(_MNIST, **_shifting(5, 1), seed=2, paper="Table 1, L=5/36"),
    "bubbles_mnist": dict(_MNIST, **_stationary(5, 3), seed=1, paper="Table 1, Bubbles"),
    "tvae_L0_mnist": dict(_MNIST, **_stationary(1, 3), seed=1, paper="Table 1, L=0"),
    "nontvae_mnist": dict(_MNIST, **_VAE, seed=1, paper="Table 1, VAE"),
    "tvae_Lpartial_mnist_generalization": dict(
        _MNIST, **_shifting(13, 1), test_kind="dual", seed=2,
        paper="Figures 1, 6, Section B.4 (train single, test rotation+colour)"),
    "tvae_Lpartial_rotcolor_mnist": dict(_MNIST, **_shifting(13, 1), train_kind="dual",
                                         test_kind="dual", seed=1, paper="Figure 23 (rotation+colour)"),
    "tvae_Lpartial_perspective_mnist": dict(_MNIST, **_shifting(13, 1), train_kind="perspective",
                                            test_kind="perspective", seed=1,
                                            paper="Figure 22 (perspective+colour)"),
    "tvae_Lhalf_dsprites": dict(_DSPRITES, **_shifting(15, 0), paper="Table 2, L=1/2"),
    "tvae_Lpartial_dsprites": dict(_DSPRITES, **_shifting(10, 0), paper="Figure 4 (dSprites), Table 2, L=1/3"),
    "tvae_Lshort_dsprites": dict(_DSPRITES, **_shifting(5, 0), paper="Table 2, L=1/6"),
    "bubbles_dsprites": dict(_DSPRITES, **_stationary(5, 5), paper="Table 2, Bubbles"),
    "tvae_L0_dsprites": dict(_DSPRITES, **_stationary(1, 3), eps=1e-3, paper="Table 2, L=0"),
    "nontvae_dsprites": dict(_DSPRITES, **_VAE, paper="Table 2, VAE"),
}
for _name, _config in EXPERIMENTS.items():
    _config["name"] = _name


def image_shape(config):
    """(C, H, W) of the experiment's images: RGB digits when colour changes (SPEC §2.1)."""
    if config["data"] == "dsprites":
        return (1, 64, 64)
    return (1 if config["train_kind"] == "none" else 3, 28, 28)


def build_model(config):
    """The TVAE of an experiment config: its grouper variant of SPEC §1.4 (None for the VAE)."""
    d = config["n_caps"] * config["cap_dim"]
    if config["grouper"] == "none":
        return tvae.TVAE(image_shape(config), d)
    k_time, k_capsule, _ = config["group_kernel"]
    n_off_diag = config["n_off_diag"] if config["grouper"] == "shifting" else None
    grouper = tvae.Grouper(tvae.topographic_kernel(k_time, k_capsule, n_off_diag),
                           config["n_transforms"], config["n_caps"], config["cap_dim"],
                           config["mu_init"], config["eps"],
                           tuple(config["map_shape"]) if config["map_shape"] else None)
    return tvae.TVAE(image_shape(config), d, grouper)


# ─── Data: the same three calls for MNIST and dSprites ───────────────────────
# An epoch is planned up front as a (n_batches, B, k) tensor of what to draw, so
# a checkpoint can hold it and a resumed run continues mid-epoch exactly where
# the interrupted one stopped. Sequences are generated batch by batch on the
# training device (datasets.py); random choices come from one CPU generator.

class MnistData:
    """MNIST digits on the device; sequences of SPEC §2.1 made per batch."""

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
    """The dSprites sub-grid on the device (the real file or the procedural renderer, SPEC §2.2)."""

    TEST_SEQUENCES = 1024   # dSprites has no test split: a fixed set of sequences for evaluation

    def __init__(self, config, data_dir, device, source):
        if source == "procedural":
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
    """(n,) → (n // batch_size, batch_size): the last partial batch is dropped (SPEC §2.2)."""
    n_batches = len(order) // batch_size
    if n_batches == 0:
        raise datasets.DataError(f"fewer sequences ({len(order)}) than one batch ({batch_size})")
    return order[:n_batches * batch_size].view(n_batches, batch_size)


def load_data(config, data_dir, device, dsprites_source="file"):
    if config["data"] == "mnist":
        return MnistData(config, data_dir, device)
    return DspritesData(config, data_dir, device, dsprites_source)


# ─── Pictures: PNG files written with zlib alone ─────────────────────────────

def write_png(path, image):
    """Write image (C, H, W), C = 1 (grey) or 3 (RGB), values in [0, 1], as an 8-bit PNG."""
    pixels = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
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


# Ten distinguishable colours for the digit classes of the selectivity map (Figure 3).
CLASS_COLOURS = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                              [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                              [188, 189, 34], [23, 190, 207]]) / 255


def selectivity_picture(labels, map_shape, class_means):
    """The class-selectivity map of Figure 3 as one RGB image (SPEC §1.7).

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



# ─── Training and evaluation (SPEC §1.5, §1.6, §3) ───────────────────────────

class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops without touching the last good checkpoint."""


class CheckpointError(RuntimeError):
    """The checkpoint to resume from cannot be read."""


class Stop:
    """Ctrl-C (SIGINT) asks the training loop to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\nstopping after the current step (or evaluation) to save a checkpoint; "
              "Ctrl-C again stops at once", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def sgd(parameters, config, device):
    """SGD with momentum (SPEC §1.5), with the fused kernel where torch has one (CPU, CUDA): faster here."""
    return torch.optim.SGD(parameters, lr=config["lr"], momentum=config["momentum"],
                           fused=device.type in ("cpu", "cuda"))


def pick_device(name="auto"):
    """CUDA, else Apple MPS, else the CPU; or the device named."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _rng_states(generator, device):
    states = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states, generator, device):
    torch.set_rng_state(states["torch"])
    generator.set_state(states["data"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _save_atomically(obj, path):
    """torch.save to a temporary name, then rename: a kill at any moment leaves the old or the new file."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _correlations(offsets):
    """Per factor, the Pearson correlation of estimated and true offsets (SPEC §1.6, Table 2)."""
    factor, estimate, truth = (torch.cat(part) for part in zip(*offsets))
    correlations = {}
    for f, name in {1: "scale", 2: "orientation", 3: "posX", 4: "posY"}.items():
        r = tvae.pearson(estimate[factor == f], truth[factor == f]).item()
        correlations[name] = r if math.isfinite(r) else None    # None: too few or constant offsets
    return correlations


@torch.no_grad()
def evaluate(model, data, config, out_dir, epoch):
    """Test log-likelihood and E_eq on the fixed test sequences, and the pictures of SPEC §1.7."""
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    n_sequences = log_likelihood = eq_error = 0.0
    offsets, first_batch, images, codes, digit_classes = [], None, [], [], []
    for x, labels, classes in data.test_batches(max(config["batch_size"], 32)):
        out = model(x)
        log_likelihood += model.log_likelihood(x, config["n_is_samples"]).sum().item()
        n_sequences += len(x)
        if S > 1:
            eq_error += tvae.equivariance_error(out["t"], S, caps, D).item() * len(x)
        if first_batch is None:
            first_batch = x
        if config["data"] == "dsprites":
            offsets.append(tvae.capsule_offsets(out["t"], labels, caps, D))
        if config["grouper"] == "map2d":        # kept for the Figure 3 pictures
            images.append(x.flatten(0, 1).cpu())
            codes.append(out["t"].cpu())
            digit_classes.append(classes.cpu())
    record = {"test_log_likelihood": log_likelihood / (n_sequences * S)}
    if S > 1:
        record["test_eq_error"] = eq_error / n_sequences
        write_png(out_dir / f"traversal_{epoch:03d}.png",
                  image_grid(list(model.capsule_traversal(first_batch[0], caps, D))))
        write_png(out_dir / f"samples_{epoch:03d}.png", image_grid(list(model.sample(4, S))))  # 4 sequences
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
                      config["map_shape"], out_dir, epoch)
    return record


def write_figure3(model, first_batch, images, t, classes, labels, map_shape, out_dir, epoch):
    """The pictures of the 2-D model (Figure 3, SPEC §1.7) from a pass over the test set.

    images (n, C, H, W) and t (n, d) of the n test digits, classes (n,), labels (d,) each unit's class.
    """
    write_png(out_dir / f"samples_{epoch:03d}.png", image_grid(list(model.sample(100, 1)[:, 0].split(10))))
    most_active = images[t.abs().argmax(dim=0)]                              # (d, C, H, W)
    write_png(out_dir / f"max_activation_{epoch:03d}.png", image_grid(list(most_active.split(map_shape[1]))))
    class_means = torch.stack([images[classes == c].mean(0).nan_to_num() for c in range(10)])  # (10, C, H, W)
    write_png(out_dir / f"selectivity_{epoch:03d}.png",
              selectivity_picture(labels, map_shape, class_means))
    digits = first_batch[:16]                                                # (16, 1, C, H, W)
    reconstructions = model(digits)["probs"].view(digits.shape)
    write_png(out_dir / f"reconstruction_{epoch:03d}.png", image_grid([digits[:, 0], reconstructions[:, 0]]))


def train(config, out_dir, data_dir=None, device="cpu", resume=False, dsprites_source="file", progress=None):
    """Train one experiment to config['max_epochs'] epochs, writing its files into out_dir.

    Every epoch: the averages of loss, −log p(x|t), KL and E_eq over the
    training batches; every eval_epochs epochs from epoch 0, and after the last:
    the test metrics and pictures (evaluate). Each epoch ends with an atomic
    checkpoint; Ctrl-C writes one after the current step. With resume=True the
    run continues from out_dir/checkpoint.pt to the same result as if it had not
    stopped. Returns (the run's metrics records, whether Ctrl-C stopped it).
    """
    out_dir, device = Path(out_dir), torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.jsonl"
    torch.manual_seed(config["seed"])
    generator = torch.Generator().manual_seed(config["seed"])
    model = build_model(config).to(device)
    optimizer = sgd(model.parameters(), config, device)
    data = load_data(config, data_dir, device, dsprites_source)
    # Where the run stands: the epoch, the next batch of its plan, and the running sums of its metrics.
    state = {"epoch": 0, "batch": 0, "step": 0, "plan": None, "sums": None, "offsets": []}
    records = []
    if resume:
        try:
            checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        except Exception as error:          # whatever torch.load meets in a damaged file
            raise CheckpointError(f"cannot read {checkpoint_path} ({type(error).__name__}: {error}); "
                                  f"start again without --resume, or into another --out") from None
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        _set_rng_states(checkpoint["rng"], generator, device)
        if metrics_path.exists():   # drop lines of epochs the checkpoint does not hold (a kill in between)
            records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
            records = [r for r in records if r["epoch"] < state["epoch"]]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    wandb = _start_wandb(config, out_dir) if config["wandb_on"] else None

    started, wall_before = time.perf_counter(), state.get("wall_s", 0.0)

    def wall_s():
        """Seconds this run has trained and evaluated, over all its resumptions."""
        return round(wall_before + time.perf_counter() - started, 1)

    def log(record):
        record.update(wall_s=wall_s(), device=str(device))
        records.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb is not None:
            wandb.log(record, step=record["step"])

    def save():
        state["wall_s"] = wall_s()
        _save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                          "rng": _rng_states(generator, device), "config": config}, checkpoint_path)

    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    terms = ("loss", "nll", "kl", "eq_error")
    progress = progress or Progress()
    with Stop() as stop:
        while state["epoch"] < config["max_epochs"]:
            epoch = state["epoch"]
            if state["plan"] is None:
                state.update(plan=data.plan_epoch(generator), batch=0, sums=[0.0] * 4, offsets=[])
            plan = state["plan"]
            model.train()
            progress.start_epoch(epoch, config["max_epochs"], len(plan), state["batch"])
            while state["batch"] < len(plan):
                x, labels = data.batch(plan[state["batch"]], generator)
                out = model(x)
                loss = out["loss"].mean()
                with torch.no_grad():
                    eq = tvae.equivariance_error(out["t"], S, caps, D) if S > 1 else torch.zeros(())
                    values = torch.stack([loss, out["nll"].mean(), (out["kl_z"] + out["kl_u"]).mean(), eq]).tolist()
                bad = [name for name, value in zip(terms, values) if not math.isfinite(value)]
                if bad:
                    raise NonFiniteLoss(f"non-finite {', '.join(bad)} at epoch {epoch}, step {state['step'] + 1} "
                                        f"(values {dict(zip(terms, values))}); the last good checkpoint is "
                                        f"{checkpoint_path if checkpoint_path.exists() else 'not written yet'}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if config["data"] == "dsprites":
                    state["offsets"].append(tvae.capsule_offsets(out["t"].detach(), labels, caps, D))
                state["sums"] = [s + v for s, v in zip(state["sums"], values)]
                state["batch"] += 1
                state["step"] += 1
                progress.update(state["batch"] - 1, len(x), state["sums"][0] / state["batch"])
                if stop.requested:
                    save()
                    progress.end_epoch()
                    return records, True
            progress.end_epoch()
            record = {"epoch": epoch, "step": state["step"],
                      **{f"train_{name}": s / len(plan) for name, s in zip(terms, state["sums"])}}
            if S == 1:
                del record["train_eq_error"]
            if state["offsets"]:
                record["capsule_correlation"] = _correlations(state["offsets"])
            log(record)
            if epoch % config["eval_epochs"] == 0 or epoch == config["max_epochs"] - 1:
                model.eval()
                log({"epoch": epoch, "step": state["step"], **evaluate(model, data, config, out_dir, epoch)})
            state.update(epoch=epoch + 1, plan=None)
            save()
            if stop.requested:
                return records, True
    return records, False


def _start_wandb(config, out_dir):
    """Weights & Biases logging, imported only when a config asks for it (wandb_on)."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: this config sets wandb_on, but wandb is not installed "
                         "(pip install wandb, or --set wandb_on=false)")
    wandb.init(project="topographic-vae", name=config["name"], config=config, dir=str(out_dir))
    return wandb


# ─── Benchmark: where a training step's time goes ────────────────────────────

def benchmark(name, data_dir=None, device="cpu", dsprites_source="file", repeats=7, steps=10):
    """Print the median time of a training step and the shares of its parts, measured in one run.

    A step is what train() does per batch: make the batch of sequences, forward,
    E_eq, backward, SGD. The data, the grouper (forward + backward) with E_eq,
    and a plain MLP of the same layers are timed alone in the same run, so
    their shares are ratios that survive a noisy machine.
    """
    config = EXPERIMENTS[name]
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = sgd(model.parameters(), config, device)
    S, caps, D, B = config["n_transforms"], config["n_caps"], config["cap_dim"], config["batch_size"]
    generator = torch.Generator().manual_seed(0)
    data = load_data(config, data_dir, device, dsprites_source)
    rows = data.plan_epoch(generator)[0]

    def make_batch():
        return data.batch(rows, generator)[0]

    def step():
        out = model(make_batch())
        loss = out["loss"].mean()
        eq = tvae.equivariance_error(out["t"].detach(), S, caps, D)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        torch.stack([loss.detach(), eq]).tolist()

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


# ─── Command line ────────────────────────────────────────────────────────────

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
               "tvae_Lhalf_mnist --train-sequences 64 --epochs 2 --data-dir ../shared/data/mnist")
    parser.add_argument("name", nargs="?", help="the experiment to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list every experiment with the figure or table it reproduces")
    parser.add_argument("--benchmark", action="store_true",
                        help="time a training step of NAME (default tvae_Lhalf_mnist) and the shares of its parts")
    parser.add_argument("--epochs", type=_positive_int,
                        help="total number of epochs (max_epochs), counting those already done when resuming")
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
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--dsprites", choices=("file", "procedural"), default="file",
                        help="dSprites images from the published .npz (default) or drawn by the procedural renderer")
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
        if not (args.out / "checkpoint.pt").exists() or not saved.exists():
            parser.error(f"--resume: no checkpoint in {args.out} (run without --resume to start)")
        try:
            config = json.loads(saved.read_text())
        except json.JSONDecodeError as error:
            parser.error(f"--resume: {saved} is not valid JSON ({error})")
        if not isinstance(config, dict) or config.keys() != EXPERIMENTS[name].keys():
            parser.error(f"--resume: {saved} does not hold a config of {name}")
    overrides = dict(args.set)
    for key, value in [("max_epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                       ("seed", args.seed), ("train_sequences", args.train_sequences),
                       ("test_sequences", args.test_sequences)]:
        if value is not None:
            overrides[key] = value
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        parser.error(f"unknown config key(s) {', '.join(unknown)}; the keys are: {', '.join(sorted(config))}")
    for key, value in overrides.items():    # a value must have the type of the one it replaces
        old = config[key]
        if old is not None and value is not None and not _same_kind(old, value):
            parser.error(f"--set {key}={json.dumps(value)}: expected a value like {json.dumps(old)}")
    config.update(overrides)
    if config["train_sequences"] is not None and config["train_sequences"] < config["batch_size"]:
        parser.error(f"--train-sequences {config['train_sequences']} is less than one batch ({config['batch_size']})")
    return config


def _resume_command(name, args):
    """The command line that continues this run."""
    words = ["python experiments.py", name, "--resume", "--out", str(args.out)]
    if args.data_dir:
        words += ["--data-dir", str(args.data_dir)]
    if args.device != "auto":
        words += ["--device", args.device]
    if args.dsprites != "file":
        words += ["--dsprites", args.dsprites]
    return " ".join(words)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.list:
        for name, config in EXPERIMENTS.items():
            print(f"{name:36s} {config['paper']}")
        return 0
    try:
        device = pick_device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("MPS is not available on this machine")
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if args.benchmark:
        try:
            benchmark(resolve_name(args.name or "tvae_Lhalf_mnist"), args.data_dir, device, args.dsprites)
        except datasets.DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    if args.name is None:
        parser.error("name the experiment to run (--list shows them)")
    name = resolve_name(args.name)
    args.out = args.out or Path("runs") / name
    config = resolve_config(name, args, parser)
    data_dir = args.data_dir or datasets.default_data_dir()
    print(f"{name}: {config['paper']}; {device}; writing to {args.out}", file=sys.stderr)
    try:
        records, interrupted = train(config, args.out, data_dir, device, args.resume, args.dsprites)
    except (datasets.DataError, NonFiniteLoss, CheckpointError) as error:
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


if __name__ == "__main__":
    sys.exit(main())
