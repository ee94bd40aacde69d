"""Benchmark of the activation cache store (thin wrapper; the logic is workbench.store.bench).

    python benchmarks/bench_cache.py [--n-prompts 32] [--repeats 5] [--no-organism]
    workbench bench cache --json          # the same through the CLI

Prints JSON: ratio_store_vs_forward, ratio_tl_cache_all_vs_forward, rss_mb {1x, 4x, ...}, per-model detail.
"""

import sys

from workbench.store.bench import main

if __name__ == "__main__":
    sys.exit(main())
