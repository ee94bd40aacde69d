"""Batch sizes that adapt to memory.

Two pieces, used wherever a function takes ``batch_size="auto"`` (or ``None``):

* :func:`auto_batch_size` -- a first guess from the free memory of the model's device (CUDA: free device memory;
  CPU: available RAM) and a per-row estimate of what a forward pass or a generation holds at its peak;
* :class:`OOMBackoff` -- runs a function over batches and, when a batch runs out of memory
  (``torch.OutOfMemoryError`` or a ``RuntimeError`` saying "out of memory"), halves the batch size and retries the
  same rows; later batches keep the smaller size. Results are the same as with that smaller batch size from the
  start, because the rows of a batch never depend on how an earlier batch was split.

An explicit int batch size is taken literally: no guess, and an out-of-memory error propagates.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .errors import WorkbenchError
from .fallbacks import warn_fallback
from .models import model_device
from .vocab import is_int

log = logging.getLogger("workbench.batching")

T = TypeVar("T")
R = TypeVar("R")

#: The value (besides ``None``) that asks for an adaptive batch size.
AUTO = "auto"


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_oom_error(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (CUDA), ``MemoryError``, and a ``RuntimeError`` whose message says
    "out of memory" (CUDA, MPS) or "can't allocate memory" / "not enough memory" (PyTorch's CPU allocator)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def is_auto(batch_size) -> bool:
    """``batch_size`` asks for an adaptive size (``None`` or ``"auto"``)."""
    return batch_size is None or (isinstance(batch_size, str) and batch_size.lower() == AUTO)


def check_batch_size(batch_size) -> int | None:
    """A positive int, or ``None`` for ``"auto"``/``None``; a :class:`WorkbenchError` otherwise."""
    if is_auto(batch_size):
        return None
    if not is_int(batch_size) or batch_size < 1:
        raise WorkbenchError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    return batch_size


def parse_batch_size(text: str) -> int | str:
    """``argparse`` type for ``--batch-size``: a positive int or ``auto``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}")
    return value


#: at most this many padded tokens (rows x longest prompt) in one batch of prompts cut along their lengths
#: (:func:`length_cuts`): the organism's batches never reach it; a real model's 1,300-token jailbreaks go ~12 a batch
MAX_BATCH_TOKENS = 16384


def length_cuts(lengths: Sequence[int], batch_size: int,
                max_tokens: int | None = MAX_BATCH_TOKENS) -> list[tuple[int, int]]:
    """``[start, stop)`` cuts of prompts sorted by ascending token ``lengths`` into batches of at most
    ``batch_size`` rows whose padded size (rows x the batch's last, longest length) stays within ``max_tokens``
    (a longer prompt is a batch of its own). ``max_tokens=None``: cuts of ``batch_size`` rows."""
    if any(b < a for a, b in zip(lengths, lengths[1:])):
        raise WorkbenchError("length_cuts needs the lengths in ascending order")
    cuts, start = [], 0
    for i, n in enumerate(lengths):
        rows = i - start + 1
        if i > start and (rows > batch_size or (max_tokens is not None and rows * n > max_tokens)):
            cuts.append((start, i))
            start = i
    if len(lengths):
        cuts.append((start, len(lengths)))
    return cuts


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices of prompts with token ``lengths`` (:func:`workbench.chat.prompt_lengths`) from the shortest to the
    longest (ties keep their order). Batches cut along this order pad least: on the real data preset, where a
    jailbreak runs to 1,300 tokens and a plain request to 40, batches in the given order were up to 2.6x their real
    tokens."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def length_batches(lengths: Sequence[int], batch_size: int,
                   max_tokens: int | None = MAX_BATCH_TOKENS) -> list[list[int]]:
    """The prompt indices of each batch: :func:`length_order` cut by :func:`length_cuts`."""
    order = length_order(lengths)
    return [order[a:b] for a, b in length_cuts([lengths[i] for i in order], batch_size, max_tokens)]


def free_memory(device: str | torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free CUDA memory plus what PyTorch's caching allocator
    holds unused, or available RAM for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, reserved))
    import psutil

    return int(psutil.virtual_memory().available)


