"""Every experiment of the paper, one training loop, and the command line.

    python experiments.py --list                           # the experiments, and what each reproduces
    python experiments.py tvae_Lhalf_mnist                 # train one (Table 1, L = 1/2)
    python experiments.py --report runs/*                  # the paper's tables from runs

Read it top to bottom: the registry EXPERIMENTS (keys named as the authors' code names its options),
build_model, train (the loop), evaluate, the pictures; then, below a marked line, the plumbing.
"""
import argparse
import fcntl
import json
import math
import os
import re
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
# Shared by all experiments unless overridden: SGD lr 1e-4, momentum 0.9, batches of 8 sequences, 100 epochs,
# an evaluation every 5 epochs, 10 importance samples for log p(x); `table`: the paper table it is a row of.
# `seed` (the authors') draws initialisation, split and training sequences; `test_seed` the test sequences,
# one test set for every experiment.
_COMMON = dict(lr=1e-4, momentum=0.9, batch_size=8, max_epochs=100, eval_epochs=5,
               n_is_samples=10, eps=1e-6, mu_init=30.0, n_off_diag=None, map_shape=None,
               train_sequences=None, test_sequences=None, test_seed=1, table=None)
# MNIST: 18 capsules of 18 units; sequences of S = 18 frames of 28×28 digits, RGB
# (the digit in the red channel) because the hue may change (datasets.py).
_MNIST = dict(_COMMON, data="mnist", train_kind="single", test_kind="single",
              n_caps=18, cap_dim=18, n_transforms=18)
# dSprites: 15 capsules of 15 units; sequences of S = 15 frames of 64×64 sprites,
# from the published file or drawn procedurally (dsprites_source: "file" or "procedural").
_DSPRITES = dict(_COMMON, data="dsprites", train_kind="dsprites", test_kind="dsprites",
                 n_caps=15, cap_dim=15, n_transforms=15, dsprites_source="file", seed=1, table="Table 2")


def _shifting(kernel, n_off_diag):
    """Shifting capsules (tvae.py Eq. (4)): a kT = kC = kernel window that moves one unit per frame."""
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
    """(C, H, W) of the experiment's images: RGB digits when colour changes."""
    return (1, 64, 64) if config["data"] == "dsprites" else (1 if config["train_kind"] == "none" else 3, 28, 28)


def build_model(config):
    """The TVAE of an experiment config, with its grouper (None for the VAE baseline)."""
    d = config["n_caps"] * config["cap_dim"]
    if config["grouper"] == "none":
        return tvae.TVAE(image_shape(config), d)
    n_off_diag = config["n_off_diag"] if config["grouper"] == "shifting" else None
    grouper = tvae.Grouper(tvae.topographic_kernel(*config["group_kernel"], n_off_diag),
                           config["n_transforms"], config["n_caps"], config["cap_dim"], config["mu_init"],
                           config["eps"], tuple(config["map_shape"]) if config["map_shape"] else None)
    return tvae.TVAE(image_shape(config), d, grouper)


def sgd(parameters, config, device):
    """SGD with momentum, constant learning rate; the fused kernel where torch has one (faster)."""
    return torch.optim.SGD(parameters, lr=config["lr"], momentum=config["momentum"],
                           fused=torch.device(device).type in ("cpu", "cuda"))


# ─── Training ────────────────────────────────────────────────────────────────

TERMS = ("loss", "nll", "kl", "eq_error")     # what a training step measures, averaged per epoch


def train_step(model, optimizer, x, config):
    """One SGD step on sequences x (B, S, C, H, W); its terms are checked before the update (no NaN gets in)."""
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
    return values


