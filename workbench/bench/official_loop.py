"""The peer of ``workbench bench steer``: the official Guiding Giants steered-generation loop, as it runs.

Written for the benchmark from the code reading in :mod:`workbench.steering.official` (nothing copied): one prompt
at a time (its benchmarks call generation per prompt), the prompt rendered with the generation prompt and
tokenised, forward hooks registered on the plain Hugging Face decoder layers for the call and removed after it
(capture hooks on the input layers first, then apply hooks on every layer), the controller run in the apply hook of
the deepest input layer on the captured position -1 outputs, ``s * w_l * 4.0 * d`` added at position -1 of the
outputs of the layers from there on, the captured state reset after the final layer so the controller re-runs at
every decoding step, then ``generate``. Greedy here (the timing compares the same work as the workbench's path).

It is a timing peer and an independent path: ``tests/test_hf_hooks.py`` checks that the workbench's per-step plan
(:class:`workbench.steering.steer.PerStepPlan`) generates the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..hf_hooks import decoder_layers


def official_loop(hf_model, tokenizer, prompts: Sequence[str], controller, direction: Tensor,
                  max_new_tokens: int, scale: float = 4.0) -> list[list[int]]:
    """Greedy replies (token ids, exactly ``max_new_tokens`` each) of the official per-prompt steering loop."""
    layers = decoder_layers(hf_model)
    n = len(layers)
    inputs = list(controller.cfg.input_layers)
    deepest = max(inputs)
    param = next(controller.parameters())
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        state: dict = {"captured": {}, "s": None, "w": None}

        def capture(i):
            def hook(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                state["captured"][i] = h[:, -1].detach()
            return hook

        def apply(i):
            def hook(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                if i == deepest and len(state["captured"]) == len(inputs):
                    x = torch.stack([state["captured"][j] for j in inputs], dim=1).to(param.device)
                    with torch.no_grad():
                        state["s"], state["w"] = controller(x)
                if state["s"] is not None and i >= deepest:
                    h = h.clone()
                    delta = (state["s"][:, None] * state["w"][:, i:i + 1] * scale).to(h.dtype) * \
                        direction.to(device=h.device, dtype=h.dtype)
                    h[:, -1] = h[:, -1] + delta
                if i == n - 1:   # after the final layer: the next forward (decoding step) starts afresh
                    state["captured"], state["s"], state["w"] = {}, None, None
                return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
            return hook

        handles = [layers[i].register_forward_hook(capture(i)) for i in inputs]
        handles += [layers[i].register_forward_hook(apply(i)) for i in range(n)]
        try:
            with torch.no_grad():
                ids = hf_model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=tokenizer.pad_token_id)
        finally:
            for h in handles:
                h.remove()
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out
