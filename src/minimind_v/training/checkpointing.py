"""The run folder: settings, checkpoints (each a directory made complete, then published by one rename), the model.

    <out>/run.json                     the run's resolved settings (a --resume with other settings is refused)
    <out>/checkpoints/step-000060/     one checkpoint:
        model/                         save_pretrained: safetensors without the vision tower, config, tokenizer
        resume.pt                      optimizer, scheduler, scaler, RNG states, data position
        optimizer/                     with --parallel fsdp: the optimizer state in shards (distributed checkpointing)
        manifest.json                  size and sha256 of every file above, written last
    <out>/model/                       the final model: hard links to the last checkpoint's model/ files

A checkpoint is written under a temporary name, flushed to disk, then renamed into place, so a kill at any instant
leaves every published checkpoint whole: never the model of one step beside the optimizer of another. --resume
takes the newest checkpoint, checks its manifest (a damaged file is an error naming it) and reaches the weights of
an uninterrupted run bit for bit. Checkpoints beyond --keep-checkpoints are renamed away before they are deleted,
so a half-deleted one never carries a checkpoint's name. The data position counts optimizer steps of the global
batch, which does not depend on the number of processes: a run can resume with another `--nproc_per_node`. With
sharded weights (FSDP) every process writes its optimizer shards into the temporary folder and the main process the
gathered model, resume.pt and the manifest, then publishes it as above (the run folder must be on a file system every
process sees).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from ..models.safe_loading import read_weights

CHECKPOINTS, FINAL_MODEL, RESUME_FILE, MANIFEST = "checkpoints", "model", "resume.pt", "manifest.json"
SHARDED_OPTIMIZER = "optimizer"  # the folder of a sharded optimizer state (resume.pt then names it)
SETTINGS = "run.json"
RUN_FILES = (SETTINGS, CHECKPOINTS, FINAL_MODEL, "metrics.jsonl", "loss.png", RESUME_FILE)  # what a run leaves
# settings a resumed run may change: how it runs, not what it computes (the global batch is checked instead of
# batch_size x grad_accum, which may be split differently over another number of processes)
MAY_CHANGE = {"resume", "overwrite", "out_dir", "num_workers", "log_every", "save_every", "keep_checkpoints",
              "loggers", "eval_every", "device", "feature_cache", "batch_size", "grad_accum", "parallel"}
NO_CHECKPOINT = ("--resume: {out} has no checkpoint to continue from (a run saves one every --save-every steps and "
                 "at its end); start the run again without --resume")
_STEP = re.compile(r"step-(\d+)")
_STATE_KEYS = {"step", "epoch", "position", "optimizer", "scheduler", "scaler", "rng", "final"}


def open_run_folder(out: str, resume: bool, overwrite: bool) -> None:
    """A new run needs a folder with no run in it (--overwrite removes that run first), a resumed one a checkpoint;
    both clear what a kill left half-written."""
    if resume and not list_checkpoints(out):
        raise ValueError(NO_CHECKPOINT.format(out=out))
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(out, name))]
    if present and not resume:
        if not overwrite:
            raise ValueError(f"{out} already holds a training run ({', '.join(present)}): continue it with --resume, "
                             "or replace it with --overwrite")
        for name in present:
            discard(os.path.join(out, name))
    remove_leftovers(out)


def check_settings(out: str, settings: dict, resume: bool, main: bool) -> None:
    """A new run records its resolved settings in run.json; a resumed run must have the same (but MAY_CHANGE)."""
    path, settings = os.path.join(out, SETTINGS), json.loads(json.dumps(settings))
    if not resume:
        if main:
            os.makedirs(out, exist_ok=True)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(settings, f, indent=1)
            os.replace(path + ".tmp", path)
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: {path} is missing or damaged ({err}); without the run's settings it cannot "
                         "be resumed exactly") from None
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in settings.items()
               if key not in MAY_CHANGE and saved.get(key) != value]
    if changed:
        raise ValueError(f"--resume with settings other than the run's ({path}): {'; '.join(changed)}. Resume with "
                         "the same settings, or start a new run (--overwrite replaces this one)")


def checkpoint_path(out: str, step: int) -> str:
    return os.path.join(out, CHECKPOINTS, f"step-{step:06d}")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """Published checkpoints, oldest first: (step, path)."""
    folder = os.path.join(out, CHECKPOINTS)
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in
             (os.listdir(folder) if os.path.isdir(folder) else []) if (m := _STEP.fullmatch(name))]
    return sorted(found)


@dataclass
class RunPosition:
    """Where a run stands: optimizer steps done, and the epoch and step within it that come next."""
    step: int = 0
    epoch: int = 0
    position: int = 0


class TrainState(NamedTuple):
    """What a checkpoint saves and a resume restores (besides the RNG states); `parallel`: how the processes share
    the model (training/parallel.py)."""
    model: object
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    parallel: object


def save_checkpoint(out: str, parts: TrainState, at: RunPosition, final: bool, keep: int, main: bool) -> str:
    """Write, publish and prune (every process calls it; the main process writes all but optimizer shards); the
    final one also becomes <out>/model. -> its path."""
    path = checkpoint_path(out, at.step)
    fresh, sharded = not os.path.isdir(path), parts.parallel.sharded  # a re-run of a step saved wrote the same bytes
    weights = optimizer = None
    if fresh and sharded:
        if main:
            discard(temporary(path))
            os.makedirs(temporary(path))
        parts.parallel.barrier()
        weights = parts.parallel.full_weights(parts.model)
        parts.parallel.save_optimizer(parts.model, parts.optimizer, os.path.join(temporary(path), SHARDED_OPTIMIZER))
        optimizer = SHARDED_OPTIMIZER
    if main:
        if fresh:
            state = {**asdict(at), "optimizer": optimizer or parts.optimizer.state_dict(), "final": final,
                     "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
                     "rng": _rng_states()}
            write_checkpoint(path, parts.model, parts.tokenizer, state, weights)
        prune(out, keep)
        if final:
            publish_model(out, path)
    return path


def temporary(path: str) -> str:
    """The folder a checkpoint is written in before its rename."""
    return os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))


def write_checkpoint(path: str, model, tokenizer, state: dict, weights: dict | None = None) -> None:
    """Everything into the temporary folder (where sharded optimizer state may already be), the manifest last, all
    flushed; then one rename publishes it. `weights`: what to save instead of the model's own (gathered shards)."""
    tmp = temporary(path)
    if weights is None:
        discard(tmp)
    model.save_pretrained(os.path.join(tmp, "model"), **({} if weights is None else {"state_dict": weights}))
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    torch.save(state, os.path.join(tmp, RESUME_FILE))
    files = {name: _describe(os.path.join(tmp, name)) for name in _files_under(tmp)}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"step": state["step"], "files": files}, f, indent=1)
    for name in [*files, MANIFEST]:
        _fsync(os.path.join(tmp, name))
    for folder in {os.path.dirname(os.path.join(tmp, name)) for name in files}:
        _fsync(folder)
    os.rename(tmp, path)
    _fsync(os.path.dirname(path))


