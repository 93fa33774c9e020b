"""Checkpoints: the streaming merge of adapters into sharded HF safetensors checkpoints."""

from dpeft.checkpoint.merge import MergeReport, merge_checkpoint

__all__ = ["MergeReport", "merge_checkpoint"]
