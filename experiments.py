"""Every experiment of the paper, one training loop, and the command line.

    python experiments.py --list                  # the experiments, and what each reproduces
    python experiments.py tvae_Lhalf_mnist        # train one (Table 1, L = 1/2)
    python experiments.py --report runs/*         # the paper's tables from runs

Read it top to bottom: the registry EXPERIMENTS (keys named as the authors' code names its
options), build_model, train (the loop), evaluate and Figure 3's pictures; then, below a marked
line, the plumbing: data, PNGs, run folder, config checks, progress, report, command line.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

# torch warns at import when numpy is absent; this project never uses numpy: that warning is noise.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
import torch  # noqa: E402  (after the filter above)

import datasets  # noqa: E402
import tvae  # noqa: E402

# ─── The registry: the paper's experiments ───
# Shared by all experiments unless overridden: SGD lr 1e-4, momentum 0.9, batches of 8 sequences,
# 100 epochs, an evaluation every 5 epochs, 10 importance samples for log p(x); `table`: the
# paper table it is a row of. `seed` (the authors') draws the initialisation, the split and the
# training sequences; `test_seed` the test sequences, one test set for every experiment.
_COMMON = dict(lr=1e-4, momentum=0.9, batch_size=8, max_epochs=100, eval_epochs=5,
               n_is_samples=10, eps=1e-6, mu_init=30.0, n_off_diag=None, map_shape=None,
               train_sequences=None, test_sequences=None, test_seed=1, table=None)
# MNIST: 18 capsules of 18 units; S = 18 frames of 28×28 digits, RGB (digit in red): hue changes.
_MNIST = dict(_COMMON, data="mnist", train_kind="single", test_kind="single",
              n_caps=18, cap_dim=18, n_transforms=18)
# dSprites: 15 capsules of 15 units; S = 15 frames of 64×64 sprites, from the file or procedural.
_DSPRITES = dict(_COMMON, data="dsprites", train_kind="dsprites", test_kind="dsprites",
                 n_caps=15, cap_dim=15, n_transforms=15, dsprites_source="file", seed=1,
                 table="Table 2")
_TABLE1 = dict(_MNIST, table="Table 1")


def _shifting(kernel, n_off_diag):
    """Shifting capsules (tvae.py Eq. (4)): a kT = kC = kernel window moving one unit per frame."""
    return dict(grouper="shifting", group_kernel=(kernel, kernel), n_off_diag=n_off_diag)


def _stationary(k_time, k_capsule):
    """Stationary capsules: every unit within k_time frames × k_capsule units (Bubbles, L = 0)."""
    return dict(grouper="stationary", group_kernel=(k_time, k_capsule))


_VAE = dict(grouper="none", group_kernel=None, mu_init=None)

EXPERIMENTS = {
    # Figure 3: one capsule of 324 units on an 18×18 torus, 5×5 neighbourhoods, single digits.
    "tvae_2d_mnist": dict(_MNIST, train_kind="none", test_kind="none", grouper="map2d",
                          n_caps=1, cap_dim=324, n_transforms=1, map_shape=(18, 18),
                          group_kernel=(5, 5), mu_init=10.0, batch_size=128, max_epochs=250,
                          seed=1, paper="Figure 3 (2-D topographic map)"),
    # Table 1 and Figure 4, MNIST, S = 18: L = 18/36 = 1/2, 13/36, 5/36; K = 3 throughout.
    "tvae_Lhalf_mnist": dict(_TABLE1, **_shifting(18, 1), seed=1, paper="Table 1, L=1/2"),
    "tvae_Lpartial_mnist": dict(_MNIST, **_shifting(13, 1), seed=2,
                                paper="Figure 4 (MNIST), L=13/36"),
    "tvae_Lshort_mnist": dict(_TABLE1, **_shifting(5, 1), seed=2, paper="Table 1, L=5/36"),
    "bubbles_mnist": dict(_TABLE1, **_stationary(5, 3), seed=1, paper="Table 1, Bubbles"),
    "tvae_L0_mnist": dict(_TABLE1, **_stationary(1, 3), seed=1, paper="Table 1, L=0"),
    "nontvae_mnist": dict(_TABLE1, **_VAE, seed=1, paper="Table 1, VAE"),
    # Figures 1, 6, Section B.4: trained one transformation at a time, tested on two together.
    "tvae_Lpartial_mnist_generalization": dict(
        _MNIST, **_shifting(13, 1), test_kind="dual", seed=2,
        paper="Figures 1, 6, Section B.4 (train single, test rotation+colour)"),
    "tvae_Lpartial_rotcolor_mnist": dict(_MNIST, **_shifting(13, 1), train_kind="dual",
                                         test_kind="dual", seed=1,
                                         paper="Figure 23 (rotation+colour)"),
    "tvae_Lpartial_perspective_mnist": dict(_MNIST, **_shifting(13, 1), train_kind="perspective",
                                            test_kind="perspective", seed=1,
                                            paper="Figure 22 (perspective+colour)"),
    # Table 2 and Figure 4, dSprites, S = 15: L = 15/30 = 1/2, 10/30 = 1/3, 5/30 = 1/6; K = 1.
    "tvae_Lhalf_dsprites": dict(_DSPRITES, **_shifting(15, 0), paper="Table 2, L=1/2"),
    "tvae_Lpartial_dsprites": dict(_DSPRITES, **_shifting(10, 0),
                                   paper="Figure 4 (dSprites), Table 2, L=1/3"),
    "tvae_Lshort_dsprites": dict(_DSPRITES, **_shifting(5, 0), paper="Table 2, L=1/6"),
    "bubbles_dsprites": dict(_DSPRITES, **_stationary(5, 5), paper="Table 2, Bubbles"),
    "tvae_L0_dsprites": dict(_DSPRITES, **_stationary(1, 3), eps=1e-3, paper="Table 2, L=0"),
    "nontvae_dsprites": dict(_DSPRITES, **_VAE, paper="Table 2, VAE"),
}
for _name, _config in EXPERIMENTS.items():
    _config["name"] = _name


def image_shape(config):
    """(C, H, W) of the experiment's images: RGB digits when colour changes."""
    digits = (1 if config["train_kind"] == "none" else 3, 28, 28)
    return (1, 64, 64) if config["data"] == "dsprites" else digits


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


