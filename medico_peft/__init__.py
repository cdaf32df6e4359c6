"""medico_peft: parameter-efficient finetuning of Segment Anything on medical images.

The top-level import stays light (no torch, no peft) so that `medico-peft --help` is fast;
import the stage you need: `medico_peft.models`, `medico_peft.tuners`, `medico_peft.adapters`,
`medico_peft.data`, `medico_peft.training`, `medico_peft.evaluation`, `medico_peft.export`,
`medico_peft.runtime`.
"""

__version__ = "0.1.0"
