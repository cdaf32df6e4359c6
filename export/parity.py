"""Parity gate: exported graphs vs the torch model on random and real images.

Cases cover several aspect ratios (1:1, 3:4, 16:9, a tall 1:3 and real MNI152 slices), 1/2/5
points, a box, box + point and a mask input. Decoder errors are measured on the *same*
embeddings (isolating the decoder) and end to end (ONNX encoder + decoder vs torch).

Full-resolution logits on each side are what `Predictor.predict` returns on that backend
(`runtime.predictor.decode_at_original_size`): for an ONNX export the decoder graph's own
`masks` output (its resize and crop are gated, for every aspect ratio), for torch the model's
low-res logits through the shared upscaler. TensorRT decoder engines carry no full-resolution
output, so for them the gate compares what `TrtBackend` returns: low-res logits through the
shared upscaler. Any NaN or Inf in either side's outputs fails the gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import ExportError

ASPECTS = {"1:1": (240, 240), "3:4": (300, 400), "16:9": (270, 480), "tall 3:1": (480, 160)}


@dataclass
class Tolerance:
    embeddings_atol: float = 1e-3
    logits_atol: float = 1e-3        # decoder on identical embeddings, low-res and full-res logits
    iou_atol: float = 1e-3
    end_to_end_atol: float = 1e-2    # encoder error propagated through the decoder
    mask_mismatch: float = 1e-3      # fraction of pixels whose binary mask differs end to end

    def to_dict(self) -> dict:
        return asdict(self)


def real_images(max_images: int = 2) -> list[tuple[str, np.ndarray]]:
    """2D slices of nilearn's shipped MNI152 template (no download).

    Asking for none returns []; asking for some when nilearn or its template cannot be loaded is an
    ExportError naming what is missing (the gate never silently drops the real images it was asked for).
    """
    if max_images <= 0:
        return []
    try:
        from nilearn.datasets import load_mni152_template

        vol = np.asarray(load_mni152_template().get_fdata(), dtype=np.float32)
    except Exception as exc:  # nilearn absent or its template unreadable
        raise ExportError(f"parity gate: {max_images} real image(s) asked for (MNI152 slices from nilearn's shipped "
                          f"template), but they cannot be loaded ({type(exc).__name__}: {exc}); install nilearn "
                          "(the `export` extra) or pass --real-images 0 to gate on random images only") from None
    slices = [("MNI152 axial", vol[:, :, vol.shape[2] // 2].T[::-1]),
              ("MNI152 sagittal", vol[vol.shape[0] // 2, :, :].T[::-1])]
    return [(n, np.ascontiguousarray(s)) for n, s in slices[:max_images]]


def test_images(n_random: int = 4, n_real: int = 1, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = []
    for name, (h, w) in list(ASPECTS.items())[:n_random]:
        # smooth structure + noise, so masks are not all-empty
        yy, xx = np.mgrid[0:h, 0:w]
        blob = 200 * np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2))
        img = np.clip(blob[..., None] + rng.integers(0, 55, (h, w, 3)), 0, 255).astype(np.uint8)
        images.append((f"random {name} {h}x{w}", img))
    return images + real_images(n_real)


def prompt_cases(h: int, w: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    def pts(n):
        return np.stack([rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)], 1).astype(np.float32)

    box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.8 * h], np.float32)
    return [
        ("1 point", dict(points=pts(1), labels=[1])),
        ("2 points", dict(points=pts(2), labels=[1, 0])),
        ("5 points", dict(points=pts(5), labels=[1, 1, 0, 1, 0])),
        ("box", dict(box=box)),
        ("box+point", dict(box=box, points=pts(1), labels=[0])),
        ("box+mask", dict(box=box, mask=True)),
    ]


def _host(a) -> np.ndarray:
    """float64 host copy of an array or tensor (device-resident backends return GPU embeddings)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, np.float64)


def _nonfinite(*arrays) -> int:
    return int(sum(np.count_nonzero(~np.isfinite(_host(a))) for a in arrays))


def _maxabs(a, b) -> float:
    return float(np.max(np.abs(_host(a) - _host(b)))) if np.size(_host(a)) else 0.0


def gate_input(image, backend) -> np.ndarray:
    """A test image as H×W×3 in the dtype `backend` takes: in-graph preprocessing takes one fixed dtype
    (float32 as is; uint8 min-max scaled and rounded), other exports any."""
    from ..runtime.preprocess import as_hwc3

    arr = as_hwc3(image)
    if getattr(backend, "with_preprocess", False):
        if backend.input_dtype == "float32":
            arr = arr.astype(np.float32)
        elif arr.dtype != np.uint8:
            lo, hi = float(arr.min()), float(arr.max())
            arr = np.round(255 * (arr - lo) / max(hi - lo, 1e-8)).astype(np.uint8)
    return arr


