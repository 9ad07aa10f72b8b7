"""Public pipelining API: stage info, the layer split rule and the stage-module protocol."""

from d9d.pipelining.api.layers import distribute_layers_for_pipeline_stage
from d9d.pipelining.api.protocol import ModuleSupportsPipelining
from d9d.pipelining.api.stage import PipelineStageInfo

__all__ = [
    "ModuleSupportsPipelining",
    "PipelineStageInfo",
    "distribute_layers_for_pipeline_stage",
]