# ─── Training ───

def train_step(model, optimizer, x, config):
    """One SGD step on sequences x (B, S, C, H, W); returns the terms it measures (loss, nll, kl
    and, for sequences, eq_error), each checked finite before the update."""
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    optimizer.zero_grad(set_to_none=True)
    out = model(x)                                                # per-image terms (N,), t (N, d)
    loss = out["loss"].mean()                                  # tvae.py Eq. (8), mean over images
    loss.backward()
    with torch.no_grad():                                      # the terms logged, not trained on
        terms = {"loss": loss, "nll": out["nll"].mean(), "kl": (out["kl_z"] + out["kl_u"]).mean()}
        if S > 1:                                                         # E_eq, tvae.py Eq. (9)
            terms["eq_error"] = tvae.equivariance_error(out["t"], S, caps, D)
    values = dict(zip(terms, torch.stack(list(terms.values())).tolist()))     # one device sync
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:                                                       # no NaN gets into the weights
        raise NonFiniteLoss(f"non-finite {', '.join(bad)} (values {values})")
    optimizer.step()
    return values


def train(config, out_dir, data_dir=None, device="cpu", resume=False, progress=None):
    """Train one experiment for config['max_epochs'] epochs into out_dir; returns its metrics.
    Epochs count epochs trained: the untrained model is evaluated at 0, then every eval_epochs
    and after the last. A checkpoint is saved at the start, at every epoch's end (before that
    epoch's evaluation) and after each evaluation. Ctrl-C or SIGTERM stop at once, keeping the
    last one; resume=True continues from it and ends as an unbroken run would."""
    validate_config(config)
    run = RunFolder(out_dir, config, device, resume)     # checks only: creates nothing
    torch.manual_seed(config["seed"])
    generator = torch.Generator().manual_seed(config["seed"])      # every random choice of the data
    model = build_model(config).to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                fused=run.device.type in ("cpu", "cuda"))   # fused: faster
    data, progress = load_data(config, data_dir, run.device), progress or Progress()
    B, n_sequences = config["batch_size"], config["train_sequences"]
    with run.open(model, optimizer, generator) as (epoch, step):   # epochs, steps done; 0 if new
        run.save(epoch, step)                                   # from here on, the folder is a run
        evaluate_if_due(model, data, config, run, epoch, step, progress)   # untrained, or cut off
        for epoch in range(epoch + 1, config["max_epochs"] + 1):  # the epoch trained, from 1
            model.train()
            sums = {}                                     # each term's total over the epoch
            progress.start_epoch(epoch, config["max_epochs"], data.n_batches(B, n_sequences))
            for batch, x in enumerate(data.epoch(B, n_sequences, generator), 1):  # (B, S, C, H, W)
                values = train_step(model, optimizer, x, config)
                sums = {name: sums.get(name, 0.0) + value for name, value in values.items()}
                progress.update(batch, len(x), sums["loss"] / batch)
            step += batch
            run.log({"epoch": epoch, "step": step,                    # the epoch's averages
                     **{f"train_{name}": total / batch for name, total in sums.items()}})
            run.save(epoch, step)                   # the random state its evaluation starts from
            evaluate_if_due(model, data, config, run, epoch, step, progress)
    return run.records


def evaluate_if_due(model, data, config, run, epoch, step, progress):
    """Evaluate when evaluation_due says so, log the result and save the checkpoint again."""
    if evaluation_due(config, epoch, run.records):
        model.eval()
        record = evaluate(model, data, config, run.folder, epoch, progress)
        run.log({"epoch": epoch, "step": step, **record})
        run.save(epoch, step)


