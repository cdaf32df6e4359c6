"""Bottleneck adapters (AdaptFormer parallel, Houlsby/Medical-SAM-Adapter sequential): our own modules."""

from .config import adapter_param_count
from .layer import Bottleneck, ParallelAdapter, SequentialAdapter
from .model import inject_adapters, unwrap_adapters

__all__ = ["Bottleneck", "ParallelAdapter", "SequentialAdapter", "inject_adapters", "unwrap_adapters",
           "adapter_param_count"]
