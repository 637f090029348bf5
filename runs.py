"""The run folder of an experiment: one checkpoint is the run.

checkpoint.pt holds everything a run needs to go on (its config, the weights, the optimizer, the
random states, the epochs and steps done, the metrics so far); config.json and metrics.jsonl are
written from it for people and tools. Every file is written under a temporary name and renamed,
and a run holds an operating-system lock on its folder: experiments.train uses it, and the
guarantees are listed in the README ("Stopping and resuming").
"""
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch


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
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        raise RunError(f"cannot read {path} ({reason}); start again with --overwrite, or into "
                       f"another --out") from None


def epochs_in_words(n):
    """'1 epoch', '2 epochs'."""
    return f"{n} epoch" + ("" if n == 1 else "s")


class RunFolder:
    """The files of one run in out_dir. checkpoint.pt is the run: config, weights, optimizer, RNG
    states, epochs and steps done, the metrics; resume reads nothing else, and config.json and
    metrics.jsonl are written from it. Each file is written under a temporary name and renamed,
    so a kill leaves the old one or the new one. While open, the run holds an flock on .lock (the
    operating system releases it however the process ends), and SIGTERM stops it as Ctrl-C does."""

    def __init__(self, out_dir, config, device, resume=False, overwrite=False):
        self.folder, self.config, self.device = Path(out_dir), config, torch.device(device)
        self.checkpoint = self.folder / "checkpoint.pt"
        if self.checkpoint.exists() and not (resume or overwrite):
            raise RunError(f"--out {self.folder} holds a run already: continue it with --resume, "
                           f"or replace it with --overwrite")
        self.saved = read_checkpoint(self.folder) if resume else None     # reads only
        old = self.saved["config"] if resume else config
        self.changes = {key: (old[key], value) for key, value in config.items()   # labels aside
                        if key in old and key not in ("paper", "table")
                        and json.dumps(old[key]) != json.dumps(value)}
        for key in sorted(set(self.changes) - set(CHANGEABLE_ON_RESUME)):
            old, new = (json.dumps(value) for value in self.changes[key])
            raise RunError(f"--resume: {key} cannot change in a saved run (it ran with {old}, "
                           f"asked {new}); start a new run with another --out")
        if resume and self.saved["state"].get("plan") is not None:      # saved within an epoch
            raise RunError(f"--resume: {self.checkpoint} was saved within an epoch by an earlier "
                           f"experiments.py, which resumed there; this one resumes at an epoch's "
                           f"end: finish that epoch with the earlier one, or start again with "
                           f"--overwrite")

    @contextlib.contextmanager
    def open(self, model, optimizer, generator):
        """Lock the folder and yield the epochs and steps done: (0, 0) for a new run, else the
        checkpoint's, whose weights, optimizer and RNG states are loaded (with the changes that
        --resume allows). Inside, SIGTERM raises KeyboardInterrupt as Ctrl-C does."""
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
            epoch, step = self._restore(model, optimizer, generator)
            config = json.dumps(self.config, indent=2) + "\n"
            self._write("config.json", lambda path: path.write_text(config))
            self.log()
            handlers = {n: signal.signal(n, signal.default_int_handler)    # KeyboardInterrupt
                        for n in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield epoch, step
            except NonFiniteLoss as error:
                raise NonFiniteLoss(f"{error} in epoch {self.epoch + 1}; {self.checkpoint} keeps "
                                    f"the run after {epochs_in_words(self.epoch)}") from None
            finally:
                for number, handler in handlers.items():
                    signal.signal(number, handler)

    def _restore(self, model, optimizer, generator):
        """A new run: no checkpoint, no pictures of an old one. A resumed one: the checkpoint's
        weights, optimizer and RNG states, its epochs, steps and metrics. Says which, in a line."""
        saved, news = self.saved, f"writing to {self.folder}"
        state = saved["state"] if saved else {"epoch": 0, "step": 0, "wall_s": 0}
        for path in [] if saved else [self.checkpoint, *self.folder.glob("*_[0-9][0-9][0-9].png")]:
            path.unlink(missing_ok=True)
        if saved:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            for group in optimizer.param_groups:      # the config's lr and momentum run from here
                group.update(lr=self.config["lr"], momentum=self.config["momentum"])
            torch.set_rng_state(saved["rng"]["torch"])
            generator.set_state(saved["rng"]["data"])
            if "cuda" in saved["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved["rng"]["cuda"], self.device)
            news = (f"resuming {self.folder} after {epochs_in_words(state['epoch'])}, "
                    f"step {state['step']}")
            news += "".join(f"; {key} {json.dumps(old)} -> {json.dumps(new)}"
                            for key, (old, new) in self.changes.items())
        print(f"{self.config['name']}: {self.config['paper']}; {self.device}; {news}",
              file=sys.stderr)
        self.started, self.epoch = time.perf_counter() - state["wall_s"], state["epoch"]
        self.saving, self.records = (model, optimizer, generator), saved["metrics"] if saved else []
        self.saved = None                                   # the state lives on in the loop
        return state["epoch"], state["step"]

    def wall_s(self):
        return round(time.perf_counter() - self.started, 1)        # seconds trained and evaluated

    def log(self, record=None):
        """Add a metrics record (with the wall-clock time and the device), then write all of them
        to metrics.jsonl."""
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
            reason = (error.strerror if isinstance(error, OSError) and error.strerror
                      else f"{str(error).splitlines()[0][:120]}; is the disk full?")
            kept = (f"its last checkpoint is kept: free some space, then continue with --resume"
                    if self.checkpoint.exists() else "free some space, then start again")
            raise RunError(f"cannot write {name} in {self.folder} ({reason}); {kept}") from None
        finally:
            temporary.unlink(missing_ok=True)
