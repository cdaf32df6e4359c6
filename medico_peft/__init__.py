"""medico_peft: parameter-efficient finetuning of Segment Anything on medical images.

The top-level import stays light (no torch, no peft) so that `medico-peft --help` is fast;
import the stage you need: `medico_peft.models`, `medico_peft.tuners`, `medico_peft.adapters`,
`medico_peft.data`, `medico_peft.training`, `medico_peft.evaluation`, `medico_peft.export`,
`medico_peft.runtime`.
"""

__version__ = "0.1.0"

# OpenMP (torch's CPU thread pool) reads its wait policy once, when torch loads. By default idle
# worker threads spin between parallel regions; on a CPU shared with other processes (DataLoader
# workers, other jobs) the spinning thread keeps the core while the thread the barrier waits for is
# descheduled, and every one of the ~10^3 small ops per training step pays a scheduler slice:
# measured on 2 cores with one competing process, LiteMedSAM's mask decoder went from 0.065 s to
# 0.9-1.9 s with 2 threads. PASSIVE (sleep instead of spin) keeps it near 0.25 s under the same load
# (benchmarks/results/step_time.md). Only a default: an explicit OMP_WAIT_POLICY wins, and
# MEDICO_PEFT_OMP_DEFAULTS=0 leaves the environment untouched. No effect if torch was imported first.
import os as _os

if _os.environ.get("MEDICO_PEFT_OMP_DEFAULTS", "1") != "0":
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
del _os
