"""The stages this package ships, in run order: the registry the runners use when given none."""
from __future__ import annotations

from data_pipeline import captions, clip_filter, cluster, expert_stages
from data_pipeline.stages import StageRegistry


def default_registry() -> StageRegistry:
  registry = StageRegistry()
  for stage in (cluster.MAP_STAGE, cluster.REDUCE_STAGE, clip_filter.STAGE, captions.STAGE,
                expert_stages.EXPERTS_STAGE, expert_stages.TARGETS_STAGE):
    registry.register(stage)
  return registry
