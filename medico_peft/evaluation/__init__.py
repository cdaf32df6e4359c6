"""Evaluation stage: Dice metrics, corrective-click simulation, the interactive protocol and its reports."""

from .interactive import EvalResult, evaluate_interactive, run_protocol
from .segmenter import Segmenter, TorchSegmenter, as_segmenter

__all__ = ["evaluate_interactive", "EvalResult", "run_protocol", "Segmenter", "TorchSegmenter", "as_segmenter"]
