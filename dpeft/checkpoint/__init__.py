"""Checkpoints: distributed checkpoints (save/load/reshard, export to PEFT format) and the streaming merge of
adapters into sharded HF safetensors checkpoints."""

from dpeft.checkpoint.dcp import latest_checkpoint, load_checkpoint, save_checkpoint
from dpeft.checkpoint.export import export_checkpoint
from dpeft.checkpoint.merge import MergeReport, merge_checkpoint

__all__ = [
    "MergeReport",
    "export_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "merge_checkpoint",
    "save_checkpoint",
]
