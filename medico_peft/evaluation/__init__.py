"""Evaluation stage: Dice metrics, corrective-click simulation, the interactive protocol and its reports."""