def train(config, out_dir, data_dir=None, device="cpu", resume=False, overwrite=False, progress=None):
    """Train one experiment for config['max_epochs'] epochs into out_dir: (metrics, stopped by a signal).

    Epochs count epochs trained: the untrained model is evaluated at 0, then every eval_epochs and after
    the last. A checkpoint follows every epoch and every CHECKPOINT_EVERY_S seconds; Ctrl-C or SIGTERM
    stops after a step with one, and resume=True then ends as an unbroken run would."""
    validate_config(config)
    with RunFolder(out_dir, config, device, resume, overwrite) as run:
        torch.manual_seed(config["seed"])
        generator = torch.Generator().manual_seed(config["seed"])   # every random choice of the data
        model = build_model(config).to(run.device)
        optimizer = sgd(model.parameters(), config, run.device)
        data = load_data(config, data_dir, run.device)
        state = run.restore(model, optimizer, generator)          # epochs done, step, the epoch's plan
        progress = progress or Progress()
        evaluate_if_due(model, data, config, run, state)          # epoch 0: the untrained model
        run.save(model, optimizer, generator, state)              # from here on, the folder holds a run
        for epoch in range(state["epoch"], config["max_epochs"]):
            if state["plan"] is None:                             # every training sequence once, shuffled
                plan = data.plan_epoch(config["batch_size"], config["train_sequences"], generator)
                state.update(plan=plan, batch=0, sums=dict.fromkeys(TERMS, 0.0))
            model.train()
            progress.start_epoch(epoch, config["max_epochs"], len(state["plan"]), state["batch"])
            for rows in state["plan"][state["batch"]:]:
                x = data.batch(rows, generator)[0]                # (B, S, C, H, W)
                try:
                    values = train_step(model, optimizer, x, config)
                except NonFiniteLoss as error:
                    raise NonFiniteLoss(f"{error} in epoch {epoch + 1}, step {state['step'] + 1}; "
                                        f"the last good checkpoint is {run.checkpoint}") from None
                state["sums"] = {name: state["sums"][name] + value for name, value in values.items()}
                state["batch"], state["step"] = state["batch"] + 1, state["step"] + 1
                progress.update(state["batch"], len(x), state["sums"]["loss"] / state["batch"])
                if run.stop_requested or run.checkpoint_due():
                    run.save(model, optimizer, generator, state)
                    if run.stop_requested:
                        return run.records, True
            run.log({"epoch": epoch + 1, "step": state["step"], **{   # the epoch's averages (no E_eq when S = 1)
                f"train_{name}": total / state["batch"] for name, total in state["sums"].items()
                if name != "eq_error" or config["n_transforms"] > 1}})
            state.update(epoch=epoch + 1, plan=None)
            evaluate_if_due(model, data, config, run, state)
            run.save(model, optimizer, generator, state)
            if run.stop_requested:
                return run.records, True
    return run.records, False


def evaluate_if_due(model, data, config, run, state):
    """Evaluate at epochs trained 0, eval_epochs, 2·eval_epochs, … and after the last, each once."""
    epoch = state["epoch"]
    if (epoch % config["eval_epochs"] == 0 or epoch == config["max_epochs"]) and state["evaluated"] != epoch:
        model.eval()
        run.log({"epoch": epoch, "step": state["step"], **evaluate(model, data, config, run.folder, epoch)})
        state["evaluated"] = epoch


# ─── Evaluation ──────────────────────────────────────────────────────────────

@torch.no_grad()
def evaluate(model, data, config, out_dir, epoch):
    """Test log p(x) (tvae.py Eqs. (10)–(11)), E_eq (Eq. (9)), roll gain and accuracy per kind (Eqs. (12)–(13)); dSprites
    adds Table 2's capsule correlations, the 2-D model Figure 3. Pictures: a capsule traversal (Figures 1,
    4, 6, 22, 23) of the first test sequence of each kind, and prior samples."""
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    n_sequences = log_likelihood = eq_error = 0.0
    roll_sums, hit_sums, kind_counts, offsets, first, test_set = {}, {}, {}, [], None, []
    for x, labels, digit_classes in data.test_batches(max(config["batch_size"], 32), config["test_sequences"]):
        out = model(x)                                            # one posterior sample t per frame
        log_likelihood += model.log_likelihood(x, config["n_is_samples"]).sum().item()
        n_sequences += len(x)
        first = first or (x, labels)
        if S > 1:
            eq_error += tvae.equivariance_error(out["t"], S, caps, D).item() * len(x)
            errors, hits = tvae.roll_scores(model.decoder, x, out["t"], out["probs"], caps, D)   # (B, 3) each
            for kind, error, hit in zip(data.kinds(labels), errors.cpu(), hits.cpu()):
                roll_sums[kind] = roll_sums.get(kind, 0) + error
                hit_sums[kind] = hit_sums.get(kind, 0) + hit
                kind_counts[kind] = kind_counts.get(kind, 0) + 1
        if config["data"] == "dsprites":
            offsets.append(tvae.capsule_offsets(out["t"], labels, caps, D))
        if config["grouper"] == "map2d":                          # images, codes, classes for Figure 3
            test_set.append((x.flatten(0, 1).cpu(), out["t"].cpu(), digit_classes.cpu()))
    record = {"test_sequences": int(n_sequences), "test_log_likelihood": log_likelihood / (n_sequences * S)}
    if S > 1:
        record["test_eq_error"] = eq_error / n_sequences
        gains = {kind: tvae.roll_gains(roll_sums[kind]) for kind in sorted(roll_sums, key=datasets.KINDS.index)}
        record["test_roll_gain"] = {kind: roll.item() for kind, (roll, own) in gains.items()}
        record["test_self_gain"] = {kind: own.item() for kind, (roll, own) in gains.items()}
        for i, name in enumerate(("still", "roll", "self")):       # Eq. (13): the share of frames hit
            record[f"test_{name}_accuracy"] = {kind: hit_sums[kind][i].item() / (kind_counts[kind] * (S - 1))
                                               for kind in gains}
        generator = torch.Generator().manual_seed(config["test_seed"])    # the same noise every epoch
        x, kinds = first[0], data.kinds(first[1])                 # one traversal per kind, 3 rows each
        rows = [row for kind in sorted(set(kinds), key=datasets.KINDS.index)
                for row in model.capsule_traversal(x[kinds.index(kind)], caps, D, generator)]
        save_picture(config, out_dir, "traversal", epoch, rows)
        save_picture(config, out_dir, "samples", epoch, list(model.sample(4, S)))     # 4 sequences from the prior
    if offsets:
        record["test_capsule_correlation"] = tvae.capsule_correlations(offsets, datasets.DSPRITES_FACTORS)
    if config["grouper"] == "map2d":
        images, codes, classes = map(torch.cat, zip(*test_set))   # (n, C, H, W), (n, d), (n,)
        record["test_topography"] = figure3(model, first[0], images, codes, classes, config, out_dir, epoch)
    return record


