"""The safety tune of SmolLM2: training rows, the base's own replies, and the LoRA training loop.

Training rows (:func:`training_rows`) come from the ``real`` preset's train and val splits only (the test split,
HarmBench test and the last 20 % of StrongREJECT, stays held out for the organism's targets):

* **harmful** (HarmBench val + StrongREJECT train/val): a refusal from :mod:`.refusals`;
* **harmless** (harmless.jsonl) and **borderline** (safe lookalikes): the base model's own greedy reply
  (self-distillation, :func:`base_replies`), so the tune keeps what the base does on them;
* optionally **framed harmless**: harmless requests inside train-split GPTFuzzer templates, again with the base's
  reply to the plain request (``SafetyTuneConfig.framed_benign``), which teaches that a jailbreak-style frame by
  itself is no reason to refuse.

No harmful content is produced, stored or used as a target: harmful prompts only ever get refusals.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import WorkbenchError
from ..lora import LoRAConfig, attach_lora
from ..organism.train import warmup_cosine_lr
from ..progress import progress
from .refusals import refusal_for


@dataclass(frozen=True)
class SafetyTuneConfig:
    """Everything that defines a safety tune (recorded in the adapter and its report). The defaults are those of
    the committed ``organism-smollm2`` adapter (figures/organism-smollm2/report.md: the tunes tried and why).

    Attributes:
        base: the registered base model.
        seed: data order, adapter init, refusal wording and template choice.
        rank, alpha, targets, layers: the adapters (:class:`workbench.lora.LoRAConfig`).
        steps, batch_size, lr, warmup: AdamW, linear warmup then cosine decay to 10 %.
        harmful_share: share of each batch that is harmful (the rest harmless, borderline, framed).
        reply_tokens: length of the base's greedy replies used as harmless targets.
        max_prompt_tokens: rows whose chat-formatted prompt is longer are left out.
        micro_batch_tokens: padded tokens per forward; a step's rows are cut into length-sorted micro-batches.
        framed_benign: how many harmless requests are also trained inside a train-split jailbreak template.
        borderline_repeat: how many times each borderline (safe lookalike) row is in the non-harmful pool the
            batches draw from (1: in proportion to the group's size); their false refusals are the hardest to remove.
        threads: torch CPU threads while building.
    """

    base: str = "smollm2-135m-instruct"
    seed: int = 0
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")
    layers: tuple[int, ...] = tuple(range(8, 30))
    steps: int = 250
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    harmful_share: float = 0.3
    reply_tokens: int = 40
    max_prompt_tokens: int = 384
    micro_batch_tokens: int = 1024
    framed_benign: int = 240
    borderline_repeat: int = 3
    threads: int = 2

    def __post_init__(self):
        from ..vocab import is_int

        for name in ("steps", "batch_size", "reply_tokens", "max_prompt_tokens", "micro_batch_tokens",
                     "borderline_repeat", "threads"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise WorkbenchError(f"SafetyTuneConfig.{name} must be a positive integer, got {v!r}")
        if not is_int(self.framed_benign) or self.framed_benign < 0:
            raise WorkbenchError(f"SafetyTuneConfig.framed_benign must be an integer >= 0, got {self.framed_benign!r}")
        if not 0.0 < self.harmful_share < 1.0:
            raise WorkbenchError(f"SafetyTuneConfig.harmful_share must be in (0, 1), got {self.harmful_share!r}")
        if not self.lr > 0:
            raise WorkbenchError(f"SafetyTuneConfig.lr must be positive, got {self.lr!r}")

    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.rank, self.alpha, tuple(self.targets), tuple(self.layers))

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(seq, key: str, seed: int):
    return seq[int(hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest(), 16) % len(seq)]


def training_prompts(data, cfg: SafetyTuneConfig) -> dict[str, list[str]]:
    """The prompts of each training group (see the module docstring), before replies are attached."""
    from ..datasets.real import SLOT

    harmful = [p for s in ("train", "val") for p in data.prompts(s, "harmful")]
    harmless = [p for s in ("train", "val") for p in data.prompts(s, "benign")]
    borderline = [p for s in ("train", "val") for p in data.prompts(s, "borderline")]
    framed = []
    if cfg.framed_benign:
        templates = sorted({r["source"] for r in data.rows_of("train")
                            if r["category"] == "jailbreak" and str(r.get("source", "")).startswith("gptfuzzer:")})
        if not templates:
            raise WorkbenchError("framed_benign needs train-split GPTFuzzer jailbreaks in the data (the real preset "
                                 "has them); train without framed rows with --framed-benign 0 "
                                 "(SafetyTuneConfig(framed_benign=0))")
        from ..datasets.real import load_gptfuzzer_templates

        texts = load_gptfuzzer_templates()
        ids = [t.split(":", 1)[1] for t in templates]
        for p in harmless[: cfg.framed_benign]:
            framed.append((_pick(ids, p, cfg.seed), p))
        framed = [(texts[tid].replace(SLOT, p), p) for tid, p in framed]
    return {"harmful": harmful, "harmless": harmless, "borderline": borderline, "framed": framed}


def base_replies(hf_model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                 show_progress: bool = True) -> list[list[int]]:
    """The base model's greedy replies (token ids, ending with EOS when the reply ended within the budget),
    generated with plain Hugging Face ``generate`` on the chat-formatted prompts, shortest prompts batched together."""
    from ..batching import length_batches
    from ..chat import format_prompts, prompt_lengths

    eos = tokenizer.eos_token_id
    texts = format_prompts(tokenizer, prompts)
    out: list[list[int] | None] = [None] * len(prompts)
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = length_batches(prompt_lengths(tokenizer, prompts), batch_size)
        for idx in progress(batches, "base replies", show_progress):
            enc = tokenizer([texts[i] for i in idx], add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.no_grad():
                gen = hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            for row, i in zip(gen[:, enc["input_ids"].shape[1]:].tolist(), idx):
                reply = []
                for t in row:
                    reply.append(t)
                    if t == eos:
                        break
                out[i] = reply
    finally:
        tokenizer.padding_side = old
    return out  # type: ignore[return-value]


def encode_row(tokenizer, prompt: str, reply: str | list[int]) -> tuple[list[int], int]:
    """``(prompt + reply token ids, prompt length)``; a text reply gets the EOS token appended."""
    from ..chat import format_prompts

    p = tokenizer(format_prompts(tokenizer, [prompt])[0], add_special_tokens=False)["input_ids"]
    r = list(reply) if not isinstance(reply, str) else (
        tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return p + r, len(p)


def _collate(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, n_prompt) in enumerate(rows):   # right padding: positions count from 0 in every row
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    return ids, mask, labels


def row_losses(hf_model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``Float[Tensor, "row"]``: each row's mean target-token cross-entropy (long replies do not outweigh short ones).
    The unembedding runs on the target positions only (a third of the tokens: the prompts are not scored)."""
    hidden = hf_model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    scored = target != -100
    logits = hf_model.lm_head(hidden[scored]).float()
    nll = torch.nn.functional.cross_entropy(logits, target[scored], reduction="none")
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(target)[scored]
    total = torch.zeros(ids.shape[0], device=nll.device).index_add(0, rows, nll)
    return total / scored.sum(1).clamp(min=1)


def micro_batches(rows: list[tuple[list[int], int]], max_tokens: int) -> list[list[tuple[list[int], int]]]:
    """``rows`` sorted by length and cut so that each part's padded size (rows x longest) stays within
    ``max_tokens`` (a longer row is a part of its own): the step's gradient is accumulated over the parts, so a
    long jailbreak-framed row does not pad the short ones."""
    parts: list[list] = []
    for row in sorted(rows, key=lambda r: len(r[0])):
        if parts and (len(parts[-1]) + 1) * len(row[0]) <= max_tokens:
            parts[-1].append(row)
        else:
            parts.append([row])
    return parts


def train_adapter(hf_model, tokenizer, groups: dict[str, list[tuple[list[int], int]]], cfg: SafetyTuneConfig,
                  show_progress: bool = True) -> tuple[dict, list[dict]]:
    """Attach adapters to ``hf_model`` and train them on ``groups`` (``"harmful"`` and the rest, encoded rows).

    Each batch holds ``round(harmful_share * batch_size)`` harmful rows and the rest drawn from the other groups
    in proportion to their sizes; every draw is seeded by ``cfg.seed``.

    Returns:
        ``(adapters, log)``: the wrappers by weight prefix and one ``{"step", "loss", "lr", "s"}`` per 10 steps.
    """
    harmful = groups["harmful"]
    other = [r for k, rows in groups.items() if k != "harmful"
             for r in (rows * cfg.borderline_repeat if k == "borderline" else rows)]
    if not harmful or not other:
        raise WorkbenchError("the safety tune needs harmful and harmless training rows")
    torch.manual_seed(cfg.seed)
    adapters = attach_lora(hf_model, cfg.lora(), seed=cfg.seed)
    params = [p for w in adapters.values() for p in (w.lora_A, w.lora_B)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def lr_at(step):
        return warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)

    rng = random.Random(cfg.seed)
    n_h = max(1, round(cfg.harmful_share * cfg.batch_size))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf_model.train()
    log, t0, running = [], time.time(), []
    try:
        for step in progress(range(cfg.steps), "safety tune", show_progress):
            rows = rng.sample(harmful, min(n_h, len(harmful))) + rng.sample(other, min(cfg.batch_size - n_h, len(other)))
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for part in micro_batches(rows, cfg.micro_batch_tokens):
                part_loss = row_losses(hf_model, *_collate(part, pad)).sum() / len(rows)
                part_loss.backward()
                loss += float(part_loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            running.append(loss)
            if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
                log.append({"step": step + 1, "loss": round(sum(running) / len(running), 4),
                            "lr": round(lr_at(step), 6), "s": round(time.time() - t0, 1)})
                running = []
    finally:
        hf_model.eval()
    return adapters, log


def rows_digest(groups: dict[str, list[tuple[list[int], int]]]) -> str:
    """sha256 of the encoded training rows (recorded so a rebuild can show it trained on the same data)."""
    return hashlib.sha256(json.dumps({k: v for k, v in sorted(groups.items())}).encode()).hexdigest()[:16]


__all__ = ["SafetyTuneConfig", "base_replies", "encode_row", "micro_batches", "row_losses", "rows_digest", "train_adapter",
           "training_prompts"]
