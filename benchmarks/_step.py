"""One interactive training step built from the trainer's own parts, shared by bench_memory and bench_step_time.

`build(model_name, method, ...)` returns a `StepRig`: the model with PEFT injected, the `SegmentedEncoder`
(memory policy), `InteractiveStep`, AdamW over the trainable parameters, and one fixed synthetic batch in
which every object is valid (so every method sees the same work). `rig.step()` runs one optimiser step
exactly as the trainer does (interactive loss with per-iteration backward, encoder backward, AdamW step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# method key -> (label, PeftConfig fields). "LATE" = the last few blocks (LATE_BLOCKS per model).
METHODS = {
    "full": ("full finetune", {"method": "full"}),
    "lora_qv": ("LoRA r=8 q,v (all blocks) + decoder", {"method": "lora"}),
    "lora_all": ("LoRA r=8 all linears (qkv, proj, mlp) + decoder",
                 {"method": "lora", "targets": "qkv,proj,mlp"}),
    "lora_late": ("LoRA r=8 q,v (late blocks) + decoder", {"method": "lora", "blocks": "LATE"}),
    "adapter": ("adapter (parallel, w=64, all blocks) + decoder", {"method": "adapter"}),
    "decoder": ("decoder only", {"method": "decoder_only"}),
}
LATE_BLOCKS = {"vit_b": 6, "vit_l": 6, "vit_h": 6, "vit_tiny": 2, "litemedsam": 4}


@dataclass
class StepRig:
    model: torch.nn.Module
    encoder: object
    step_fn: object
    optim: torch.optim.Optimizer
    batch: dict
    images: torch.Tensor
    params: list
    seed: int = 0

    def step(self, prompt: str = "box") -> float:
        from medico_peft.training.interactive_step import finish_backward

        gen = torch.Generator().manual_seed(self.seed)
        loss, stats = self.step_fn(self.images, self.batch, prompt, gen)
        finish_backward(loss, stats)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return float(loss)


def build(model_name: str, method: str, *, img_size: int | None = None, batch: int = 1, objects: int = 5,
          sub_iterations: int = 8, checkpointing: bool = False, cache: bool = False, frozen_prefix: bool = True,
          device: str = "cpu", model=None, peft_overrides: dict | None = None) -> StepRig:
    from medico_peft.models import load_model
    from medico_peft.training.config import LossConfig
    from medico_peft.training.data_source import SyntheticSlices
    from medico_peft.training.interactive_step import InteractiveStep
    from medico_peft.training.memory import FeatureCache, SegmentedEncoder
    from medico_peft.tuners import PeftConfig, inject

    _, peft = METHODS[method]
    peft = {**peft, **(peft_overrides or {})}
    if peft.get("blocks") == "LATE":
        peft["blocks"] = LATE_BLOCKS[model_name]
    if model is None:
        model = load_model(model_name, img_size=img_size if model_name.startswith("vit") else None)
    model = model.to(device)
    inject(model, PeftConfig(**peft))
    model.train()
    feature_cache = FeatureCache(torch.float16) if cache else None
    encoder = SegmentedEncoder(model, frozen_prefix=frozen_prefix, checkpointing=checkpointing, cache=feature_cache)
    step_fn = InteractiveStep(model, encoder, LossConfig(), sub_iterations, 0.5, per_iteration_backward=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5)
    data = SyntheticSlices(batch, model.img_size, n_objects=objects, seed=0)
    b = torch.utils.data.default_collate([data[i] for i in range(batch)])
    b["object_valid"][:] = True
    return StepRig(model, encoder, step_fn, optim, b, b["image"].to(device), params)


def measured_step(rig: StepRig, device: str = "cpu") -> dict:
    """One optimiser step under `TensorMemoryTracker`, once AdamW's state exists and the feature cache is
    warm (their bytes count, as in every later step of a run): {"peak": bytes, "by_category": {category:
    bytes at the peak}, "seconds": the tracked step's wall time}."""
    import time

    from medico_peft.utils.tensor_memory import TensorMemoryTracker

    for p in rig.params:  # create AdamW's state (moments, step) before the measured step
        p.grad = torch.zeros_like(p)
    rig.optim.step()
    rig.optim.zero_grad(set_to_none=True)
    cache = rig.encoder.cache
    if cache is not None:
        with torch.no_grad():
            rig.encoder(rig.images)
    tracker = TensorMemoryTracker(device)
    tracker.register_model(rig.model)
    tracker.register_optimizer(rig.optim)
    if cache is not None:
        tracker.register(list(cache.store.values()), "cached_features")
    tracker.register([v for v in rig.batch.values() if isinstance(v, torch.Tensor)] + [rig.images], "activations")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tracker:
        rig.step()
    seconds = time.perf_counter() - t0
    tracker.remove_hooks()
    return {"peak": tracker.peak, "by_category": dict(tracker.peak_by_category), "seconds": seconds}