def figure3(model, first_batch, images, t, classes, config, out_dir, epoch):
    """Figure 3's pictures from the test digits' images (n, C, H, W), codes t (n, d) and classes (n,),
    and how topographic the class-selectivity map is (tvae.topographic_agreement)."""
    map_shape = tuple(config["map_shape"])
    labels = tvae.class_selectivity(t, classes)                              # (d,), −1: no class
    share, shuffled = tvae.topographic_agreement(labels, map_shape, generator=torch.Generator().manual_seed(0))
    save_picture(config, out_dir, "samples", epoch, list(model.sample(100, 1)[:, 0].split(10)))
    most_active = images[t.abs().argmax(dim=0)]                              # (d, C, H, W)
    save_picture(config, out_dir, "max_activation", epoch, list(most_active.split(map_shape[1])))
    class_means = torch.stack([images[classes == c].mean(0).nan_to_num() for c in range(10)])  # (10, C, H, W)
    save_picture(config, out_dir, "selectivity", epoch, selectivity_rows(labels, map_shape, class_means))
    digits = first_batch[:16, 0]                                             # (16, C, H, W)
    reconstructions = model(digits[:, None])["probs"].view(digits.shape)
    save_picture(config, out_dir, "reconstruction", epoch, [digits, reconstructions])
    finite = [None if math.isnan(value) else value for value in (share, shuffled)]   # no pairs: null
    return {"selective_units": int((labels >= 0).sum()), "same_class_neighbours": finite[0],
            "shuffled": finite[1], "ratio": share / shuffled if None not in finite and shuffled else None}


# ─── Pictures ────────────────────────────────────────────────────────────────

def save_picture(config, out_dir, name, epoch, rows):
    """Rows of images [(n_i, C, H, W), …] as out_dir/NAME_EEE.png (EEE: epochs trained), frames enlarged 2–3×."""
    datasets.write_png(out_dir / f"{name}_{epoch:03d}.png", datasets.image_grid(rows),
                       scale=max(2, 84 // image_shape(config)[1]))


# Ten colours for the digit classes (Figure 3); no grey (between cells), no black (units without a class).
CLASS_COLOURS = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                              [148, 103, 189], [140, 86, 75], [227, 119, 194], [255, 255, 255],
                              [188, 189, 34], [23, 190, 207]]) / 255


def selectivity_rows(labels, map_shape, class_means):
    """Figure 3's class-selectivity map as rows of images: each unit a square in the colour of its class
    (labels (d,), −1 black); under it the legend, each class's mean test digit (10, C, H, W) in its colour."""
    colours = torch.cat([CLASS_COLOURS, torch.zeros(1, 3)])[labels.cpu()]       # −1 → black, (d, 3)
    cells = colours[:, :, None, None].expand(-1, -1, *class_means.shape[2:])     # (d, 3, H, W)
    means = class_means.cpu().mean(1, keepdim=True)                             # grey, (10, 1, H, W)
    legend = means / means.amax(dim=(2, 3), keepdim=True).clamp(min=1e-8) * CLASS_COLOURS[:, :, None, None]
    return [*cells.split(map_shape[1]), legend]


# ─── Below: plumbing (data, run folder, config checks, progress, benchmark, report, command line) ───

def load_data(config, data_dir, device):
    """The experiment's sequences on the device (datasets.py): plan_epoch, batch, test_batches, kinds."""
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise datasets.DataError(f"--data-dir {data_dir} is a file; it must be a folder for the data files")
    if config["data"] == "mnist":
        return datasets.MnistSequences(data_dir, config["seed"], config["test_seed"], config["train_kind"],
                                       config["test_kind"], colour=image_shape(config)[0] == 3, device=device)
    grid = (datasets.render_dsprites() if config["dsprites_source"] == "procedural"
            else datasets.load_dsprites(Path(data_dir) / datasets.DSPRITES_FILE))
    return datasets.DspritesSequences(grid.to(device), config["test_seed"], config["n_transforms"])


# ─── The run folder: one checkpoint is the run ───────────────────────────────

class RunError(RuntimeError):
    """A run cannot start or go on; str() is one line that says why and what to do."""


class ConfigError(RunError):
    """A config value that no run can use (exit status 2, like a bad option)."""


