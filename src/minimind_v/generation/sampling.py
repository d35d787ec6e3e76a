"""Sampling settings and the per-row next-token choice (transformers' logits processors do the warping).

Valid settings (anything else is a `SamplingError` naming the field, before any work starts):

    max_new_tokens       an integer >= 1 (the engine also stops at the context length)
    temperature          0 (greedy), or a finite number from MIN_TEMPERATURE to MAX_TEMPERATURE: below 1e-5 the
                         scaled logits (and a denormal like 1e-45 makes them overflow to inf, then NaN) are refused
    top_k                an integer >= 0 (0: off)
    top_p                a finite number in (0, 1] (1: off)
    repetition_penalty   a finite number from MIN_PENALTY to MAX_PENALTY (1: off)
    stop                 at most MAX_STOPS strings, each 1 to MAX_STOP_CHARS characters
    seed                 None or a 64-bit signed integer; a negative seed is mapped into the generator's range
    ignore_eos           True: decode to max_new_tokens whatever the model says (benchmarks)

With these bounds the warped logits stay finite (|logit| / 1e-5 / 0.01 is far from float32's limit), so sampling
never meets a NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from .static_decode import to_device

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 100.0
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
MAX_STOPS, MAX_STOP_CHARS = 4, 256
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1


class SamplingError(ValueError):
    """A sampling setting outside its valid range; `field` names it (a SamplingParams field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _real(value) -> bool:
    """A finite int or float (not a bool, not NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off. The module docstring lists the
    valid ranges; construction raises SamplingError outside them."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # decode to max_new_tokens whatever the model says (benchmarks)

    def __post_init__(self):
        for name, ok, message in self._checks():
            if not ok:
                got = repr(getattr(self, name))
                raise SamplingError(name, f"{message} (got {name}={got[:80]}{'...' if len(got) > 80 else ''})")

    def _checks(self) -> list[tuple[str, bool, str]]:
        """(field, holds, message) for every rule, in field order; the first that fails is reported."""
        t, p, r, stop = self.temperature, self.top_p, self.repetition_penalty, self.stop
        stops_ok = isinstance(stop, (list, tuple)) and len(stop) <= MAX_STOPS and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
        return [
            ("max_new_tokens", _integer(self.max_new_tokens) and self.max_new_tokens >= 1,
             "max_new_tokens must be at least 1"),
            ("temperature", _real(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE),
             f"temperature must be >= 0: 0 (greedy) or a finite number from {MIN_TEMPERATURE:g} to "
             f"{MAX_TEMPERATURE:g}"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0"),
            ("top_p", _real(p) and 0 < p <= 1, "top_p must be a finite number in (0, 1]"),
            ("repetition_penalty", _real(r) and MIN_PENALTY <= r <= MAX_PENALTY,
             f"repetition_penalty must be a finite number from {MIN_PENALTY:g} to {MAX_PENALTY:g}"),
            ("stop", stops_ok, f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                               "characters"),
            ("seed", self.seed is None or (_integer(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
             f"seed must be an integer from {SEED_MIN} to {SEED_MAX}"),
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """One row's processors and random generator: (previous ids [1, S], logits [1, V]) -> next id."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        processors = []
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        self.processors = LogitsProcessorList(processors)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:  # a signed 64-bit seed -> the generator's unsigned range, one to one
                self.generator.manual_seed(params.seed % 2**64)

    @property
    def argmax_only(self) -> bool:
        """Greedy with no processor: the next token is the logits' argmax, which the device can take itself."""
        return self.params.greedy and not self.processors

    def __call__(self, previous: torch.LongTensor, logits: torch.Tensor) -> int:
        scores = self.processors(previous, logits.float())  # [1, V]
        if self.params.greedy:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def batchable(params: SamplingParams) -> bool:
    """Rows whose next token the batch may draw together: sampled, unseeded (a seeded row keeps its own generator,
    so its answer does not depend on what else runs), without a repetition penalty (it needs each row's history)."""
    return not params.greedy and params.seed is None and params.repetition_penalty == 1.0


def warp_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The temperature, top-k and top-p warpers of TokenChooser, every row with its own settings at once:
    logits [n, V] -> scores [n, V] (removed tokens -inf), equal to transformers' warpers row by row."""
    scores = logits.float() / to_device([float(p.temperature) for p in params], logits.device)[:, None]  # [n, V]
    k = to_device([p.top_k if p.top_k > 0 else scores.shape[-1] for p in params], logits.device)  # [n]
    top_p = to_device([float(p.top_p) for p in params], logits.device)[:, None]  # [n, 1]
    ordered, order = scores.sort(dim=-1, descending=True)  # [n, V]
    rank = torch.arange(scores.shape[-1], device=logits.device)[None, :]  # [1, V]
    kth = ordered.gather(-1, (k - 1).clamp(max=scores.shape[-1] - 1)[:, None])  # [n, 1]: the k-th largest score
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # top-k keeps ties with the k-th, as transformers
    probs = ordered.softmax(-1)  # [n, V]
    before = probs.cumsum(-1) - probs  # [n, V]: probability of the tokens ranked above
    drop = (before >= top_p) & (rank > 0) & (top_p < 1)  # top-p: the fewest tokens whose probability reaches p
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)  # [n, V], in vocabulary order


def draw_batch(logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator | None = None) \
        -> torch.Tensor:
    """One draw per row from warp_batch's distribution: logits [n, V] -> token ids [n], on the logits' device."""
    probs = warp_batch(logits, params).softmax(-1)  # [n, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
