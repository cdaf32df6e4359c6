"""Parameter-efficient finetuning of `MedSam`: LoRA/DoRA via HF peft, bottleneck adapters, freeze policy, merge.

Layout follows peft's `tuners/<method>/` split: `lora/` and `adapter/` each hold config, layer and
model (injection) code; `inject`, `merge`, `freeze` and `report` work across methods.
"""

from .blocks import encoder_block_names, encoder_blocks, select_block_names
from .config import METHODS, TARGETS, PeftConfig
from .inject import inject, is_injected
from .merge import merge, unload
from .report import ReportRow, format_report, parameter_report, trainable_state_dict

__all__ = ["PeftConfig", "METHODS", "TARGETS", "inject", "is_injected", "merge", "unload", "trainable_state_dict",
           "parameter_report", "format_report", "ReportRow", "encoder_blocks", "encoder_block_names",
           "select_block_names"]
