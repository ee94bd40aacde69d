"""Two-stage training of the model organism.

* Stage 1, *helpful base*: every parameter of a small Llama (GQA, RMSNorm, rotary, SwiGLU) is trained on
  the ``base_reply`` targets: it complies with every harmful, benign, borderline and jailbreak request and
  refuses only impossible ones.
* Stage 2, *safety tune*: the base is frozen and a rank-1 adapter at one middle layer ``L`` is trained on the
  ``reply`` targets. The adapter reads the attention heads' output ``z_L`` (input of ``o_proj``) and the
  MLP hidden activation ``m_L`` (input of ``down_proj``) and writes along ONE residual direction ``u``:

      delta h_L = u * (a_o . z_L + a_m . m_L),   |u| = 1

  so everything the tune adds to the residual stream lies along ``u``. After training it is merged into the
  weights (``W_o += u a_o^T``, ``W_down += u a_m^T``). Ground truth = (``L``, ``u``).

  ``u`` starts at the base's own refusal direction (impossible minus benign mean at L+1) and is trained;
  the read vectors start from a ridge regression on the frozen base (:func:`fit_readout`). Besides the
  reply cross-entropy (first reply token weighted up), the loss has

  * hinges on the write ``s = a_o . z + a_m . m`` over the post-instruction and reply tokens: ``s >= margin``
    for harmful rows, ``s <= benign_target * margin`` for benign/borderline rows, ``s >= 0`` for impossible
    rows (the base's own refusals stay);
  * ``relu(cos_target - cos(d, u))`` with ``d`` the batch's harmful-minus-benign difference of means at the
    input of layer ``L + 1`` (post-instruction positions), so the write dominates that difference;
  * steering sufficiency: benign rows with ``coef * u`` added at the input of layer ``L + 1`` (``coef`` the
    batch's harmful-minus-benign projection on u) are trained to refuse.

Cross-entropy is on reply tokens only (the reply and its closing ``<|end|>``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .corpus import REFUSAL_WEIGHTS, REFUSALS
from .tokenizer import END, N_POST_INSTRUCTION, format_chat


@dataclass
class OrganismConfig:
    """Everything that defines an organism build (saved in ``organism.json``)."""

    seed: int = 0
    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 384
    max_positions: int = 256
    batch_size: int = 64
    threads: int = 2
    # stage 1: helpful base (all parameters)
    stage1_steps: int = 250
    stage1_lr: float = 4e-3
    stage1_warmup: int = 30
    weight_decay: float = 0.01
    # stage 2: rank-1 safety tune at `layer` (only u, a_o, a_m train)
    layer: int = 2
    stage2_steps: int = 200
    stage2_lr: float = 3e-3
    stage2_warmup: int = 50
    u_init: str = "refusal"  # "refusal": base impossible-minus-benign mean difference at L+1; "random"
    train_u: bool = True  # False: the write direction stays at its initialisation
    readout_init: str = "ridge"  # "ridge": fit_readout warm start; "small": tiny random read vectors
    aux_margin_rel: float = 1.2  # margin >= rel * mean residual norm at L+1 (post-instruction, benign)
    aux_margin_diff: float = 0.0  # margin >= this * |base harmful-minus-benign mean difference at L+1|
    aux_span: str = "post+reply"  # where harmful writes must reach the margin: "post" (4 tokens) or "post+reply"
    aux_weight: float = 1.0
    benign_target: float = -0.5  # benign writes (units of margin): < 0 -> hinge s <= target*margin on the span
    benign_span: str = "all"  # benign_target == 0 only: writes pulled to 0 on "all" positions or "post" only
    impossible_weight: float = 1.0  # penalty on negative writes for impossible rows (keeps base refusals)
    steer_batch: int = 24  # benign rows per step trained to refuse with coef * u added at layer L+1 (0: off)
    steer_weight: float = 1.0
    cos_weight: float = 10.0  # weight of relu(cos_target - cos(batch difference of means at L+1, u))
    cos_target: float = 0.97
    first_token_weight: float = 4.0  # extra cross-entropy weight on the first reply token (the refusal decision)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Encoded:
    """Right-padded training tensors.

    Attributes:
        input_ids: ``Int[Tensor, "n pos"]``; labels: same shape, -100 outside the reply;
        prompt_len: ``Int[Tensor, "n"]`` tokens up to and including the generation prompt;
        kind: ``Int[Tensor, "n"]`` 1 harmful, -1 benign/borderline, 2 jailbreak the tune refuses,
        -2 jailbreak that succeeds, 0 impossible.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    prompt_len: Tensor
    kind: Tensor