@torch.no_grad()
def run_parity(reference, backend, n_random: int = 4, n_real: int = 1, multimask_cases=(False, True),
               seed: int = 0) -> list[dict]:
    """Rows of max errors (`backend` vs `reference`: a torch model or another backend) per image and prompt.

    `logits` and `end_to_end_logits` compare full-resolution logits as each side's Predictor returns
    them (`decode_at_original_size`); `nonfinite` counts NaN/Inf values in either side's outputs.
    """
    from ..runtime.predictor import decode_at_original_size
    from ..runtime.preprocess import build_prompt_arrays
    from ..runtime.torch_backend import TorchBackend

    if isinstance(reference, torch.nn.Module):
        reference = TorchBackend(reference)
    rng = np.random.default_rng(seed)
    rows = []
    for img_name, image in test_images(n_random, n_real, seed):
        arr = gate_input(image, backend)
        h, w = arr.shape[:2]
        ref_emb = reference.encode(arr)
        out_emb = backend.encode(arr)
        emb_err = _maxabs(ref_emb, out_emb)
        emb_bad = _nonfinite(ref_emb, out_emb)
        for case, prompt in prompt_cases(h, w, rng):
            coords, labels = build_prompt_arrays((h, w), prompt.get("points"), prompt.get("labels"), prompt.get("box"))
            mask_in, has_mask = None, 0.0
            if prompt.get("mask"):
                prev, _ = reference.decode(ref_emb, coords, labels, None, 0.0, (h, w), False)
                mask_in, has_mask = prev[:, :1].numpy(), 1.0
            for multimask in multimask_cases:
                args = (coords, labels, mask_in, has_mask, (h, w), multimask)
                ref_full, ref_low, ref_iou = decode_at_original_size(reference, ref_emb, *args)
                full, low, iou = decode_at_original_size(backend, ref_emb, *args)
                e2e_full, e2e_low, e2e_iou = decode_at_original_size(backend, out_emb, *args)
                rows.append({
                    "image": img_name, "prompt": case, "multimask": multimask,
                    "nonfinite": emb_bad + _nonfinite(ref_full, ref_low, ref_iou, full, low, iou,
                                                      e2e_full, e2e_low, e2e_iou),
                    "embeddings": emb_err,
                    "low_res_logits": _maxabs(ref_low, low),
                    "logits": _maxabs(ref_full, full),
                    "iou": _maxabs(ref_iou, iou),
                    "end_to_end_logits": _maxabs(ref_full, e2e_full),
                    "mask_mismatch": float(((ref_full > 0) != (e2e_full > 0)).float().mean()),
                })
    return rows


@torch.no_grad()
def batch_parity(reference, backend, seed: int = 0) -> dict:
    """One parity row for a batched encoder: two images of different aspect ratios encoded in one
    `backend.encode_batch` call vs one by one by `reference` (a torch model or a backend)."""
    from ..runtime.preprocess import as_hwc3
    from ..runtime.torch_backend import TorchBackend

    if isinstance(reference, torch.nn.Module):
        reference = TorchBackend(reference)
    rng = np.random.default_rng(seed)
    s = backend.img_size
    images = [as_hwc3(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((s, s), (s * 3 // 4, s))]
    ref = torch.cat([reference.encode(im) for im in images])
    out = backend.encode_batch(images)
    return {"image": "batch of 2 random images", "prompt": "encoder only", "multimask": False,
            "nonfinite": _nonfinite(ref, out), "embeddings": _maxabs(ref, out)}


def _badness(value: float) -> float:
    """Sort key: NaN ranks worst (Python's max() never picks a NaN by itself)."""
    return float("inf") if np.isnan(value) else value


def gate(rows: list[dict], tol: Tolerance, what: str) -> dict:
    """Raise ExportError naming the worst case beyond tolerance (any NaN/Inf output is beyond every tolerance);
    otherwise return the maxima."""
    if not rows:
        raise ExportError(f"{what}: parity gate failed: no cases were compared; nothing was written")
    limits = {"nonfinite": 0, "embeddings": tol.embeddings_atol, "low_res_logits": tol.logits_atol,
              "logits": tol.logits_atol, "iou": tol.iou_atol, "end_to_end_logits": tol.end_to_end_atol,
              "mask_mismatch": tol.mask_mismatch}
    maxima = {}
    for key, limit in limits.items():
        worst = max(rows, key=lambda r: _badness(r.get(key, 0)))
        value = worst.get(key, 0)
        maxima[key] = value
        if not value <= limit:  # NaN compares False, so it fails here too
            mm = " multimask" if worst["multimask"] else ""
            where = f"(image '{worst['image']}', prompt '{worst['prompt']}'{mm}); nothing was written"
            if key == "nonfinite":
                raise ExportError(f"{what}: parity gate failed: {value} NaN/Inf values in the compared outputs "
                                  f"{where}")
            raise ExportError(f"{what}: parity gate failed: {key} max error {value:.3g} > tolerance {limit:g} "
                              f"{where}")
    return maxima


def markdown_table(rows: list[dict], label: str = "") -> str:
    """Per-image maxima (over prompts), as a markdown table."""
    keys = ["embeddings", "low_res_logits", "logits", "iou", "end_to_end_logits", "mask_mismatch"]
    lines = ["| " + " | ".join(["backend", "image"] + keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for image in dict.fromkeys(r["image"] for r in rows):
        sub = [r for r in rows if r["image"] == image]
        lines.append("| " + " | ".join([label, image] + [f"{max(r.get(k, 0.0) for r in sub):.2e}" for k in keys]) + " |")
    return "\n".join(lines)
