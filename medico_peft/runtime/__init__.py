"""Inference runtime: one `Predictor` over torch, onnxruntime and TensorRT backends.

    from medico_peft.runtime import Predictor
    p = Predictor.from_onnx("exported/")        # or .from_torch(model), .from_tensorrt("engines/")
    p.set_image(image)                          # H×W[×1|×3], uint8 or float
    out = p.predict(box=[20, 30, 120, 140])     # masks (bool, original size), scores, low-res logits
    seg = Predictor.from_onnx("semantic_export/").predict_semantic(image)   # seg.labels (H, W), seg.logits (C, H, W)
"""

from __future__ import annotations


def __getattr__(name):  # lazy: importing the package must not import torch
    if name in ("Predictor", "Prediction"):
        from . import predictor

        return getattr(predictor, name)
    if name == "SemanticPrediction":
        from . import semantic

        return semantic.SemanticPrediction
    raise AttributeError(name)


__all__ = ["Predictor", "Prediction", "SemanticPrediction"]