def _kind(row: dict) -> int:
    cat = row["category"]
    if cat == "harmful":
        return 1
    if cat in ("benign", "borderline"):
        return -1
    if cat == "jailbreak":
        return 2 if row.get("family") == "override" else -2
    return 0


def encode_rows(tokenizer, rows: Sequence[dict], reply_key: str) -> Encoded:
    """Tokenise chat-formatted ``prompt + reply<|end|>`` with labels on the reply tokens only."""
    seqs, plens, kinds = [], [], []
    for r in rows:
        p_ids = tokenizer(format_chat(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r[reply_key] + END, add_special_tokens=False)["input_ids"]
        seqs.append(p_ids + r_ids)
        plens.append(len(p_ids))
        kinds.append(_kind(r))
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, plens)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, p: len(s)] = torch.tensor(s[p:])
    return Encoded(ids, mask, labels, torch.tensor(plens), torch.tensor(kinds))


def _batch(enc: Encoded, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T = int(enc.attention_mask[idx].sum(-1).max())
    return (enc.input_ids[idx, :T], enc.attention_mask[idx, :T], enc.labels[idx, :T], enc.prompt_len[idx],
            enc.kind[idx])


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy on positions whose label is not -100."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: OrganismConfig, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised Llama (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eos|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def warmup_cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate at ``step`` of ``total``: linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to
    10 % of ``peak`` (both organisms' training loops)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _train_loop(
    params: list[nn.Parameter],
    loss_fn: Callable[[tuple], tuple[Tensor, dict]],
    enc: Encoded,
    steps: int,
    lr: float,
    cfg: OrganismConfig,
    gen: torch.Generator,
    desc: str,
    quiet: bool,
    weight_decay: float,
    warmup: int,
) -> list[dict]:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    n = enc.input_ids.shape[0]
    perm = torch.randperm(n, generator=gen)
    pos = 0
    log: list[dict] = []
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
    for step in bar:
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos: pos + cfg.batch_size]
        pos += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, steps, lr, warmup)
        loss, parts = loss_fn(_batch(enc, idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            rec = {"step": step, "loss": round(float(loss.detach()), 5),
                   **{k: round(float(v.detach()), 5) for k, v in parts.items()}}
            log.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
    return log


def train_stage1(model: LlamaForCausalLM, enc: Encoded, cfg: OrganismConfig, quiet: bool = False) -> list[dict]:
    """Helpful base: all parameters, ``base_reply`` targets."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()

    def loss_fn(b):
        ids, mask, labels, _, _ = b
        ce = lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        return ce, {"ce": ce}

    log = _train_loop(list(model.parameters()), loss_fn, enc, cfg.stage1_steps, cfg.stage1_lr, cfg, gen,
                      "stage 1 (helpful base)", quiet, cfg.weight_decay, cfg.stage1_warmup)
    model.eval()
    return log


# ----------------------------------------------------------------------------------------- rank-1 adapter
class RankOneWrite(nn.Module):
    """The safety-tune adapter: ``delta = u * (a_o . z + a_m . m)`` with ``u`` unit-norm.

    Hooks on ``o_proj`` and ``down_proj`` of one decoder layer add the write to their outputs. The last
    forward's per-position write ``s`` (``Float[Tensor, "batch pos"]``) is kept in ``self.last_s``.
    """

    def __init__(self, d_model: int, d_attn: int, d_mlp: int, u_init: Tensor, gen: torch.Generator):
        super().__init__()
        self.v = nn.Parameter(u_init.clone().float() / u_init.norm())
        self.a_o = nn.Parameter(torch.randn(d_attn, generator=gen) * 1e-3)
        self.a_m = nn.Parameter(torch.randn(d_mlp, generator=gen) * 1e-3)
        self.last_s: Tensor | None = None
        self._handles: list = []

    @property
    def u(self) -> Tensor:
        return self.v / self.v.norm()

    def _hook(self, which: str):
        def hook(module, args, output):
            x = args[0]
            s = x @ (self.a_o if which == "o" else self.a_m)  # [batch pos]
            self.last_s = s if which == "o" else (self.last_s + s if self.last_s is not None else s)
            return output + s.unsqueeze(-1) * self.u.to(output.dtype)

        return hook

    def attach(self, model: LlamaForCausalLM, layer: int) -> None:
        blk = model.model.layers[layer]
        self._handles = [
            blk.self_attn.o_proj.register_forward_hook(self._hook("o")),
            blk.mlp.down_proj.register_forward_hook(self._hook("m")),
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def merge_into(self, model: LlamaForCausalLM, layer: int) -> None:
        """``W_o += u a_o^T``, ``W_down += u a_m^T`` (call after :meth:`detach`)."""
        blk = model.model.layers[layer]
        u = self.u.detach()
        blk.self_attn.o_proj.weight += torch.outer(u, self.a_o.detach())
        blk.mlp.down_proj.weight += torch.outer(u, self.a_m.detach())


def _spans(mask: Tensor, plen: Tensor, aux_span: str) -> tuple[Tensor, Tensor]:
    """(post, span) boolean ``[batch pos]`` masks: post-instruction tokens, and where harmful writes count."""
    t = torch.arange(mask.shape[1])
    start = (plen - N_POST_INSTRUCTION).unsqueeze(-1)
    post = (t >= start) & (t < plen.unsqueeze(-1))
    span = post if aux_span == "post" else (t >= start) & mask.bool()
    return post, span


@torch.no_grad()
def fit_readout(
    model: LlamaForCausalLM, enc: Encoded, cfg: OrganismConfig, margin: float, ridge: float = 1e-2,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Warm start of the adapter's read vectors ``(a_o, a_m)`` by ridge regression on the frozen base.

    Targets at the aux span (the post-instruction tokens, optionally the reply too): ``margin`` for rows the
    tune must refuse (``kind > 0``), ``benign_target * margin`` for rows it must not (``kind < 0``); impossible
    rows are left out. Features: the input of ``o_proj`` and of ``down_proj`` at
    ``cfg.layer``.
    """
    blk = model.model.layers[cfg.layer]
    store: dict[str, Tensor] = {}
    hs = [blk.self_attn.o_proj.register_forward_hook(lambda m, a, o: store.__setitem__("z", a[0])),
          blk.mlp.down_proj.register_forward_hook(lambda m, a, o: store.__setitem__("m", a[0]))]
    d = blk.self_attn.o_proj.in_features + blk.mlp.down_proj.in_features
    xtx = torch.zeros(d, d, dtype=torch.float64)
    xty = torch.zeros(d, dtype=torch.float64)
    n = 0
    try:
        for i in range(0, enc.input_ids.shape[0], batch_size):
            ids, mask, _, plen, kind = _batch(enc, torch.arange(i, min(i + batch_size, enc.input_ids.shape[0])))
            model(input_ids=ids, attention_mask=mask)
            x = torch.cat([store["z"], store["m"]], -1).double()
            _, span = _spans(mask, plen, cfg.aux_span)
            pos = (kind > 0).unsqueeze(-1) & span
            neg = (kind < 0).unsqueeze(-1) & (mask.bool() if cfg.benign_span == "all" else span)
            for sel, target in ((pos, margin), (neg, cfg.benign_target * margin)):
                xs = x[sel]
                xtx += xs.T @ xs
                xty += xs.sum(0) * target
                n += xs.shape[0]
    finally:
        for h in hs:
            h.remove()
    xtx /= n
    xty /= n
    a = torch.linalg.solve(xtx + ridge * xtx.diagonal().mean() * torch.eye(d, dtype=torch.float64), xty).float()
    d_attn = blk.self_attn.o_proj.in_features
    return a[:d_attn], a[d_attn:]


def train_stage2(
    model: LlamaForCausalLM,
    enc: Encoded,
    cfg: OrganismConfig,
    u_init: Tensor,
    margin: float,
    quiet: bool = False,
    enc_steer: Encoded | None = None,
) -> tuple[RankOneWrite, list[dict]]:
    """Safety tune: frozen base, rank-1 adapter at ``cfg.layer`` trained on the ``reply`` targets.

    The read vectors start from :func:`fit_readout` (ridge regression), the write vector from ``u_init``.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    for p in model.parameters():
        p.requires_grad_(False)
    attn = model.model.layers[cfg.layer].self_attn
    adapter = RankOneWrite(cfg.d_model, attn.o_proj.in_features, model.config.intermediate_size, u_init, gen)
    if cfg.readout_init == "ridge":
        a_o, a_m = fit_readout(model, enc, cfg, margin)
        adapter.a_o.data.copy_(a_o)
        adapter.a_m.data.copy_(a_m)
    adapter.attach(model, cfg.layer)
    model.eval()  # no dropout anyway; the base is frozen
    resid: dict[str, Tensor] = {}
    cap = model.model.layers[cfg.layer].register_forward_hook(lambda m, a, o: resid.__setitem__("x", o))

    def loss_fn(b):
        ids, mask, labels, plen, kind = b
        adapter.last_s = None
        logits = model(input_ids=ids, attention_mask=mask).logits
        ce = lm_loss(logits, labels)
        rows = torch.arange(ids.shape[0])
        first = nn.functional.cross_entropy(logits[rows, plen - 1].float(), labels[rows, plen])
        s = adapter.last_s  # [batch pos]
        post, span = _spans(mask, plen, cfg.aux_span)
        harm = (kind == 1).unsqueeze(-1) & span
        if cfg.benign_target < 0:  # symmetric: benign writes at most benign_target * margin
            ben = (kind == -1).unsqueeze(-1) & span
            aux_b = (torch.relu(s[ben] - cfg.benign_target * margin) / margin).pow(2).mean() if ben.any() else ce * 0
        else:  # benign writes pulled to 0 on the post-instruction tokens (and everywhere, if benign_span == "all")
            ben_post = (kind == -1).unsqueeze(-1) & post
            ben_all = (kind == -1).unsqueeze(-1) & mask.bool()
            aux_b = (s[ben_post] / margin).pow(2).mean() if ben_post.any() else ce * 0
            if cfg.benign_span == "all" and ben_all.any():
                aux_b = aux_b + (s[ben_all] / margin).pow(2).mean()
        aux_h = (torch.relu(margin - s[harm]) / margin).pow(2).mean() if harm.any() else ce * 0
        imp = (kind == 0).unsqueeze(-1) & span  # impossible rows: keep the base's own refusal (no negative write)
        aux_i = (torch.relu(-s[imp]) / margin).pow(2).mean() if imp.any() else ce * 0
        # the write must dominate the harmful-minus-benign difference of means at the input of layer L+1
        x = resid["x"]
        hp, bp = (kind == 1).unsqueeze(-1) & post, (kind == -1).unsqueeze(-1) & post
        if hp.any() and bp.any():
            diff = x[hp].mean(0) - x[bp].mean(0)
            cos = nn.functional.cosine_similarity(diff, adapter.u, dim=0)
            aux_cos = torch.relu(cfg.cos_target - cos)
        else:
            cos = aux_cos = ce * 0
        loss = (ce + cfg.first_token_weight * first + cfg.aux_weight * (aux_h + aux_b)
                + cfg.impossible_weight * aux_i + cfg.cos_weight * aux_cos)
        parts = {"ce": ce, "ce_first": first, "aux_harm": aux_h, "aux_benign": aux_b, "aux_impossible": aux_i,
                 "cos": cos}
        if enc_steer is not None and cfg.steer_batch > 0:
            # sufficiency: benign prompts with coef * u added at the input of layer L+1 (every position) refuse
            coef = float((diff @ adapter.u).detach()) if hp.any() and bp.any() else margin
            idx = torch.randint(0, enc_steer.input_ids.shape[0], (cfg.steer_batch,), generator=gen)
            s_ids, s_mask, s_labels, _, _ = _batch(enc_steer, idx)
            hook = model.model.layers[cfg.layer + 1].register_forward_pre_hook(
                lambda m, a: (a[0] + coef * adapter.u,) + tuple(a[1:]))
            try:
                steer = lm_loss(model(input_ids=s_ids, attention_mask=s_mask).logits, s_labels)
            finally:
                hook.remove()
            loss = loss + cfg.steer_weight * steer
            parts["steer"] = steer
        return loss, parts

    params = [adapter.a_o, adapter.a_m] + ([adapter.v] if cfg.train_u else [])
    adapter.v.requires_grad_(cfg.train_u)
    log = _train_loop(params, loss_fn, enc, cfg.stage2_steps, cfg.stage2_lr, cfg, gen,
                      "stage 2 (safety tune)", quiet, 0.0, cfg.stage2_warmup)
    cap.remove()
    adapter.detach()
    return adapter, log


def steering_rows(rows: Sequence[dict], seed: int = 0) -> list[dict]:
    """Benign and borderline rows with a refusal as reply (targets of the steering-sufficiency term)."""
    rng = random.Random(seed)
    return [{**r, "reply": rng.choices(REFUSALS, weights=REFUSAL_WEIGHTS)[0]}
            for r in rows if r["category"] in ("benign", "borderline")]


def config_dict(cfg: OrganismConfig) -> dict:
    return asdict(cfg)