def bytes_per_row(model, seq_len: int, new_tokens: int = 0, dtype: torch.dtype | None = None) -> int:
    """Peak memory estimate (bytes) of one batch row: a forward pass over ``seq_len`` tokens (residual stream,
    MLP hidden, eager attention scores in float32, logits of every position in float32) plus, when generating,
    the KV cache of ``seq_len + new_tokens`` tokens. Deliberately generous; :class:`OOMBackoff` covers misses."""
    cfg = model.cfg
    d, n_layers = int(cfg.d_model), int(cfg.n_layers)
    n_heads = int(getattr(cfg, "n_heads", 1) or 1)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    d_head = int(getattr(cfg, "d_head", None) or d // n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    d_vocab = int(getattr(cfg, "d_vocab", None) or 0)
    if dtype is None:
        try:
            dtype = next(model.parameters()).dtype
        except StopIteration:
            dtype = torch.float32
    elt = torch.empty((), dtype=dtype).element_size()
    t = int(seq_len)
    forward = t * (8 * d + 3 * d_mlp) * elt + 2 * n_heads * t * t * 4 + t * d_vocab * (elt + 4)
    kv = 2 * n_layers * n_kv * d_head * (t + int(new_tokens)) * elt if new_tokens else 0
    return int(forward + kv)


def auto_batch_size(
    model,
    seq_len: int,
    n_rows: int | None = None,
    new_tokens: int = 0,
    memory_fraction: float = 0.5,
    max_batch: int = 64,
    device: str | torch.device | None = None,
) -> int:
    """A batch size that should fit in memory: ``memory_fraction`` of :func:`free_memory` over
    :func:`bytes_per_row`, at least 1, at most ``max_batch`` and ``n_rows``.

    Args:
        seq_len: tokens per row (the padded prompt length).
        new_tokens: tokens generated per row (adds the KV cache); 0 for a plain forward pass.
        device: where the activations live (default: the model's first parameter's device).
    """
    if not 0 < memory_fraction <= 1:
        raise WorkbenchError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
    device = model_device(model) if device is None else torch.device(device)
    per_row = max(1, bytes_per_row(model, seq_len, new_tokens))
    size = int(free_memory(device) * memory_fraction // per_row)
    size = max(1, min(size, int(max_batch), int(n_rows) if n_rows else int(max_batch)))
    log.info("auto batch size %d (%.1f MB per row of %d tokens on %s)", size, per_row / 2**20, seq_len, device)
    return size


def release_memory() -> None:
    """Free what an out-of-memory attempt left behind (garbage and PyTorch's cached CUDA blocks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OOMBackoff:
    """Run a function over batches, halving the batch size on out-of-memory errors.

    ``tried`` lists every batch size attempted, in order (failed attempts included), so callers and tests can see
    what happened. With ``enabled=False`` it is a plain batching loop: an OOM error propagates.

    Example::

        backoff = OOMBackoff(64)
        outputs = backoff.map(lambda rows: model_fn(rows), items)   # one output per batch, in order
    """

    def __init__(self, batch_size: int, min_batch_size: int = 1, enabled: bool = True):
        if not is_int(batch_size) or batch_size < 1:
            raise WorkbenchError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.min_batch_size = max(1, int(min_batch_size))
        self.enabled = enabled
        self.tried: list[int] = []

    def map(
        self,
        fn: Callable[[Sequence[T]], R],
        items: Sequence[T],
        show_progress: bool = False,
        desc: str = "",
    ) -> list[R]:
        """``[fn(items[a:b]) for each batch a:b]``; a batch that runs out of memory is retried at half the size.

        ``fn`` must not keep state from a failed call (it is called again on the same rows)."""
        from tqdm.auto import tqdm

        out: list[R] = []
        start, n = 0, len(items)
        with tqdm(total=n, desc=desc, disable=not show_progress, leave=False, dynamic_ncols=True) as bar:
            while start < n:
                size = min(self.batch_size, n - start)
                self.tried.append(size)
                try:
                    result = fn(items[start:start + size])
                except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else is re-raised
                    if not (self.enabled and is_oom_error(exc)) or size <= self.min_batch_size:
                        raise
                    self.batch_size = max(self.min_batch_size, size // 2)
                    warn_fallback(log, "oom_backoff", "out of memory with a batch of %d; retrying with %d", size,
                                  self.batch_size)
                    del exc
                    release_memory()
                    continue
                out.append(result)
                start += size
                bar.update(size)
        return out


def resolve_batch_size(batch_size, model, seq_len: int, n_rows: int, new_tokens: int = 0) -> OOMBackoff:
    """An :class:`OOMBackoff` for ``batch_size``: an int is used as given (backoff off); ``"auto"``/``None``
    starts from :func:`auto_batch_size` with backoff on."""
    fixed = check_batch_size(batch_size)
    if fixed is not None:
        return OOMBackoff(fixed, enabled=False)
    return OOMBackoff(auto_batch_size(model, seq_len, n_rows=n_rows, new_tokens=new_tokens), enabled=True)
