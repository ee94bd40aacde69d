"""The five stages of a study, each ``Config -> run(model, data, store, config, inputs) -> Result`` (see
:mod:`.base`), in the order :func:`workbench.pipeline.run_main_job` runs them.

=============  ===============================  =================================  =================================
stage          reads                            writes (``<out>/<stage>/``)         config
=============  ===============================  =================================  =================================
evaluate       prompt data                      generations.jsonl, summary.json     :class:`.evaluate.EvaluateConfig`
directions     prompt data, store               direction.{safetensors,json},       :class:`.directions.DirectionsConfig`
                                                candidate scores, projections
patching       prompt data (pairs), store,      patching.json, sweeps, subspace     :class:`.patching.PatchingConfig`
               directions/direction (if any)
sparsity       prompt data, store,              one CSV per table, summary.json     :class:`.sparsity.SparsityConfig`
               directions/direction (if any)
steering       prompt data, directions/         steering.json, generations,         :class:`workbench.steering.compare.CompareConfig`
               direction (required)             controllers/<method>
=============  ===============================  =================================  =================================

A new analysis is a new module here: a config dataclass, a :class:`.base.Stage` subclass (``run`` and
``figures``), an entry in :data:`STAGES`; :class:`workbench.pipeline.RunConfig` and the CLI pick it up.
"""

from __future__ import annotations

from .base import Result, Stage
from .directions import DirectionsConfig, DirectionsResult, DirectionsStage
from .evaluate import EvaluateConfig, EvaluateResult, EvaluateStage
from .patching import PatchingConfig, PatchingResult, PatchingStage
from .sparsity import SparsityConfig, SparsityStage
from .steering import SteeringConfig, SteeringResult, SteeringStage

#: every stage by name, in run order
STAGES: dict[str, Stage] = {s.name: s for s in (EvaluateStage(), DirectionsStage(), PatchingStage(),
                                                 SparsityStage(), SteeringStage())}

__all__ = ["STAGES", "Result", "Stage", "EvaluateConfig", "EvaluateResult", "DirectionsConfig", "DirectionsResult",
           "PatchingConfig", "PatchingResult", "SparsityConfig", "SteeringConfig", "SteeringResult"]
