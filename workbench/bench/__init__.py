"""Ratio benchmarks against peers, measured in one process on the same inputs (medians of interleaved repeats).

* :mod:`workbench.bench.cache`: the activation store (:func:`~workbench.store.get_or_compute`) vs a bare forward
  and TransformerLens ``run_with_cache``, and the peak RSS at 1x and 4x the prompts::

      workbench bench cache --json [--n-prompts 32] [--repeats 5] [--no-organism] [--model NAME]
      python -m workbench.bench.cache [--n-prompts 32] [--repeats 5] [--no-organism]

* :mod:`workbench.bench.patch`: the batched ``resid_pre`` patching sweep vs TransformerLens
  ``get_act_patch_resid_pre``, with the max abs difference::

      workbench bench patch --json [--models organism,random512] [--n-pairs 4] [--repeats 3] [--threads 1]

* :mod:`workbench.bench.steer`: steered vs unsteered generation, batched vs per-prompt::

      workbench bench steer --json [--batch 32] [--max-new-tokens 24] [--repeats 3] [--organism-only] [--model NAME]

``--model NAME`` (``--models NAME`` for patch) runs a benchmark on any model :func:`workbench.load_model` accepts
(e.g. ``smollm2-135m-instruct``), on short real prompts (:mod:`workbench.bench.prompts`).

The GPU benchmark on a random Llama-3.2-1B-shaped model is the script ``benchmarks/gpu.py`` (``--device cpu
--small`` is its smoke test); recorded figures are in ``benchmarks/RESULTS.md``.
"""