def evaluation_due(config, epoch, records):
    """At epochs trained 0, eval_epochs, 2·eval_epochs, … and after the last, each once."""
    due = epoch % config["eval_epochs"] == 0 or epoch == config["max_epochs"]
    return due and not any(r["epoch"] == epoch and "test_sequences" in r for r in records)


# ─── Evaluation ───

@torch.no_grad()
def evaluate(model, data, config, out_dir, epoch, progress=None):
    """Test log p(x) (tvae.py Eqs. 10–11), E_eq (9), roll gain and accuracy per kind (12–13);
    dSprites adds Table 2's capsule correlations, the 2-D model Figure 3. Pictures: a traversal
    (Figures 1, 4, 6, 22, 23) of the first test sequence of each kind, and prior samples."""
    S, caps, D = config["n_transforms"], config["n_caps"], config["cap_dim"]
    n_sequences = log_likelihood = eq_error = 0.0
    roll_sums, offsets, first, test_set = {}, [], None, []
    batch_size, progress = max(config["batch_size"], 32), progress or Progress()
    progress.start_evaluation(epoch, data.test_size(batch_size, config["test_sequences"]))
    for x, labels, digit_classes in data.test_batches(batch_size, config["test_sequences"]):
        out = model(x)                                            # one posterior sample t per frame
        log_likelihood += model.log_likelihood(x, config["n_is_samples"]).sum().item()
        n_sequences += len(x)
        first = first or (x, labels)
        if S > 1:
            eq_error += tvae.equivariance_error(out["t"], S, caps, D).item() * len(x)
            errors, hits = tvae.roll_scores(model.decoder, x, out["t"], out["probs"], caps, D)
            scores = torch.cat([errors, hits.float(), torch.ones_like(errors[:, :1])], dim=1)
            for kind, row in zip(data.kinds(labels), scores.cpu()):   # E (3), hits (3), 1 sequence
                roll_sums[kind] = roll_sums.get(kind, 0) + row
        if config["data"] == "dsprites":
            offsets.append(tvae.capsule_offsets(out["t"], labels, caps, D))
        if config["grouper"] == "map2d":                      # images, codes, classes for Figure 3
            test_set.append((x.flatten(0, 1).cpu(), out["t"].cpu(), digit_classes.cpu()))
        progress.evaluated(int(n_sequences))
    record = {"test_sequences": int(n_sequences),
              "test_log_likelihood": log_likelihood / (n_sequences * S)}
    if S > 1:
        record["test_eq_error"] = eq_error / n_sequences
        gains = {kind: tvae.roll_gains(roll_sums[kind][:3])
                 for kind in sorted(roll_sums, key=datasets.KINDS.index)}
        record["test_roll_gain"] = {kind: roll.item() for kind, (roll, own) in gains.items()}
        record["test_self_gain"] = {kind: own.item() for kind, (roll, own) in gains.items()}
        hits = {kind: roll_sums[kind][3:].tolist() for kind in gains}   # still, roll, own, count
        for i, name in enumerate(("still", "roll", "self")):   # Eq. (13): the share of frames hit
            record[f"test_{name}_accuracy"] = {k: h[i] / (h[3] * (S - 1)) for k, h in hits.items()}
        generator = torch.Generator().manual_seed(config["test_seed"])   # the same noise each time
        x, kinds = first[0], data.kinds(first[1])             # one traversal per kind, 3 rows each
        rows = [row for kind in sorted(set(kinds), key=datasets.KINDS.index)
                for row in model.capsule_traversal(x[kinds.index(kind)], caps, D, generator)]
        save_picture(config, out_dir, "traversal", epoch, rows)
        save_picture(config, out_dir, "samples", epoch, list(model.sample(4, S)))   # from the prior
    if offsets:
        record["test_capsule_correlation"] = tvae.capsule_correlations(
            offsets, datasets.DSPRITES_FACTORS)
    if config["grouper"] == "map2d":
        images, codes, classes = map(torch.cat, zip(*test_set))   # (n, C, H, W), (n, d), (n,)
        record["test_topography"] = figure3(model, first[0], images, codes, classes, config,
                                            out_dir, epoch)
    return record