class NonFiniteLoss(RunError):
    """The loss became NaN or infinite; the run stops before the update, keeping its last checkpoint."""


# What --resume may change in a saved run, from the resumed step on; the rest fixes model, data and test set.
CHANGEABLE_ON_RESUME = ("max_epochs", "eval_epochs", "lr", "momentum", "n_is_samples", "test_sequences")
CHECKPOINT_EVERY_S = 600          # within an epoch: what a run killed without warning can lose


def read_checkpoint(folder, mmap=False):
    """checkpoint.pt of a run folder, loaded as data (weights_only: a crafted file cannot run code)."""
    path = Path(folder) / "checkpoint.pt"
    if not path.exists():
        raise RunError(f"--resume: no checkpoint in {folder} (start without --resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:          # whatever torch.load meets in a damaged or foreign file
        raise RunError(f"cannot read {path} ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]});"
                       f" start again with --overwrite, or into another --out") from None


class RunFolder:
    """The files of one run in out_dir. checkpoint.pt is the run: config, weights, optimizer, RNG states,
    the place in the epoch and the metrics so far, replaced atomically; resume reads nothing else.
    config.json, metrics.jsonl and the pictures are written for people and tools; a folder without a
    checkpoint holds no run. While open, the run holds an flock on .lock (the operating system releases it
    however the process ends), and Ctrl-C or SIGTERM only sets stop_requested (a second one stops at once).
    """

    def __init__(self, out_dir, config, device, resume=False, overwrite=False):
        self.folder, self.config, self.device = Path(out_dir), config, torch.device(device)
        self.checkpoint = self.folder / "checkpoint.pt"
        self.saved = self._checked_checkpoint(resume, overwrite)   # reads only; every write holds the lock

    def __enter__(self):
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.folder / ".lock", "w")
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"--out {self.folder} is in use by another run; wait for it to end, "
                           f"or choose another --out") from None
        except OSError as error:
            raise RunError(f"--out {self.folder}: cannot write there ({error.strerror})") from None
        for path in [] if self.saved else [self.checkpoint, *self.folder.glob("*_[0-9][0-9][0-9].png")]:
            path.unlink(missing_ok=True)                                 # nothing of an old run stays
        self.records = self.saved["metrics"] if self.saved else []
        (self.folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        (self.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.saved_at, self.stop_requested = time.perf_counter(), False
        self.started = self.saved_at - (self.saved["state"]["wall_s"] if self.saved else 0)   # over resumptions
        self.handlers = {n: signal.signal(n, self._stop) for n in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _stop(self, number, frame):
        self.stop_requested = True
        print(f"\n{signal.Signals(number).name}: stopping after the current step (or evaluation) to save "
              f"a checkpoint; a second one stops at once", file=sys.stderr)
        for n, handler in self.handlers.items():   # the handlers from before: a second signal stops at once
            signal.signal(n, handler)

    def __exit__(self, *exc):
        for n, handler in self.handlers.items():
            signal.signal(n, handler)
        self.lock.close()

    def _checked_checkpoint(self, resume, overwrite):
        """The checkpoint a resumed run continues (None for a new run), once resume/overwrite allow it."""
        if not resume:
            if self.checkpoint.exists() and not overwrite:
                raise RunError(f"--out {self.folder} holds a run already: continue it with --resume, "
                               f"or replace it with --overwrite")
            return None
        saved, name = read_checkpoint(self.folder), self.config["name"]
        if saved["config"]["name"] != name:
            raise RunError(f"--resume: {self.folder} holds a run of {saved['config']['name']}, not {name}")
        self.changes = {key: (saved["config"][key], value) for key, value in self.config.items()   # but labels
                        if key in saved["config"] and key not in ("paper", "table")
                        and json.dumps(saved["config"][key]) != json.dumps(value)}
        for key in sorted(set(self.changes) - set(CHANGEABLE_ON_RESUME)):
            old, new = (json.dumps(value) for value in self.changes[key])
            raise RunError(f"--resume: {key} cannot change in a saved run (it ran with {old}, asked {new}); "
                           f"start a new run with another --out")
        return saved

    def restore(self, model, optimizer, generator):
        """The run's state: new, or the checkpoint's (weights, optimizer, RNGs) with the allowed changes."""
        where = f"{self.config['name']}: {self.config['paper']}; {self.device}; "
        if self.saved is None:
            print(where + f"writing to {self.folder}", file=sys.stderr)
            return {"epoch": 0, "batch": 0, "step": 0, "plan": None, "sums": None, "evaluated": -1}
        model.load_state_dict(self.saved["model"])
        optimizer.load_state_dict(self.saved["optimizer"])
        for group in optimizer.param_groups:      # the config's lr and momentum run from here
            group.update(lr=self.config["lr"], momentum=self.config["momentum"])
        rng, state = self.saved["rng"], self.saved["state"]
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["data"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        changes = "".join(f"; {key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in self.changes.items())
        print(where + f"resuming {self.folder} after {state['epoch']} epochs, step {state['step']}{changes}",
              file=sys.stderr)
        self.saved = None                         # the state lives on in the loop
        return state

    def wall_s(self):
        return round(time.perf_counter() - self.started, 1)        # seconds trained and evaluated

    def log(self, record):
        """Append one metrics line (with the wall-clock time and the device) to metrics.jsonl."""
        self.records.append(dict(record, wall_s=self.wall_s(), device=str(self.device)))
        with (self.folder / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(self.records[-1]) + "\n")

    def save(self, model, optimizer, generator, state):
        """Write checkpoint.pt atomically: a kill at any moment leaves the old or the new one."""
        rng = {"torch": torch.get_rng_state(), "data": generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
                    "state": dict(state, wall_s=self.wall_s()), "config": self.config, "metrics": self.records},
                   self.folder / "checkpoint.pt.tmp")
        os.replace(self.folder / "checkpoint.pt.tmp", self.checkpoint)
        self.saved_at = time.perf_counter()

    def checkpoint_due(self):
        return time.perf_counter() - self.saved_at >= CHECKPOINT_EVERY_S


# ─── Checking a config before anything runs ──────────────────────────────────

def _is_int(value, low=None):
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def _is_number(value, low=-math.inf):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low < value < math.inf


_RULES = {   # key: (the test a value must pass, what it must be)
    **dict.fromkeys(("batch_size", "eval_epochs", "n_is_samples", "n_caps", "cap_dim", "n_transforms"),
                    (lambda v: _is_int(v, 1), "a positive integer")),
    "max_epochs": (lambda v: _is_int(v, 0), "a non-negative integer (0: only evaluate the untrained model)"),
    **dict.fromkeys(("seed", "test_seed"), (_is_int, "an integer")),
    **dict.fromkeys(("train_sequences", "test_sequences"),
                    (lambda v: v is None or _is_int(v, 1), "a positive integer or null (all)")),
    **dict.fromkeys(("lr", "eps"), (lambda v: _is_number(v, 0), "a positive number")),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "mu_init": (lambda v: v is None or _is_number(v), "a number"),
    "n_off_diag": (lambda v: v is None or _is_int(v, 0), "a non-negative integer"),
    **dict.fromkeys(("group_kernel", "map_shape"), (lambda v: v is None or isinstance(v, (list, tuple))
                                                    and len(v) == 2 and all(_is_int(k, 1) for k in v),
                                                    "two positive integers")),
    "data": (lambda v: v in ("mnist", "dsprites"), "mnist or dsprites"),
    "grouper": (lambda v: v in ("shifting", "stationary", "map2d", "none"), "shifting, stationary, map2d or none"),
    "dsprites_source": (lambda v: v in ("file", "procedural"), "file or procedural"),
}


def validate_config(config):
    """Raise ConfigError naming the first bad key, its value and what it must be: the one judge of a config."""
    def bad(key, allowed):
        raise ConfigError(f"config key {key}={json.dumps(config.get(key))}: must be {allowed}")

    if not isinstance(config.get("name"), str) or config["name"] not in EXPERIMENTS:
        bad("name", "the name of an experiment (--list shows them)")
    if config.keys() - (keys := EXPERIMENTS[config["name"]].keys()):
        raise ConfigError(f"unknown config key(s) {', '.join(sorted(config.keys() - keys))}; "
                          f"the keys are: {', '.join(sorted(keys))}")
    for key, (ok, allowed) in _RULES.items():
        if key in config and not ok(config[key]):
            bad(key, allowed)
    kinds = datasets.SEQUENCE_KINDS if config["data"] == "mnist" else ("dsprites",)
    for key in [key for key in ("train_kind", "test_kind") if config[key] not in kinds]:
        bad(key, " or ".join(kinds))
    S, frames = config["n_transforms"], 1 if config["train_kind"] == "none" else datasets.N_FRAMES_MNIST
    if config["data"] == "mnist" and S != frames:
        bad("n_transforms", f"{frames}, the frames of a {config['train_kind']} sequence")
    if config["data"] == "dsprites" and S < 2:
        bad("n_transforms", "at least 2 for dSprites sequences")
    if config["train_sequences"] is not None and config["train_sequences"] < config["batch_size"]:
        bad("train_sequences", f"at least one batch ({config['batch_size']})")
    if config["grouper"] == "none":
        return
    for key in ("group_kernel", "mu_init") + (("n_off_diag",) if config["grouper"] == "shifting" else ()):
        if config[key] is None:
            bad(key, f"set for a {config['grouper']} grouper")
    if config["grouper"] == "map2d" and (config["map_shape"] is None or config["n_caps"] != 1
                                         or math.prod(config["map_shape"]) != config["cap_dim"]):
        bad("map_shape", f"two positive integers whose product is cap_dim ({config['cap_dim']}), with n_caps 1")
    torus, keys = ((config["map_shape"], ("map_shape",) * 2) if config["grouper"] == "map2d"
                   else ((S, config["cap_dim"]), ("n_transforms", "cap_dim")))
    for k, size, key in zip(config["group_kernel"], torus, keys):
        if k > size:
            bad(key, f"at least the kernel's {k} (group_kernel {json.dumps(list(config['group_kernel']))})")


# ─── Progress on long runs ───────────────────────────────────────────────────

class Progress:
    """step/total, sequences/second, running loss, time left: in place on a terminal, else a line every 30 s."""

    def __init__(self, stream=sys.stderr, every=30.0):
        self.stream, self.in_place, self.last = stream, stream.isatty(), 0.0
        self.every = 0.2 if self.in_place else every

    def start_epoch(self, epoch, n_epochs, n_batches, done):   # epochs before this one; its batches done already
        self.epoch, self.n_epochs, self.n_batches, self.t0, self.done0 = epoch, n_epochs, n_batches, time.time(), done

    def update(self, done, sequences, running_loss):               # done: the epoch's batches trained so far
        now = time.time()
        if now - self.last < self.every and done < self.n_batches:
            return
        self.last, rate = now, (done - self.done0) / max(now - self.t0, 1e-9)          # batches per second
        left = [(self.n_batches - done) / rate, ((self.n_epochs - self.epoch) * self.n_batches - done) / rate]
        left = [f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" for s in map(int, left)]
        line = (f"epoch {self.epoch + 1}/{self.n_epochs}  step {done}/{self.n_batches}  {rate * sequences:.1f} seq/s"
                f"  loss {running_loss:.1f}  left: epoch {left[0]}, run {left[1]}")
        if self.in_place:                          # one line per epoch, rewritten in place
            self.stream.write(f"\r{line}\033[K" + ("\n" if done == self.n_batches else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ─── Benchmark: where a training step's time goes ────────────────────────────

def benchmark(name, data_dir=None, device="cpu", dsprites_source="file", repeats=7, steps=10):
    """Median times of a training step and, as shares (ratios of times taken side by side survive a noisy
    machine), of making its batch of sequences and of the roll gain in evaluating a batch."""
    config = dict(EXPERIMENTS[name], **({"dsprites_source": dsprites_source} if name.endswith("dsprites") else {}))
    S, caps, D, B = (config[key] for key in ("n_transforms", "n_caps", "cap_dim", "batch_size"))
    torch.manual_seed(0)
    model, device = build_model(config).to(device), torch.device(device)
    optimizer, generator = sgd(model.parameters(), config, device), torch.Generator().manual_seed(0)
    data = load_data(config, data_dir, device)
    rows = data.plan_epoch(B, None, generator)[0]
    x = data.batch(rows, generator)[0]                                      # (B, S, C, H, W)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None     # wait for the GPU

    def median_ms(fn):
        times = []
        for _ in range(repeats + 1):                                      # the first warms up
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / steps * 1e3)
        return sorted(times[1:])[repeats // 2]

    step_ms = median_ms(lambda: train_step(model, optimizer, data.batch(rows, generator)[0], config))
    data_ms = median_ms(lambda: data.batch(rows, generator))
    print(f"{name} on {device} ({torch.get_num_threads()} threads), batch {B} sequences x {S} frames x "
          f"{'x'.join(map(str, image_shape(config)))}, median of {repeats} x {steps}\n"
          f"  training step (data + forward + E_eq + backward + SGD): {step_ms:8.2f} ms = "
          f"{B / step_ms * 1e3:.1f} sequences/s\n  making the batch of sequences alone:  {data_ms:8.2f} ms = "
          f"{100 * data_ms / step_ms:.1f}% of a step")
    if S > 1:
        with torch.no_grad():
            out = model(x)
            evaluation_ms = median_ms(lambda: (model(x), model.log_likelihood(x, config["n_is_samples"])))
            roll_ms = median_ms(lambda: tvae.roll_scores(model.decoder, x, out["t"], out["probs"], caps, D))
        print(f"  roll gain of a batch, Eq. (12):       {roll_ms:8.2f} ms = {100 * roll_ms / evaluation_ms:.1f}% of "
              f"the rest of evaluating it ({evaluation_ms:.2f} ms: forward + log p(x), K = {config['n_is_samples']})")


# ─── Report: the paper's tables from run folders ─────────────────────────────

def read_run(folder):
    """(config, metrics records, paper table) of a run folder; a last line without its newline is unfinished."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().split("\n")[:-1]]
        return config, records, EXPERIMENTS[config["name"]]["table"]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise RunError(f"--report: {folder} is not a readable run folder ({type(error).__name__}: {error})") from None


def _number(value, digits=1):
    return "–" if value is None else f"{round(value, digits) + 0.0:,.{digits}f}"     # + 0.0: no "-0.00"


def _cells(config, r, kinds, table=None):
    """One evaluation r as table cells, header → cell; a row of a paper table names its experiment first
    (and its training seed, where not the registry's)."""
    n = r.get("test_sequences", config["test_sequences"] or (1024 if config["data"] == "dsprites" else None))
    other_seed = f" (seed {config['seed']})" * (config["seed"] != EXPERIMENTS[config["name"]]["seed"])
    cells = {"experiment": f"`{config['name']}`{other_seed}"} if table else {}
    cells |= {"epochs": str(r["epoch"]), "steps": f"{r['step']:,}", "test sequences": f"{n:,}" if n else "all",
              "test E_eq": _number(r.get("test_eq_error"), 0), "test log p(x)": _number(r["test_log_likelihood"])}
    if table == "Table 1":          # the authors' code leaves out − log K (tvae.py Eq. (11))
        cells["paper's convention (+log K)"] = _number(r["test_log_likelihood"] + math.log(config["n_is_samples"]))
    for factor, value in (r.get("test_capsule_correlation") or {}).items():
        cells[f"test corr. {factor}"] = _number(value, 2)
    for key, value in (r.get("test_topography") or {}).items():
        cells[key.replace("_", " ")] = str(value) if key == "selective_units" else _number(value, 2 + (key != "ratio"))
    gains, accuracies = r.get("test_roll_gain") or {}, {
        name: r.get(f"test_{name}_accuracy") or {} for name in ("roll", "still", "self")}
    cells |= {f"roll gain {kind}": _number(gains.get(kind), 2) for kind in kinds}
    cells |= {f"roll accuracy {kind} (still, own)": "–" if kind not in accuracies["roll"] else   # Eq. (13)
              "{} ({}, {})".format(*(_number(accuracies[name][kind], 2) for name in ("roll", "still", "self")))
              for kind in kinds}
    return cells | {
        "hours": _number(r["wall_s"] / 3600 if "wall_s" in r else None, 2)}


def _table(title, rows):
    """A titled Markdown table of the columns (header → cell) that hold a value in some row ("–": none)."""
    columns = [key for key in dict.fromkeys(key for row in rows for key in row)
               if any(row.get(key, "–") != "–" for row in rows)]
    return [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(row.get(key, "–") for key in columns) + " |" for row in rows), ""] if rows else []


def report(folders, epochs=None):
    """Markdown from run folders: Table 1 and Table 2, each at one budget, the most epochs after which
    every run of the table was evaluated (at most `epochs` when given), every run's untrained row first;
    then each run's evaluations over epochs, every 10th and the last (metrics.jsonl holds them all)."""
    runs = sorted([(folder, *read_run(folder)) for folder in folders],
                  key=lambda run: (list(EXPERIMENTS).index(run[1]["name"]), max([r["step"] for r in run[2]] + [0])))
    tested = {folder: [r for r in records if "test_log_likelihood" in r and (epochs is None or r["epoch"] <= epochs)]
              for folder, _, records, _ in runs}
    budgets = {table: max(set.intersection(*({r["epoch"] for r in tested[folder]}
                                             for folder, _, _, in_table in runs if in_table == table)), default=0)
               for table in {table for *_, table in runs if table}}
    tables, over_epochs = {"Table 1": [], "Table 2": []}, []
    for folder, config, records, table in runs:
        kinds = {"Table 1": datasets.KINDS[:3], "Table 2": [*datasets.DSPRITES_FACTORS.values()]}.get(table) or [
            *dict.fromkeys(kind for r in tested[folder] for kind in r.get("test_roll_gain", {}))]   # as they appear
        if table:                                  # untrained, then after the table's budget
            rows = [r for r in tested[folder] if r["epoch"] in {0, budgets[table]}]
            tables[table] += [_cells(config, r, kinds, table) for r in rows]
        if len(tested[folder]) > 2:
            over_epochs += _table(f"`{config['name']}` in {folder}: every 10th evaluation and the last", [
                _cells(config, r, kinds) for i, r in enumerate(tested[folder])
                if i % 10 == 0 or i == len(tested[folder]) - 1])
    return "\n".join([line for table, data in (("Table 1", "MNIST"), ("Table 2", "dSprites")) for line in _table(
        f"{table}: {data} sequences after {budgets.get(table)} epochs, each run beside its untrained model",
        tables[table])] + over_epochs)


# ─── Command line ────────────────────────────────────────────────────────────

class _Parser(argparse.ArgumentParser):
    def error(self, message):          # a mistake on the command line: one line on stderr, exit status 2
        print(f"error: {message} (python experiments.py --help explains the options)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    """The command line, parsed only: validate_config judges the values."""
    parser = _Parser(prog="experiments.py", description="Train one experiment of 'Topographic VAEs learn "
                     "Equivariant Capsules' (Keller & Welling, NeurIPS 2021) into --out: config.json, "
                     "metrics.jsonl, checkpoint.pt, PNG pictures.")
    add = parser.add_argument
    add("name", nargs="?", choices=EXPERIMENTS, metavar="NAME", help="the experiment to run (see --list)")
    add("--list", action="store_true", help="list every experiment with the figure or table it reproduces")
    add("--show", action="store_true", help="print NAME's whole config, with this command line's changes")
    add("--report", nargs="+", type=Path, metavar="DIR", help="print the paper's tables (Markdown) from run folders")
    add("--benchmark", action="store_true", help="time a training step of NAME (tvae_Lhalf_mnist) and its parts")
    add("--epochs", type=int, help="epochs to train in all (max_epochs), counting those before a resume; "
        "0 only evaluates the untrained model; with --report, the tables after at most N epochs")
    add("--batch-size", type=int, help="sequences per batch (batch_size)")
    add("--lr", type=float, help="SGD learning rate (lr)")
    add("--seed", type=int, help="seed of initialisation, split and training sequences (seed); the test "
        "sequences come from test_seed, the same for every experiment")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="change any config key, VALUE read as JSON (e.g. --set n_is_samples=20); repeatable")
    add("--train-sequences", type=int, help="train on the first N sequences of each epoch only (quick runs)")
    add("--test-sequences", type=int, help="evaluate on the first N test sequences (default: all; dSprites 1024)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or mps (default: CUDA, else MPS, else the CPU)")
    add("--data-dir", type=Path, help="folder of the MNIST .gz files or the dSprites .npz, or where they are "
        "downloaded (default: $TVAE_DATA_DIR, else ./data)")
    add("--out", type=Path, help="output folder (default: runs/NAME)")
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint; only "
        + ", ".join(CHANGEABLE_ON_RESUME) + " may change")
    add("--overwrite", action="store_true", help="replace the run in --out (its checkpoint and pictures go)")
    add("--dsprites", choices=("file", "procedural"),
        help="dSprites from the published .npz (default) or the procedural renderer (dsprites_source)")
    return parser, parser.parse_args(argv)


def resolve_config(name, args, saved=None):
    """The registry's config, or a resumed run's saved one, with the command line's changes; validated."""
    config = dict(EXPERIMENTS[name])
    if saved is not None:          # the run's own settings; its name, paper and table come from the registry
        config.update((k, v) for k, v in saved.items() if k in config and k not in ("name", "paper", "table"))
    options = {"max_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "train_sequences": args.train_sequences, "test_sequences": args.test_sequences,
               "dsprites_source": args.dsprites if config["data"] == "dsprites" else None}
    config.update((key, value) for key, value in options.items() if value is not None)
    for key, sep, value in (text.partition("=") for text in args.set):
        if not sep:
            raise ConfigError(f"--set {key}: expected KEY=VALUE")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value                                     # a bare word is a string
    validate_config(config)
    return config


def pick_device(name="auto"):
    """CUDA, else Apple MPS, else the CPU; or the device named, if this machine has it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    if re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        try:
            return torch.zeros(1, device=name).device              # fails where this machine lacks it
        except (RuntimeError, AssertionError):
            pass
    raise ConfigError(f"--device {name}: must be cpu, cuda, cuda:N or mps, and present on this machine")


def main(argv=None):
    parser, args = parse_args(argv)
    if args.list:
        print("\n".join(f"{name:36s} {config['paper']}" for name, config in EXPERIMENTS.items()))
        return 0
    if not (args.name or args.report or args.benchmark):
        parser.error("name the experiment to run (--list shows them)")
    name = args.name or "tvae_Lhalf_mnist"
    out, data_dir = args.out or Path("runs") / name, args.data_dir or datasets.default_data_dir()
    resume = (f"python experiments.py {name} --resume --out {out}" + (f" --data-dir {args.data_dir}" if args.data_dir
              else "") + (f" --device {args.device}" if args.device != "auto" else ""))
    try:
        if args.report or args.benchmark:
            if args.report:
                print(report(args.report, args.epochs))
            else:
                benchmark(name, data_dir, pick_device(args.device), args.dsprites or "file")
            return 0
        saved = read_checkpoint(out, mmap=True) if args.resume else None
        config = resolve_config(name, args, saved and saved["config"])
        if args.show:
            print(json.dumps(config, indent=2))
            return 0
        device = pick_device(args.device)
        if saved and saved["state"]["epoch"] >= config["max_epochs"] == saved["state"]["evaluated"]:
            print(f"{out} holds a complete run of {name} ({config['max_epochs']} epochs); to train it further, "
                  f"give the epochs in all: {resume} --epochs N", file=sys.stderr)
            return 0
        records, interrupted = train(config, out, data_dir, device, args.resume, args.overwrite)
    except (datasets.DataError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:           # a second Ctrl-C: the last checkpoint stays as it was
        print("stopped at once" + (f"; continue with: {resume}" if (out / "checkpoint.pt").exists() else ""),
              file=sys.stderr)
        return 130
    print(f"stopped; the checkpoint is saved. Continue with: {resume}" if interrupted
          else f"done: {json.dumps(records[-1])}", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