def publish_model(out: str, checkpoint: str) -> None:
    """<out>/model as hard links to the checkpoint's model files (copies where links are impossible)."""
    final, tmp = os.path.join(out, FINAL_MODEL), os.path.join(out, ".tmp-" + FINAL_MODEL)
    discard(tmp)
    os.makedirs(tmp)
    source = os.path.join(checkpoint, "model")
    for name in os.listdir(source):
        try:
            os.link(os.path.join(source, name), os.path.join(tmp, name))
        except OSError:
            shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
    _fsync(tmp)
    discard(final)
    os.rename(tmp, final)
    _fsync(out)


def prune(out: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0: keep all); each is renamed away first."""
    for _, path in (list_checkpoints(out)[:-keep] if keep > 0 else []):
        discard(path)


def discard(path: str) -> None:
    """Remove a folder: renamed to a hidden name first, so a kill mid-way leaves no half folder under its name."""
    if os.path.lexists(path):
        doomed = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}-{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(out: str) -> None:
    """Temporary and half-deleted folders that a kill left behind (never a published checkpoint)."""
    for folder in (out, os.path.join(out, CHECKPOINTS)):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith((".tmp-", ".deleting-")):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def verify_checkpoint(path: str) -> None:
    """ValueError naming the first file that is missing, cut short or changed since the checkpoint was written."""
    manifest = os.path.join(path, MANIFEST)
    try:
        with open(manifest, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest} is missing or damaged ({err}); the checkpoint cannot be trusted") from None
    for name, expected in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"{file} is missing from its checkpoint")
        found = _describe(file)
        if found != expected:
            what = (f"it is {found['size']} bytes, {expected['size']} were written" if found["size"] != expected["size"]
                    else "its content changed since it was written")
            raise ValueError(f"{file} is damaged ({what}); delete {path} to resume from the checkpoint before it")


def latest_checkpoint(out: str) -> str:
    """The newest checkpoint in <out>/checkpoints, verified; ValueError when there is none."""
    found = list_checkpoints(out)
    if not found:
        raise ValueError(NO_CHECKPOINT.format(out=out))
    verify_checkpoint(found[-1][1])
    return found[-1][1]


def load_weights(path: str, model) -> None:
    """The checkpoint's weights into the (whole, not yet sharded) model, strictly."""
    weights = os.path.join(path, "model", "model.safetensors")
    model.load_checkpoint_state(read_weights(weights), source=weights)


def load_resume_state(out: str, path: str, parts: TrainState, main: bool) -> RunPosition:
    """Restore the optimizer (whole or sharded, whatever wrote it), scheduler, scaler and RNG states of the checkpoint
    `path` (its weights: `load_weights`) -> where the run stands."""
    state = _read_state(os.path.join(path, RESUME_FILE))
    saved = state["optimizer"]
    parts.parallel.load_optimizer(parts.model, parts.optimizer, os.path.join(path, saved) if isinstance(saved, str)
                                  else saved)
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    _set_rng_states(state["rng"])
    if state["final"] and main and not os.path.isdir(os.path.join(out, FINAL_MODEL)):
        publish_model(out, path)  # a kill came between the final checkpoint and <out>/model
    return RunPosition(state["step"], state["epoch"], state["position"])


def _read_state(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        raise ValueError(f"{path} is not a readable resume state ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''})") from None
    if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        raise ValueError(f"{path} is not a resume state of this version (expected the keys {sorted(_STATE_KEYS)})")
    return state


def _files_under(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def _describe(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _fsync(path: str) -> None:
    """Flush a file or a folder's entries to disk (what a rename publishes must be there after a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": torch.tensor(list(random.getstate()[1]))}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(int(x) for x in states["python"]), None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