def figure3(model, first_batch, images, t, classes, config, out_dir, epoch):
    """Figure 3's pictures from the test digits' images (n, C, H, W), codes t (n, d) and classes
    (n,), and how topographic the class-selectivity map is (tvae.topographic_agreement)."""
    map_shape = tuple(config["map_shape"])
    labels = tvae.class_selectivity(t, classes)                              # (d,), −1: no class
    share, shuffled = tvae.topographic_agreement(labels, map_shape,
                                                 generator=torch.Generator().manual_seed(0))
    save_picture(config, out_dir, "samples", epoch, list(model.sample(100, 1)[:, 0].split(10)))
    most_active = images[t.abs().argmax(dim=0)]                              # (d, C, H, W)
    save_picture(config, out_dir, "max_activation", epoch, list(most_active.split(map_shape[1])))
    class_means = torch.stack([images[classes == c].mean(0).nan_to_num()
                               for c in range(10)])                          # (10, C, H, W)
    save_picture(config, out_dir, "selectivity", epoch,
                 datasets.selectivity_rows(labels, map_shape, class_means))
    digits = first_batch[:16, 0]                                             # (16, C, H, W)
    reconstructions = model(digits[:, None])["probs"].view(digits.shape)
    save_picture(config, out_dir, "reconstruction", epoch, [digits, reconstructions])
    finite = [None if math.isnan(value) else value for value in (share, shuffled)]  # no pairs
    ratio = share / shuffled if None not in finite and shuffled else None
    return {"selective_units": int((labels >= 0).sum()), "same_class_neighbours": finite[0],
            "shuffled": finite[1], "ratio": ratio}


# ─── Below: plumbing (data, PNGs, run folder, config checks, progress, report, command line)

def load_data(config, data_dir, device):
    """The experiment's sequences on the device (datasets.py): epoch, test_batches, kinds."""
    if config["data"] == "mnist":
        return datasets.MnistSequences(data_dir, config["seed"], config["test_seed"],
                                       config["train_kind"], config["test_kind"],
                                       image_shape(config)[0] == 3, device)
    grid = (datasets.render_dsprites() if config["dsprites_source"] == "procedural"
            else datasets.load_dsprites(data_dir))
    return datasets.DspritesSequences(grid.to(device), config["test_seed"], config["n_transforms"])


