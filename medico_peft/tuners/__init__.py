"""Parameter-efficient finetuning of `MedSam`: LoRA/DoRA via HF peft, bottleneck adapters, freeze policy, merge.

Layout follows peft's `tuners/<method>/` split: `lora/` and `adapter/` each hold config, layer and
model (injection) code; `inject`, `merge`, `freeze` and `report` work across methods. What `inject`
recorded is one `PeftState` at `model.medico_peft`, read through `is_injected` / `peft_state`.
"""

from .blocks import encoder_block_names, encoder_blocks, select_block_names
from .config import METHODS, TARGETS, PeftConfig
from .inject import inject
from .merge import MergeMismatchError, MergeProbe, merge, unload, verify_merge
from .report import ReportRow, format_report, parameter_report, trainable_state_dict
from .state import PeftState, is_injected, peft_state

__all__ = ["PeftConfig", "METHODS", "TARGETS", "inject", "is_injected", "peft_state", "PeftState", "merge", "unload",
           "verify_merge", "MergeProbe", "MergeMismatchError", "trainable_state_dict",
           "parameter_report", "format_report", "ReportRow", "encoder_blocks", "encoder_block_names",
           "select_block_names"]
