"""What stops a training run early, each with a one-line message and the run folder left resumable:

    Ctrl-C        the step under way finishes, a checkpoint is saved, and `TrainingInterrupted` says how to go on
                  (`--resume`); a second Ctrl-C stops at once. One process only: under torchrun every rank gets
                  the signal and stops as usual.
    bad data      more than --max-skip-rate of the samples read so far were skipped (after the first MIN_READ
                  samples, or all the run reads when that is fewer): `BadDataError` with the skip summary. A step
                  whose samples were all skipped changes no weight (no decay-only update).
    divergence    a logged loss that is NaN or infinite: `DivergedError` naming the step.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

from ..device import all_reduce_sum

MIN_READ = 64


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, handled: the message says where the run stopped and how to continue it."""


class BadDataError(ValueError):
    """Too many records of the data were unusable."""


class DivergedError(ValueError):
    """The loss is no longer a number."""


class StopRequest:
    """Within this context the first SIGINT (Ctrl-C) only sets `requested`; the loop stops after its step."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested, self._previous = False, None

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)


class SkipGuard:
    """Counts the samples each step read and skipped; raises BadDataError past the allowed skip rate."""

    def __init__(self, max_rate: float, world: int, device: torch.device):
        self.max_rate, self.world, self.device = max_rate, world, device
        self.read = self.skipped = 0  # this process's
        self.min_read = MIN_READ

    def start(self, samples_to_read: int) -> None:
        """A run that reads fewer than MIN_READ samples is judged on all of them (at its last step)."""
        self.min_read = min(MIN_READ, samples_to_read)

    def count(self, batches: list[dict]) -> None:
        for batch in batches:
            self.read += len(batch["lengths"]) + len(batch["skipped"])
            self.skipped += len(batch["skipped"])

    def check(self, step: int, summary) -> None:
        """After a step (every step in one process; at logging steps under torchrun, where all ranks meet)."""
        read, skipped = self.read, self.skipped
        if self.world > 1:
            read, skipped = (int(x) for x in all_reduce_sum(torch.tensor([read, skipped], device=self.device)))
        if read >= self.min_read and skipped > self.max_rate * read:
            raise BadDataError(f"stopped at step {step}: {skipped} of the {read} samples read were skipped, over "
                               f"--max-skip-rate {self.max_rate:g} ({summary()})")


def check_finite_loss(loss: float, step: int) -> None:
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise DivergedError(f"the loss is {loss} at step {step}: training diverged (lower --lr, or check the data); "
                            "the checkpoints before this step are intact")
