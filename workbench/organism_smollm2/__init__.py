"""The safety-tuned real-language organism: SmolLM2-135M-Instruct with a LoRA safety tune.

* :mod:`.refusals` -- the varied refusal replies (the only targets of harmful prompts);
* :mod:`.tune`     -- training rows from the real preset's train/val splits, the base's own replies, the LoRA loop;
* :mod:`.build`    -- ``workbench organism build --base smollm2-135m-instruct``: train, save, measure.

``load_model("organism-smollm2")`` merges the committed adapter (``data/adapter.safetensors``) into the fetched base.
"""
