"""Model zoo: SAM ViT-B/L/H (any input size), a tiny test ViT, and LiteMedSAM (TinyViT, real weights)."""

from .build import build_from_spec, build_model
from .checkpoints import detect_spec, load_model, read_state_dict, save_model
from .sam import MedSam
from .specs import SPECS, ModelSpec, get_spec

__all__ = ["MedSam", "ModelSpec", "SPECS", "get_spec", "build_model", "build_from_spec", "load_model",
           "read_state_dict", "detect_spec", "save_model"]
