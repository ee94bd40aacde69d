"""Decoding options: greedy (the default) or sampling with a temperature, nucleus ``top_p``, a seed and several
samples per prompt.

Sampling is done by the Gumbel-max trick (Gumbel 1954; e.g. Kool et al. 2019, arXiv 1903.06059): the argmax of
``log softmax(logits / T) + G`` over the top-``p`` nucleus, with ``G`` i.i.d. standard Gumbel noise, is a draw from
the temperature-scaled, nucleus-truncated distribution. The noise of each row and step comes from its own generator
seeded by ``(seed, prompt text, sample index, step)``, so a prompt's samples do not depend on which other prompts
share its batch, on the batch size or on the device: batched and one-at-a-time evaluation give the same replies.
Hugging Face ``generate`` runs greedy with :class:`SeededSampler` as a logits processor, so everything that steers
generation (hooks, plans, the prefix cache) works unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .configs import PositiveInt
from .errors import WorkbenchError
from .vocab import is_int

STRATEGIES = ("greedy", "sample")


@dataclass(frozen=True)
class Decoding:
    """How replies are decoded (each field is also a command-line option of the commands that generate)."""

    #: "greedy" (the default) or "sample"
    strategy: str = "greedy"
    #: softmax temperature of sampling (> 0)
    temperature: float = 1.0
    #: nucleus of sampling: the smallest set of most likely tokens whose probability reaches top_p (0 < top_p <= 1)
    top_p: float = 1.0
    #: seed of the samples (with the prompt text, the sample index and the step)
    seed: int = 0
    #: replies per prompt when sampling; refusal rates are over all samples
    n_samples: PositiveInt = 1

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise WorkbenchError(f"unknown decoding strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise WorkbenchError(f"temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise WorkbenchError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.n_samples) or self.n_samples < 1:
            raise WorkbenchError(f"n_samples must be a positive int, got {self.n_samples!r}")
        if self.strategy == "greedy" and self.n_samples != 1:
            raise WorkbenchError("greedy decoding has one reply per prompt; use strategy 'sample' for n_samples > 1")

    @property
    def sampling(self) -> bool:
        return self.strategy == "sample"

    def to_dict(self) -> dict:
        return asdict(self)

    def processor(self, texts: Sequence[str], samples: Sequence[int], prompt_width: int) -> "SeededSampler":
        """The logits processor for one batch: ``texts`` identify the rows, ``samples`` their sample index."""
        return SeededSampler([row_key(self.seed, t, k) for t, k in zip(texts, samples)], prompt_width,
                             float(self.temperature), float(self.top_p))


GREEDY = Decoding()


def sample(temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, n_samples: int = 1) -> Decoding:
    """Sampling options (the defaults are the Guiding Giants reference code's T 0.7, top_p 0.9)."""
    return Decoding("sample", temperature, top_p, seed, n_samples)


def row_key(seed: int, text: str, sample: int) -> int:
    """The 63-bit seed of one (prompt, sample) row."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{sample}\x00{text}".encode()).digest()[:8], "little") >> 1


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``Bool[Tensor, "batch vocab"]``, True outside the top-``p`` nucleus of each row (the most likely token is
    always kept)."""
    if top_p >= 1.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs            # probability mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


class SeededSampler:
    """A Hugging Face logits processor: temperature, nucleus, then per-row seeded Gumbel noise (greedy on the
    result draws a sample; see the module docstring)."""

    def __init__(self, keys: Sequence[int], prompt_width: int, temperature: float, top_p: float):
        self.keys, self.width, self.temperature, self.top_p = list(keys), prompt_width, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.keys):
            raise WorkbenchError(f"the sampler was built for {len(self.keys)} rows, generate gave {scores.shape[0]}")
        step = input_ids.shape[1] - self.width
        logits = scores.float() / self.temperature
        logp = torch.log_softmax(logits, -1)
        noise = torch.stack([gumbel(k, step, scores.shape[-1]) for k in self.keys]).to(scores.device)
        out = logp + noise
        return out.masked_fill(nucleus_mask(logits, self.top_p), float("-inf"))


def gumbel(key: int, step: int, n: int) -> torch.Tensor:
    """``Float[Tensor, "n"]`` standard Gumbel noise of one row at one step (CPU, float32)."""
    gen = torch.Generator().manual_seed((key + 1_000_003 * step) % (2**63))
    u = torch.rand(n, generator=gen).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


__all__ = ["GREEDY", "STRATEGIES", "Decoding", "SeededSampler", "gumbel", "nucleus_mask", "row_key", "sample"]
