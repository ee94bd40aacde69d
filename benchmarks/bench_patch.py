"""Benchmark of batched activation patching vs transformer_lens.patching.get_act_patch_resid_pre.

Thin wrapper; the logic is workbench.patching.bench (and `workbench bench patch --json` is the same command):

    python benchmarks/bench_patch.py [--models organism,random512] [--n-pairs 4] [--repeats 3] [--threads 1]

Prints JSON: max_abs_diff_vs_transformer_lens, speedup_vs_transformer_lens (worst over models), per-model detail.
"""

import sys

from workbench.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "patch", "--json", *sys.argv[1:]]))
