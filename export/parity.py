"""Parity gate: exported graphs vs the torch model on random and real images.

Cases cover several aspect ratios (1:1, 3:4, 16:9, a tall 1:3 and real MNI152 slices), 1/2/5
points, a box, box + point and a mask input. Decoder errors are measured on the *same*
embeddings (isolating the decoder) and end to end (ONNX encoder + decoder vs torch).
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
    """2D slices of nilearn's shipped MNI152 template (no download); empty if nilearn is missing."""
    try:
        from nilearn.datasets import load_mni152_template

        vol = np.asarray(load_mni152_template().get_fdata(), dtype=np.float32)
    except Exception:  # nilearn absent or its template unreadable: random images still gate
        return []
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


def _maxabs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


@torch.no_grad()
def run_parity(reference, backend, n_random: int = 4, n_real: int = 1, multimask_cases=(False, True),
               seed: int = 0) -> list[dict]:
    """Rows of max errors (`backend` vs `reference`: a torch model or another backend) per image and prompt."""
    from ..runtime.preprocess import as_hwc3, build_prompt_arrays, upscale_masks
    from ..runtime.torch_backend import TorchBackend

    if isinstance(reference, torch.nn.Module):
        reference = TorchBackend(reference)
    img_size = reference.img_size
    rng = np.random.default_rng(seed)
    rows = []
    for img_name, image in test_images(n_random, n_real, seed):
        arr = as_hwc3(image)
        if getattr(backend, "with_preprocess", False):  # in-graph preprocessing takes one fixed dtype
            if backend.input_dtype == "float32":
                arr = arr.astype(np.float32)
            elif arr.dtype != np.uint8:
                lo, hi = float(arr.min()), float(arr.max())
                arr = np.round(255 * (arr - lo) / max(hi - lo, 1e-8)).astype(np.uint8)
        h, w = arr.shape[:2]
        hw = torch.tensor([h, w], dtype=torch.float32)
        ref_emb = reference.encode(arr)
        out_emb = backend.encode(arr)
        emb_err = _maxabs(ref_emb, out_emb)
        for case, prompt in prompt_cases(h, w, rng):
            coords, labels = build_prompt_arrays((h, w), prompt.get("points"), prompt.get("labels"), prompt.get("box"))
            mask_in, has_mask = None, 0.0
            if prompt.get("mask"):
                prev, _ = reference.decode(ref_emb, coords, labels, None, 0.0, (h, w), False)
                mask_in, has_mask = prev[:, :1].numpy(), 1.0
            for multimask in multimask_cases:
                ref_low, ref_iou = reference.decode(ref_emb, coords, labels, mask_in, has_mask, (h, w), multimask)
                low, iou = backend.decode(ref_emb, coords, labels, mask_in, has_mask, (h, w), multimask)
                e2e_low, _ = backend.decode(out_emb, coords, labels, mask_in, has_mask, (h, w), multimask)
                ref_full = upscale_masks(ref_low.float(), hw, img_size)
                full = upscale_masks(low.float(), hw, img_size)
                e2e_full = upscale_masks(e2e_low.float(), hw, img_size)
                rows.append({
                    "image": img_name, "prompt": case, "multimask": multimask,
                    "embeddings": emb_err,
                    "low_res_logits": _maxabs(ref_low, low),
                    "logits": _maxabs(ref_full, full),
                    "iou": _maxabs(ref_iou, iou),
                    "end_to_end_logits": _maxabs(ref_full, e2e_full),
                    "mask_mismatch": float(((ref_full > 0) != (e2e_full > 0)).float().mean()),
                })
    return rows


def gate(rows: list[dict], tol: Tolerance, what: str) -> dict:
    """Raise ExportError naming the worst case beyond tolerance; otherwise return the maxima."""
    limits = {"embeddings": tol.embeddings_atol, "low_res_logits": tol.logits_atol, "logits": tol.logits_atol,
              "iou": tol.iou_atol, "end_to_end_logits": tol.end_to_end_atol, "mask_mismatch": tol.mask_mismatch}
    maxima = {}
    for key, limit in limits.items():
        worst = max(rows, key=lambda r: r[key])
        maxima[key] = worst[key]
        if not worst[key] <= limit:  # also catches NaN
            mm = " multimask" if worst["multimask"] else ""
            raise ExportError(f"{what}: parity gate failed: {key} max error {worst[key]:.3g} > tolerance {limit:g} "
                              f"(image '{worst['image']}', prompt '{worst['prompt']}'{mm}); nothing was written")
    return maxima


def markdown_table(rows: list[dict], label: str = "") -> str:
    """Per-image maxima (over prompts), as a markdown table."""
    keys = ["embeddings", "low_res_logits", "logits", "iou", "end_to_end_logits", "mask_mismatch"]
    lines = ["| " + " | ".join(["backend", "image"] + keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for image in dict.fromkeys(r["image"] for r in rows):
        sub = [r for r in rows if r["image"] == image]
        lines.append("| " + " | ".join([label, image] + [f"{max(r[k] for r in sub):.2e}" for k in keys]) + " |")
    return "\n".join(lines)