def save_picture(config, out_dir, name, epoch, rows):
    """Rows of images [(n_i, C, H, W), …] as out_dir/NAME_EEE.png (EEE: epochs trained)."""
    datasets.write_png(out_dir / f"{name}_{epoch:03d}.png", datasets.image_grid(rows),
                       scale=max(2, 84 // image_shape(config)[1]))


# ─── The run folder: one checkpoint is the run ───
# checkpoint.pt holds all a run needs to go on: config, weights, optimizer, RNG states, epochs and
# steps done, metrics; resume reads nothing else. config.json and metrics.jsonl are written from
# it. Each file is written under a temporary name and renamed, so a kill leaves the old one or the
# new one. A run holds an flock on .lock, which the OS releases however the process ends.

class RunError(RuntimeError):
    """A run cannot start or go on; str() is one line that says why and what to do."""


class NonFiniteLoss(RunError):
    """The loss became NaN or infinite; the run stops before the update, keeping its checkpoint."""


# What --resume may change in a saved run; the rest fixes the model, the data and the test set.
CHANGEABLE_ON_RESUME = ("max_epochs", "eval_epochs", "lr", "momentum", "n_is_samples",
                        "test_sequences")


def read_checkpoint(folder, mmap=False):
    """checkpoint.pt of a run folder, loaded as data (weights_only: a crafted file runs no code)."""
    path = Path(folder) / "checkpoint.pt"
    if not path.exists():
        raise RunError(f"--resume: no checkpoint in {folder} (start without --resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:          # whatever torch.load meets in a damaged or foreign file
        raise RunError(f"cannot read {path} ({_reason(error)}); start again into another --out"
                       ) from None


def _reason(error):                     # an exception in a few words: the OS's, else its first line
    first_line = (str(error).splitlines() or [""])[0][:200]
    return getattr(error, "strerror", None) or f"{type(error).__name__}: {first_line}"


def epochs_in_words(n):                                         # '1 epoch', '2 epochs'
    return f"{n} epoch" + ("" if n == 1 else "s")


class RunFolder:
    """The files of one run in out_dir: checked when made, created and locked by open()."""

    def __init__(self, out_dir, config, device, resume=False):
        self.folder, self.config, self.device = Path(out_dir), config, torch.device(device)
        self.checkpoint = self.folder / "checkpoint.pt"
        if self.checkpoint.exists() and not resume:
            raise RunError(f"--out {self.folder} holds a run already: continue it with --resume, "
                           f"or start again into another --out")
        self.saved = read_checkpoint(self.folder) if resume else None     # reads only
        old = self.saved["config"] if resume else config
        self.changes = {key: (old[key], value) for key, value in config.items()   # labels aside
                        if key in old and key not in ("paper", "table")
                        and json.dumps(old[key]) != json.dumps(value)}
        for key in sorted(set(self.changes) - set(CHANGEABLE_ON_RESUME)):
            old, new = (json.dumps(value) for value in self.changes[key])
            raise RunError(f"--resume: {key} cannot change in a saved run (it ran with {old}, "
                           f"asked {new}); start a new run with another --out")

    @contextlib.contextmanager
    def open(self, model, optimizer, generator):
        """Lock the folder and yield the epochs and steps done: (0, 0) for a new run, else the
        checkpoint's, whose states are loaded. Inside, SIGTERM raises KeyboardInterrupt."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = open(self.folder / ".lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"--out {self.folder} is in use by another run; wait for it to end, "
                           f"or choose another --out") from None
        except OSError as error:
            raise RunError(f"--out {self.folder}: cannot write there ({error.strerror})") from None
        with lock:
            state = self._restore(model, optimizer, generator)
            config = json.dumps(self.config, indent=2) + "\n"
            self._write("config.json", lambda path: path.write_text(config))
            self.log()
            handlers = {n: signal.signal(n, signal.default_int_handler)    # KeyboardInterrupt
                        for n in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield state["epoch"], state["step"]
            except NonFiniteLoss as error:
                raise NonFiniteLoss(f"{error} in epoch {self.epoch + 1}; {self.checkpoint} keeps "
                                    f"the run after {epochs_in_words(self.epoch)}") from None
            finally:
                for number, handler in handlers.items():
                    signal.signal(number, handler)

    def _restore(self, model, optimizer, generator):
        """Load a resumed run's weights, optimizer and RNG states (lr and momentum: the config's);
        say in a line what runs where. Returns the state: epochs, steps and seconds done."""
        saved, news = self.saved, f"writing to {self.folder}"
        if saved:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            for group in optimizer.param_groups:
                group.update(lr=self.config["lr"], momentum=self.config["momentum"])
            torch.set_rng_state(saved["rng"]["torch"])
            generator.set_state(saved["rng"]["data"])
            if "cuda" in saved["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved["rng"]["cuda"], self.device)
            news = (f"resuming {self.folder} after {epochs_in_words(saved['state']['epoch'])}, "
                    f"step {saved['state']['step']}") + "".join(
                f"; {key} {json.dumps(old)} -> {json.dumps(new)}"
                for key, (old, new) in self.changes.items())
        print(f"{self.config['name']}: {self.config['paper']}; {self.device}; {news}",
              file=sys.stderr)
        state = saved["state"] if saved else {"epoch": 0, "step": 0, "wall_s": 0}
        self.started, self.epoch = time.perf_counter() - state["wall_s"], state["epoch"]
        self.saving, self.records = (model, optimizer, generator), saved["metrics"] if saved else []
        self.saved = None                                   # the state lives on in the loop
        return state

    def wall_s(self):
        return round(time.perf_counter() - self.started, 1)        # seconds trained and evaluated

    def log(self, record=None):
        """Add a metrics record, with the time so far and the device; rewrite metrics.jsonl."""
        if record:
            self.records.append(dict(record, wall_s=self.wall_s(), device=str(self.device)))
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        self._write("metrics.jsonl", lambda path: path.write_text(text))

    def save(self, epoch, step):
        """Write checkpoint.pt: the run after `epoch` epochs and `step` steps."""
        model, optimizer, generator = self.saving
        rng = {"torch": torch.get_rng_state(), "data": generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"epoch": epoch, "step": step, "wall_s": self.wall_s()}
        self._write("checkpoint.pt", lambda path: torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
             "state": state, "config": self.config, "metrics": self.records}, path))
        self.epoch = epoch

    def _write(self, name, write):
        """write(path) to a temporary path, then rename it; a full disk is one line that says so."""
        temporary = self.folder / f"{name}.tmp"
        try:
            write(temporary)
            os.replace(temporary, self.folder / name)
        except (OSError, RuntimeError) as error:          # torch.save raises a RuntimeError
            then = "continue with --resume" if self.checkpoint.exists() else "start again"
            raise RunError(f"cannot write {name} in {self.folder} ({_reason(error)}); if the disk "
                           f"is full, free some space, then {then}") from None
        finally:
            temporary.unlink(missing_ok=True)


# ─── Checking a config before anything runs ───

class ConfigError(RunError):
    """A config value that no run can use (exit status 2, like a bad option)."""


def _is(value, kinds=int, low=-math.inf, high=math.inf):      # never a bool, never NaN
    return isinstance(value, kinds) and not isinstance(value, bool) and low <= value < high


_RULES = {   # key: (the test a value must pass, what it must be)
    **dict.fromkeys(("batch_size", "eval_epochs", "n_is_samples", "n_caps", "cap_dim",
                     "n_transforms"), (lambda v: _is(v, int, 1), "a positive integer")),
    "max_epochs": (lambda v: _is(v, int, 0),
                   "a non-negative integer (0: only evaluate the untrained model)"),
    **dict.fromkeys(("seed", "test_seed"), (_is, "an integer")),
    **dict.fromkeys(("train_sequences", "test_sequences"),
                    (lambda v: v is None or _is(v, int, 1), "a positive integer or null (all)")),
    **dict.fromkeys(("lr", "eps"), (lambda v: _is(v, (int, float)) and v > 0, "a positive number")),
    "momentum": (lambda v: _is(v, (int, float), 0, 1), "a number in [0, 1)"),
    "mu_init": (lambda v: v is None or _is(v, (int, float)), "a number"),
    "n_off_diag": (lambda v: v is None or _is(v, int, 0), "a non-negative integer"),
    **dict.fromkeys(("group_kernel", "map_shape"),
                    (lambda v: v is None or isinstance(v, (list, tuple))
                     and [_is(k, int, 1) for k in v] == [True, True], "two positive integers")),
    "data": (lambda v: v in ("mnist", "dsprites"), "mnist or dsprites"),
    "grouper": (lambda v: v in ("shifting", "stationary", "map2d", "none"),
                "shifting, stationary, map2d or none"),
    "dsprites_source": (lambda v: v in ("file", "procedural"), "file or procedural"),
}


def validate_config(config):
    """Raise ConfigError naming the first bad key, its value and what it must be: the one judge
    of a config."""
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
    S = config["n_transforms"]
    frames = 1 if config["train_kind"] == "none" else datasets.N_FRAMES_MNIST
    if config["data"] == "mnist" and S != frames:
        bad("n_transforms", f"{frames}, the frames of a {config['train_kind']} sequence")
    if config["data"] == "dsprites" and S < 2:
        bad("n_transforms", "at least 2 for dSprites sequences")
    if config["train_sequences"] is not None and config["train_sequences"] < config["batch_size"]:
        bad("train_sequences", f"at least one batch ({config['batch_size']})")
    if config["grouper"] == "none":
        return
    needs = {"shifting": ("n_off_diag",), "map2d": ("map_shape",)}.get(config["grouper"], ())
    for key in [key for key in ("group_kernel", "mu_init", *needs) if config[key] is None]:
        bad(key, f"set for a {config['grouper']} grouper")
    map2d = config["grouper"] == "map2d"
    if map2d and (config["n_caps"] != 1 or math.prod(config["map_shape"]) != config["cap_dim"]):
        bad("map_shape", f"two integers whose product is cap_dim ({config['cap_dim']}), n_caps 1")
    torus, keys = ((config["map_shape"], ("map_shape",) * 2) if map2d  # the torus W slides on
                   else ((S, config["cap_dim"]), ("n_transforms", "cap_dim")))
    for key, k, size in zip(keys, config["group_kernel"], torus):
        if k > size:
            bad(key, f"at least the kernel's {k} (group_kernel {list(config['group_kernel'])})")


# ─── Progress on long runs ───

class Progress:
    """Where a run is and the time left: the step, sequences/second and running loss in training,
    the test sequences done in evaluation: a line at each start, then one every `every` seconds."""

    def __init__(self, stream=None, every=15.0):                # stream: sys.stderr by default
        self.stream, self.every = stream or sys.stderr, every

    def start_epoch(self, epoch, n_epochs, n_batches):        # epoch: the one trained, from 1
        self.epoch, self.n_epochs, self.total = epoch, n_epochs, n_batches
        self.t0, self.last = time.time(), 0.0

    def update(self, done, sequences, running_loss):          # done: the epoch's batches so far
        later = (self.n_epochs - self.epoch) * self.total     # the batches of the epochs after
        self._show(done, sequences, f"epoch {self.epoch}/{self.n_epochs}  step {done}/"
                   f"{self.total}  loss {running_loss:.1f}", later)

    def start_evaluation(self, epoch, n_sequences):
        what = "the untrained model" if epoch == 0 else f"after {epochs_in_words(epoch)}"
        print(f"evaluating {what} on {n_sequences:,} test sequences", file=self.stream)
        self.total, self.t0, self.last = n_sequences, time.time(), 0.0

    def evaluated(self, done):                                # done: test sequences so far
        self._show(done, 1, f"evaluated {done:,}/{self.total:,} test sequences")

    def _show(self, done, sequences, text, later=0):          # later: what comes after this count
        now = time.time()
        if done < self.total and now - self.last < self.every:
            return
        rate = done / max(now - self.t0, 1e-9)
        text += f"  {rate * sequences:.1f} seq/s  left {_duration((self.total - done) / rate)}"
        text += f" (run {_duration((self.total - done + later) / rate)})" if later else ""
        self.last = now
        print(text, file=self.stream, flush=True)


def _duration(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ─── Report: the paper's tables from run folders ───

def read_run(folder):
    """(config, metrics records, paper table) of a run folder; a last line without its newline is
    unfinished."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        lines = (Path(folder) / "metrics.jsonl").read_text().split("\n")[:-1]
        return config, [json.loads(line) for line in lines], EXPERIMENTS[config["name"]]["table"]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise RunError(f"--report: {folder} is not a readable run folder "
                       f"({type(error).__name__}: {error})") from None


def _number(value, digits=1):
    return "–" if value is None else f"{round(value, digits) + 0.0:,.{digits}f}"   # no "-0.00"


def _registry_seed(config):                # trained with the seed the registry gives its experiment
    return config["seed"] == EXPERIMENTS[config["name"]]["seed"]


def _cells(config, r, kinds, table=None):
    """One evaluation r as table cells, header → cell; a row of a paper table names its experiment
    first (and its training seed, where not the registry's)."""
    n = r.get("test_sequences",
              config["test_sequences"] or (1024 if config["data"] == "dsprites" else None))
    other_seed = "" if _registry_seed(config) else f" (seed {config['seed']})"
    cells = {"experiment": f"`{config['name']}`{other_seed}"} if table else {}
    cells |= {"epochs": str(r["epoch"]), "steps": f"{r['step']:,}",
              "test sequences": f"{n:,}" if n else "all",
              "test E_eq": _number(r.get("test_eq_error"), 0),
              "test log p(x)": _number(r["test_log_likelihood"])}
    if table == "Table 1":          # the authors' code leaves out − log K (tvae.py Eq. (11))
        cells["paper's convention (+log K)"] = _number(r["test_log_likelihood"]
                                                       + math.log(config["n_is_samples"]))
    cells |= {f"test corr. {factor}": _number(value, 2)
              for factor, value in (r.get("test_capsule_correlation") or {}).items()}
    for key, value in (r.get("test_topography") or {}).items():
        cells[key.replace("_", " ")] = (str(value) if key == "selective_units"
                                        else _number(value, 2 + (key != "ratio")))
    cells |= {f"roll gain {kind}": _number((r.get("test_roll_gain") or {}).get(kind), 2)
              for kind in kinds}
    for kind in kinds:                              # Eq. (13): roll (standing still, own code)
        shares = [(r.get(f"test_{n}_accuracy") or {}).get(kind) for n in ("roll", "still", "self")]
        cells[f"roll accuracy {kind} (still, own)"] = (
            "–" if None in shares else "{:.2f} ({:.2f}, {:.2f})".format(*shares))
    return cells | {"hours": _number(r["wall_s"] / 3600, 2)}


def _table(title, rows):
    """A titled Markdown table of the columns (header → cell) that hold a value in some row."""
    columns = [key for key in dict.fromkeys(key for row in rows for key in row)
               if any(row.get(key, "–") != "–" for row in rows)]
    return [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(row.get(key, "–") for key in columns) + " |" for row in rows),
            ""] if rows else []


def report(folders, epochs=None):
    """Markdown from run folders: Table 1 and Table 2, each at one budget, the most epochs after
    which every run of the table with the registry's seed (else every run) was evaluated, at most
    `epochs` when given; a run of another seed is a row once it reached that budget too. Every
    run's untrained row first; then each run's evaluations over epochs, every 10th and the last."""
    # The paper's order; an experiment's run of the registry's seed first, then by seed and length.
    runs = sorted([(folder, *read_run(folder)) for folder in folders],
                  key=lambda run: (list(EXPERIMENTS).index(run[1]["name"]),
                                   not _registry_seed(run[1]), run[1]["seed"],
                                   max([r["step"] for r in run[2]] + [0])))
    tested = {folder: [r for r in records if "test_log_likelihood" in r
                       and (epochs is None or r["epoch"] <= epochs)]
              for folder, _, records, _ in runs}
    budgets = {}                                          # table: its budget, as said above
    for table in {t for *_, t in runs if t}:
        of_table = [(folder, c) for folder, c, _, t in runs if t == table]
        setting = [f for f, c in of_table if _registry_seed(c)] or [f for f, _ in of_table]
        budgets[table] = max(set.intersection(*({r["epoch"] for r in tested[f]} for f in setting)),
                             default=0)
    tables, over_epochs = {"Table 1": [], "Table 2": []}, []
    for folder, config, records, table in runs:
        kinds = [*dict.fromkeys(k for r in tested[folder] for k in r.get("test_roll_gain", {}))]
        if table and budgets[table] in {r["epoch"] for r in tested[folder]}:  # untrained, budget
            rows = [r for r in tested[folder] if r["epoch"] in {0, budgets[table]}]
            tables[table] += [_cells(config, r, kinds, table) for r in rows]
        if len(tested[folder]) > 2:
            over_epochs += _table(
                f"`{config['name']}` in {folder}: every 10th evaluation and the last",
                [_cells(config, r, kinds) for i, r in enumerate(tested[folder])
                 if i % 10 == 0 or i == len(tested[folder]) - 1])
    titles = {"Table 1": "MNIST", "Table 2": "dSprites"}
    return "\n".join([line for table, data in titles.items() for line in _table(
        f"{table}: {data} sequences after {budgets.get(table)} epochs, each run beside its "
        f"untrained model", tables[table])] + over_epochs)


# ─── Command line ───

class _Parser(argparse.ArgumentParser):
    def error(self, message):          # a mistake on the command line: one line, exit status 2
        print(f"error: {message} (python experiments.py --help explains the options)",
              file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    """The command line, parsed only: validate_config judges the values."""
    parser = _Parser(prog="experiments.py", description="Train an experiment of 'Topographic VAEs "
                     "learn Equivariant Capsules' (Keller & Welling, NeurIPS 2021) into --out.")
    add = parser.add_argument
    add("name", nargs="?", choices=EXPERIMENTS, metavar="NAME", help="the experiment (see --list)")
    add("--list", action="store_true", help="every experiment, with the figure or table it makes")
    add("--show", action="store_true", help="print NAME's config, with this command line's changes")
    add("--report", nargs="+", type=Path, metavar="DIR", help="the paper's tables from run folders")
    add("--epochs", type=int, dest="max_epochs", metavar="N", help="epochs in all (max_epochs), "
        "a resumed run's earlier ones included; 0: only evaluate the untrained model; with "
        "--report: the tables after at most N")
    add("--batch-size", type=int, help="sequences per batch (batch_size)")
    add("--lr", type=float, help="SGD learning rate (lr)")
    add("--seed", type=int, help="seed of initialisation, split and training sequences (seed); "
        "the test sequences come from test_seed, the same for every experiment")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="change any config key, VALUE read as JSON (e.g. --set n_is_samples=20); repeatable")
    add("--train-sequences", type=int, metavar="N", help="train on the first N of each epoch")
    add("--test-sequences", type=int, metavar="N",
        help="test on the first N (default: all; dSprites 1024)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or mps (default: CUDA, MPS, else CPU)")
    add("--data-dir", type=Path, help="the folder of the data files, where missing ones are "
        "downloaded (default: $TVAE_DATA_DIR, else ./data)")
    add("--out", type=Path, help="output folder (default: runs/NAME)")
    add("--resume", action="store_true", help="continue the run in --out; only "
        + ", ".join(CHANGEABLE_ON_RESUME) + " may change")
    add("--dsprites", choices=("file", "procedural"), dest="dsprites_source",
        help="dSprites: the .npz (default) or drawn")
    return parser, parser.parse_args(argv)


def resolve_config(name, args, saved=None):
    """The registry's config, or a resumed run's saved one, with the command line's changes."""
    config = dict(EXPERIMENTS[name])
    if saved is not None:        # the run's own settings; its name, paper and table: the registry's
        config.update((k, v) for k, v in saved.items()
                      if k in config and k not in ("name", "paper", "table"))
    config.update((key, value) for key, value in vars(args).items()   # options named as keys
                  if key in config and value is not None)
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
        return torch.device("cuda" if torch.cuda.is_available()
                            else "mps" if torch.backends.mps.is_available() else "cpu")
    if re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        with contextlib.suppress(RuntimeError, AssertionError):   # this machine lacks it
            return torch.zeros(1, device=name).device
    raise ConfigError(f"--device {name}: must be cpu, cuda, cuda:N or mps, and on this machine")


def main(argv=None):
    parser, args = parse_args(argv)
    if args.list:
        print("\n".join(f"{name:36s} {config['paper']}" for name, config in EXPERIMENTS.items()))
        return 0
    if not (args.name or args.report):
        parser.error("name the experiment to run (--list shows them)")
    name = args.name
    out = args.out or Path("runs", name or "")

    def resume(experiment):                             # the command that continues a run
        return (f"python experiments.py {experiment} --resume --out {out}"
                + (f" --data-dir {args.data_dir}" if args.data_dir else "")
                + (f" --device {args.device}" if args.device != "auto" else ""))

    try:
        if args.report:
            print(report(args.report, args.max_epochs))
            return 0
        saved = read_checkpoint(out, mmap=True) if args.resume else None
        if saved and saved["config"]["name"] != name:
            raise RunError(f"--resume: {out} holds a run of {saved['config']['name']}, not "
                           f"{name}; continue it with: {resume(saved['config']['name'])}")
        config = resolve_config(name, args, saved and saved["config"])
        if args.show:
            print(json.dumps(config, indent=2))
            return 0
        device = pick_device(args.device)
        epoch = saved["state"]["epoch"] if saved else -1       # a complete run: nothing to do
        if epoch >= config["max_epochs"] and not evaluation_due(config, epoch, saved["metrics"]):
            print(f"{out} holds a complete run of {name} ({epochs_in_words(epoch)}); to train it "
                  f"further, give the epochs in all: {resume(name)} --epochs N", file=sys.stderr)
            return 0
        records = train(config, out, args.data_dir, device, args.resume)
    except (datasets.DataError, RunError, OSError) as error:
        if isinstance(error, OSError):             # a picture that could not be written
            error = (f"cannot write {error.filename or out} ({_reason(error)}); continue with "
                     f"--resume once it can be written")
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:                      # Ctrl-C or SIGTERM: the checkpoint is as it was
        kept = not args.report and (out / "checkpoint.pt").exists()
        epoch = kept and read_checkpoint(out, mmap=True)["state"]["epoch"]
        print("stopped" + (f"; {out} keeps the run after {epochs_in_words(epoch)}; continue with: "
                           f"{resume(name)}" if kept else ""), file=sys.stderr)
        return 130
    print(f"done: {json.dumps(records[-1])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
