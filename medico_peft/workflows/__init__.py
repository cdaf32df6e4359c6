"""Workflows: end-to-end runs that combine data, training and evaluation (the demo)."""
