"""Sampling settings and the per-row next-token choice (transformers' logits processors do the warping)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)


@dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self!r})")

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
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, previous: torch.LongTensor, logits: torch.Tensor) -> int:
        scores = self.processors(previous, logits.float())  # [1, V]
        if self.params.greedy:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
