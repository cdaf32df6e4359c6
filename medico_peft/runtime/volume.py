"""3D segmentation from a few prompts: segment one slice, propagate slice by slice both ways, correct in 3D.

    from medico_peft.runtime import Predictor
    from medico_peft.runtime.volume import VolumePredictor
    vp = VolumePredictor(Predictor.from_onnx("exported/")).set_volume(vol, axis=2, spacing=(1, 1, 1))
    mask = vp.segment(80, box=[60, 90, 95, 120])          # bool, vol.shape
    mask = vp.correct(71, points=[[70, 100]], labels=[0])  # a negative click on slice 71
    mask = vp.undo()

Works over any `Predictor` backend (torch, onnxruntime, TensorRT): it only calls `Predictor.encode_images`,
`set_embeddings` and `predict`, so nothing here is backend-specific.

Conventions
- Slice i is `np.take(volume, i, axis)`; a point (x, y) / box (x0, y0, x1, y1) is in that slice's voxel
  indices: y = row = the first remaining array axis, x = column = the second (e.g. axis=2 on a NIfTI array:
  x indexes array axis 1, y array axis 0). Boxes are inclusive, as `data.prompts.mask_box` returns them.
- Intensities: one window for the whole volume (`intensity`, a `data.normalize` preset, default
  `mr_percentile`; CT presets such as `ct_soft_tissue` work too) maps every slice to uint8 exactly as
  `medico-peft convert` wrote the training shards, so a finetuned adapter sees the intensities it was trained on.
  `intensity=None` passes raw values (the model then min-max normalises each slice on its own).
- Anisotropic spacing: the 2D model expects square pixels, so a slice whose two in-plane spacings differ by
  more than 1 % is resampled (bilinear) to the finer of the two before encoding; prompts are mapped onto that
  grid and the logits are resampled back to the voxel grid before thresholding. The slicing-axis spacing does
  not enter (propagation goes one slice at a time whatever the slice distance). Isotropic slices go through
  untouched, so a 1 mm volume gives exactly what the 2D `Predictor` gives on its slices.

Propagation (`prompt_mode`)
Each next slice is prompted from the previous slice's result: `box` = the previous mask's bounding box
(`mask_box`), `points` = one positive point at its deepest pixel (`deepest_pixel`), `mask` = the previous
answer's low-res logits as SAM's mask input; `box_margin` grows the carried box by that many voxels per side.
It stops when the mask has fewer than `min_area` voxels or the model's predicted IoU falls below `stop_iou`.
Defaults chosen by measurement (benchmarks/results/volume_modes.md: zero-shot LiteMedSAM via onnxruntime,
Colin27 + AAL, axial, tight box on the middle slice of Thalamus_L, Putamen_R and Caudate_L): mean 3D Dice
`box` 0.288 (a tight carried box shrinks the mask slice after slice), `box` + margin 3 0.552, `box+mask` 0.417,
`box+mask` + margin 3 0.340, `box+points+mask` + margin 3 0.391; with `box` + margin 3, stop_iou 0.5 / 0.7 /
0.85 give 0.552 / 0.586 / 0.230. So the defaults are `prompt_mode="box"`, `box_margin=3`, `stop_iou=0.7`
(three structures, one subject: revisit with more).

Corrections
`correct(k, points=..., labels=..., box=...)` re-segments slice k with every click placed on it so far, the box
given (else the box slice k was last prompted with) and its previous low-res logits as mask input (the
Predictor paints the clicks into that mask, as in training and the 2D protocol, and accepts the answer only where
the new clicks asked for a change: its `click_merge`; a new box re-segments the slice whole), then re-propagates both ways
from k until a slice's new result agrees with its old one (Dice >= `settle_dice`), the object ends (the slices of
the old result beyond the new end are cleared), or, towards another user-prompted slice, halfway to it: every
slice keeps the answer carried from its nearest prompted slice (`repropagate="nearest"`). A correction that
leaves slice k as it was (Dice >= `settle_dice` to its old result, e.g. a click the model declined) changes
nothing else. Slices not reached keep their result. `repropagate="to_anchor"` re-propagates up to the other
prompted slice instead, and `"always"` also re-propagates after a correction that left slice k unchanged (the
behaviour before this rule). Measured (benchmarks/results/volume_corrections.md: zero-shot LiteMedSAM, Colin27
+ AAL at 2 mm, 14 deep structures and cerebellar hemispheres, axial, 5 corrective rounds): with "always" the mean
3D Dice fell from 0.363 to 0.311 and 8 of 14 objects lost Dice (re-propagating from an unchanged or barely changed
slice all the way to the start slice overwrote good slices with answers carried from a wrong one); "to_anchor"
0.363 -> 0.356 (3 of 14 lose), "nearest" 0.363 -> 0.364 (2 of 14). Zero-shot LiteMedSAM mostly declines negative
clicks inside the carried box, so corrections still gain little here. Embeddings are reused: a correction runs
only decoders unless a slice fell out of the cache.
`undo()` restores the state before the last correction (up to `max_rounds` corrections back).

Embeddings are computed lazily (only slices that propagation reaches), kept in an LRU of `cache_slices`
entries (LiteMedSAM/SAM: 4 MiB each), and encoded `batch_slices` at a time in the direction of travel when the
backend has a batch path (the torch backend; the exported ONNX encoder and TensorRT engines take one image).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..data import normalize
from ..data.prompts import deepest_pixel, mask_box
from ..errors import ConfigError, DataError

PROMPT_PARTS = ("box", "points", "mask")
REPROPAGATE = ("nearest", "to_anchor", "always")  # how far a correction re-propagates (module doc)
ANISOTROPY_TOLERANCE = 0.01


def parse_prompt_mode(mode: str) -> frozenset:
    parts = frozenset(p.strip() for p in str(mode).split("+"))
    if not parts <= set(PROMPT_PARTS) or not parts & {"box", "points"}:
        raise ConfigError(f"prompt_mode: expected '+'-joined parts of {PROMPT_PARTS} including box or points "
                          f"(e.g. 'box+mask'), got {mode!r}")
    return parts


@dataclass(frozen=True)
class SliceState:
    """What produced one slice's current result."""

    low_res: np.ndarray | None          # (4E, 4E) logits of the answer (None: the mask came from the user)
    score: float                        # predicted IoU (1.0 for a user mask)
    box: tuple | None = None            # the box it was prompted with (voxel coordinates)
    clicks: tuple = ()                  # user clicks on this slice: ((x, y, label), ...)
    anchor: bool = False                # a user prompt was placed on this slice


class VolumePredictor:
    """See the module docstring. `predictor` may be None until the first segment() (set `.predictor`), so a
    volume and its prompts can be checked before a model is loaded."""

    def __init__(self, predictor, *, cache_slices: int = 64, stop_iou: float = 0.7, min_area: int = 4,
                 prompt_mode: str = "box", max_rounds: int = 8, settle_dice: float = 0.99,
                 batch_slices: int | None = None, box_margin: float = 3.0, repropagate: str = "nearest"):
        if int(cache_slices) < 1:
            raise ConfigError(f"cache_slices: expected >= 1, got {cache_slices}")
        if not 0.0 <= float(stop_iou) <= 1.0:
            raise ConfigError(f"stop_iou: expected a value in [0, 1], got {stop_iou}")
        if int(min_area) < 1:
            raise ConfigError(f"min_area: expected >= 1 voxel, got {min_area}")
        if int(max_rounds) < 0:
            raise ConfigError(f"max_rounds: expected >= 0, got {max_rounds}")
        if not float(box_margin) >= 0.0:
            raise ConfigError(f"box_margin: expected >= 0 voxels, got {box_margin}")
        self.box_margin = float(box_margin)
        if repropagate not in REPROPAGATE:
            raise ConfigError(f"repropagate: {repropagate!r} should be one of {', '.join(REPROPAGATE)}")
        self.repropagate = repropagate
        if not 0.0 < float(settle_dice) <= 1.0:
            raise ConfigError(f"settle_dice: expected a value in (0, 1], got {settle_dice}")
        self.predictor = predictor
        self.cache_slices = int(cache_slices)
        self.stop_iou = float(stop_iou)
        self.min_area = int(min_area)
        self.prompt_mode = prompt_mode
        self.max_rounds = int(max_rounds)
        self.settle_dice = float(settle_dice)
        if batch_slices is not None and int(batch_slices) < 1:
            raise ConfigError(f"batch_slices: expected >= 1, got {batch_slices}")
        self._batch_slices = None if batch_slices is None else int(batch_slices)
        self._volume = None
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._encoded = 0
        self.decoded_slices = 0

    @property
    def batch_slices(self) -> int:
        """Slices per encoder call: as given, else the backend's batch (torch: 4; an onnxruntime/TensorRT export:
        its `max_batch`, 1 unless exported with `--max-batch`), at most cache_slices."""
        n = self._batch_slices
        if n is None:
            backend = getattr(self.predictor, "backend", None)
            artifact = getattr(backend, "artifact", None)
            if artifact is not None:
                n = artifact.max_batch
            else:
                n = 4 if hasattr(backend, "encode_batch") else 1
        return min(n, self.cache_slices)

    @property
    def prompt_mode(self) -> str:
        return self._prompt_mode

    @prompt_mode.setter
    def prompt_mode(self, mode: str) -> None:
        self._parts = parse_prompt_mode(mode)
        self._prompt_mode = str(mode)

    # ----------------------------------------------------------------------------------- volume
    def set_volume(self, volume, *, axis: int = 0, spacing=(1.0, 1.0, 1.0), affine=None,
                   intensity: str | None = "mr_percentile") -> "VolumePredictor":
        arr = np.asarray(volume)
        if arr.ndim != 3:
            hint = "; a 2D image goes through Predictor (or `predict` without --volume)" if arr.ndim == 2 else ""
            raise DataError(f"volume: expected a 3D array, got {arr.ndim}D shape {tuple(arr.shape)}{hint}")
        if arr.dtype == np.bool_ or arr.dtype.kind not in "uif":
            raise DataError(f"volume: dtype {arr.dtype} not supported; expected integer or float intensities")
        if min(arr.shape) < 1 or any(s < 2 for i, s in enumerate(arr.shape) if i != int(axis) % 3):
            raise DataError(f"volume: shape {tuple(arr.shape)} too small; slices must be at least 2×2")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise DataError("volume: contains NaN or infinite values")
        if not isinstance(axis, (int, np.integer)) or not -3 <= int(axis) <= 2:
            raise ConfigError(f"axis: expected 0, 1 or 2, got {axis!r}")
        sp = np.asarray(spacing, dtype=float).reshape(-1)
        if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise DataError(f"spacing: expected 3 positive voxel sizes, got {np.asarray(spacing).tolist()}")
        if affine is not None:
            affine = np.asarray(affine, dtype=float)
            if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
                raise DataError(f"affine: expected a finite 4×4 matrix, got shape {affine.shape}")
        self.axis = int(axis) % 3
        self.spacing = tuple(float(s) for s in sp)
        self.affine = affine
        self._volume = arr
        self._slices_view = np.moveaxis(arr, self.axis, 0)  # [i] == np.take(arr, i, axis)
        self.n_slices = self._slices_view.shape[0]
        self.slice_shape = tuple(int(s) for s in self._slices_view.shape[1:])
        if intensity is None:
            self._window = None
        else:
            preset = f"ct_{intensity}" if intensity in normalize.CT_WINDOWS else intensity
            if preset not in normalize.PRESETS:
                raise ConfigError(f"intensity: expected one of {normalize.PRESETS} or None, got {intensity!r}")
            values = None if preset.startswith("ct_") else arr.reshape(-1)[:: max(1, arr.size // 1_000_000)]
            self._window = normalize.intensity_range(preset, values)
        plane = [s for i, s in enumerate(self.spacing) if i != self.axis]
        self.in_plane_spacing = (plane[0], plane[1])
        fine = min(plane)
        h, w = self.slice_shape
        if abs(plane[0] - plane[1]) > ANISOTROPY_TOLERANCE * fine:
            self.model_shape = (max(2, int(round(h * plane[0] / fine))), max(2, int(round(w * plane[1] / fine))))
        else:
            self.model_shape = (h, w)
        self._cache.clear()
        self._encoded = 0
        self.decoded_slices = 0
        self._reset()
        return self

    def _reset(self) -> None:
        self._mask = np.zeros(self._volume.shape, bool)
        self._mask_view = np.moveaxis(self._mask, self.axis, 0)
        self._states: dict[int, SliceState] = {}
        self._history: list[tuple[np.ndarray, dict]] = []

    @property
    def mask(self) -> np.ndarray:
        """The current object's bool mask, same shape as the volume (a copy)."""
        self._need_volume()
        return self._mask.copy()

    def encoded_slices(self) -> int:
        """How many slices went through the encoder since `set_volume`."""
        return self._encoded

    def slice_state(self, index: int) -> SliceState | None:
        return self._states.get(int(index))

    @property
    def resampled(self) -> bool:
        return self.model_shape != self.slice_shape

    # ------------------------------------------------------------------------------- prompts
    def _need_volume(self) -> None:
        if self._volume is None:
            raise DataError("volume: no volume set; call set_volume(volume, axis=..., spacing=...) first")

    def check_index(self, index) -> int:
        self._need_volume()
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise DataError(f"slice: expected an integer slice index, got {index!r}")
        if not 0 <= int(index) < self.n_slices:
            raise DataError(f"slice: {int(index)} is outside the volume; axis {self.axis} has {self.n_slices} "
                            f"slices (0..{self.n_slices - 1})")
        return int(index)

    def check_prompt(self, index: int, points, labels, box):
        """Validate user prompts on slice `index` (voxel coordinates) → (points (P, 2), labels (P,), box (4,))."""
        h, w = self.slice_shape
        where = f"slice {index} (axis {self.axis}) is {w}×{h} (width×height)"
        pts = lab = b = None
        if points is not None and len(points):
            pts = np.asarray(points, dtype=float).reshape(-1, 2)
            lab = np.ones(len(pts), int) if labels is None else np.asarray(labels).reshape(-1)
            if len(lab) != len(pts):
                raise DataError(f"labels: {len(lab)} labels for {len(pts)} points; expected one per point")
            if not set(np.unique(lab).tolist()) <= {0, 1}:
                raise DataError(f"labels: expected 1 (positive) or 0 (negative), got {sorted(set(lab.tolist()))}")
            if not np.all(np.isfinite(pts)):
                raise DataError("points: contain NaN or infinite coordinates")
            bad = (pts[:, 0] < 0) | (pts[:, 0] > w - 1) | (pts[:, 1] < 0) | (pts[:, 1] > h - 1)
            if bad.any():
                raise DataError(f"points: {pts[bad][0].tolist()} (x, y) lies outside the slice; {where}")
            lab = lab.astype(int)
        elif labels is not None and len(labels):
            raise DataError("labels: given without points")
        if box is not None:
            b = np.asarray(box, dtype=float).reshape(-1)
            if b.shape != (4,):
                raise DataError(f"box: expected 4 numbers x0 y0 x1 y1, got {b.size}")
            if not np.all(np.isfinite(b)):
                raise DataError("box: contains NaN or infinite coordinates")
            if b[2] < b[0] or b[3] < b[1]:
                raise DataError(f"box: expected x0 <= x1 and y0 <= y1, got {b.tolist()}")
            if b[0] < 0 or b[1] < 0 or b[2] > w - 1 or b[3] > h - 1:
                raise DataError(f"box: {b.tolist()} (x0 y0 x1 y1) reaches outside the slice; {where}")
        return pts, lab, b

    # ------------------------------------------------------------------------------ the model
    def _slice_image(self, index: int) -> np.ndarray:
        raw = np.asarray(self._slices_view[index])
        if self._window is not None:
            img = np.rint(self._window.apply(raw)).astype(np.uint8)
        else:
            img = raw.astype(np.float32) if raw.dtype != np.uint8 else raw
        if self.resampled:
            t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
            t = F.interpolate(t, size=self.model_shape, mode="bilinear", align_corners=False)[0, 0]
            img = (t.round().clamp(0, 255).to(torch.uint8) if img.dtype == np.uint8 else t).numpy()
        return np.ascontiguousarray(img)

    def _embedding(self, index: int, direction: int = 1) -> torch.Tensor:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        todo = [index]
        k = index + direction
        while len(todo) < self.batch_slices and 0 <= k < self.n_slices and k not in self._cache:
            todo.append(k)
            k += direction
        embs = self.predictor.encode_images([self._slice_image(k) for k in todo])
        self._encoded += len(todo)
        for k, e in reversed(list(zip(todo, embs))):  # `index` inserted last: most recently used
            self._cache[k] = e
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_slices:
            self._cache.popitem(last=False)
        return self._cache[index]

    def _to_model_xy(self, xy: np.ndarray) -> np.ndarray:
        """Voxel-centre (x, y) → the resampled grid (pixel centres map onto pixel centres)."""
        if not self.resampled:
            return np.asarray(xy, np.float32)
        (h, w), (mh, mw) = self.slice_shape, self.model_shape
        f = np.array([mw / w, mh / h])
        return np.clip((np.asarray(xy, float) + 0.5) * f - 0.5, 0, [mw - 1, mh - 1]).astype(np.float32)

    def _to_model_box(self, box) -> np.ndarray:
        if not self.resampled:
            return np.asarray(box, np.float32)
        (h, w), (mh, mw) = self.slice_shape, self.model_shape
        x0, y0, x1, y1 = (float(v) for v in box)
        fx, fy = mw / w, mh / h  # inclusive pixel ranges: edges map onto edges
        return np.array([x0 * fx, y0 * fy, (x1 + 1) * fx - 1, (y1 + 1) * fy - 1], np.float32)

    def _predict(self, index: int, direction: int, points=None, labels=None, box=None, mask_input=None,
                 new_points: int = 0):
        """(bool mask on the voxel grid, low-res logits, predicted IoU) of slice `index`. `new_points` > 0: a
        correction whose last `new_points` points are new clicks on this slice's own `mask_input` (accepted as
        the Predictor's `click_merge` says); 0: mask_input, if any, is a neighbour's answer, taken as a prompt."""
        emb = self._embedding(index, direction)
        self.predictor.set_embeddings(emb, self.model_shape)
        pts = None if points is None or not len(points) else self._to_model_xy(np.asarray(points, float).reshape(-1, 2))
        out = self.predictor.predict(points=pts, labels=None if pts is None else labels,
                                     box=None if box is None else self._to_model_box(box), mask_input=mask_input,
                                     new_points=new_points)
        self.decoded_slices += 1
        if self.resampled:
            logits = torch.from_numpy(np.ascontiguousarray(out.logits[:1], np.float32))[None]
            mask = (F.interpolate(logits, size=self.slice_shape, mode="bilinear", align_corners=False)[0, 0] > 0).numpy()
        else:
            mask = out.masks[0]
        return mask, out.low_res_logits[0], float(out.scores[0])

    # ---------------------------------------------------------------------------- propagation
    def _step(self, j: int, prev: int, direction: int):
        """Prompt slice j from slice prev's result; (mask, state) or None where the object ends."""
        prev_mask = self._mask_view[prev]
        box = None
        if "box" in self._parts:
            h, w = self.slice_shape
            m = self.box_margin
            x0, y0, x1, y1 = mask_box(prev_mask).astype(float)
            box = np.array([max(0.0, x0 - m), max(0.0, y0 - m), min(w - 1.0, x1 + m), min(h - 1.0, y1 + m)])
        points = labels = None
        if "points" in self._parts:
            r, c, _ = deepest_pixel(prev_mask)
            points, labels = np.array([[c, r]], float), np.array([1])
        prev_state = self._states.get(prev)
        mask_input = prev_state.low_res if "mask" in self._parts and prev_state is not None else None
        mask, low, score = self._predict(j, direction, points, labels, box, mask_input)
        if mask.sum() < self.min_area or score < self.stop_iou:
            return None
        return mask, SliceState(low, score, None if box is None else tuple(float(v) for v in box))

    def _propagate(self, start: int, direction: int, correcting: bool) -> None:
        prev, j = start, start + direction
        stop = self._halfway(start, direction) if correcting and self.repropagate == "nearest" else None
        while 0 <= j < self.n_slices:
            if correcting and self._states.get(j, SliceState(None, 0.0)).anchor:
                break  # a slice the user prompted keeps its result
            if stop is not None and (j - stop) * direction > 0:
                break  # nearer to another prompted slice than to this one: its answer stays
            if self._mask_view[prev].sum() < self.min_area:  # nothing left to carry on
                if correcting and not (prev == start and self._anchor_beyond(start, direction)):
                    self._clear_run(j, direction, stop)  # (a slice emptied by the user ends the object on the
                break                                    # far side of its anchors only: the prompted body is kept)
            step = self._step(j, prev, direction)
            if step is None:
                if correcting:
                    self._clear_run(j, direction, stop)
                break
            mask, state = step
            if correcting and _dice(mask, self._mask_view[j]) >= self.settle_dice:
                break  # the result stopped changing: everything beyond is kept
            self._mask_view[j] = mask
            self._states[j] = state
            prev, j = j, j + direction

    def _halfway(self, start: int, direction: int) -> int | None:
        """The last slice from `start` in `direction` that is strictly nearer to `start` than to the next
        user-prompted slice that way (None: no prompted slice that way)."""
        ahead = [abs(i - start) for i, st in self._states.items() if st.anchor and (i - start) * direction > 0]
        if not ahead:
            return None
        return start + direction * ((min(ahead) - 1) // 2)

    def _anchor_beyond(self, start: int, direction: int) -> bool:
        return any(st.anchor and (i - start) * direction > 0 for i, st in self._states.items())

    def _clear_run(self, j: int, direction: int, stop: int | None = None) -> None:
        """The object ends before slice j now: clear the old result's run from j on (up to a user-prompted slice,
        and not beyond `stop`)."""
        while 0 <= j < self.n_slices and self._mask_view[j].any() and not self._states.get(j, SliceState(None, 0)).anchor:
            if stop is not None and (j - stop) * direction > 0:
                break
            self._mask_view[j] = False
            self._states.pop(j, None)
            j += direction

    # ----------------------------------------------------------------------------- public API
    def segment(self, slice_index: int, *, box=None, points=None, labels=None, mask=None) -> np.ndarray:
        """A new object: segment slice `slice_index` from the prompt (box and/or points, or a 2D `mask` that is
        taken as that slice's result), propagate both ways; returns the bool mask (volume shape)."""
        k = self.check_index(slice_index)
        if mask is not None:
            if box is not None or points is not None:
                raise DataError("mask: give either a 2D mask or a box/points prompt, not both")
            m = np.asarray(mask)
            if m.shape != self.slice_shape:
                raise DataError(f"mask: shape {m.shape} differs from slice {k}'s {self.slice_shape} (axis {self.axis})")
            self._reset()
            m = m.astype(bool)
            self._mask_view[k] = m
            b = mask_box(m)
            self._states[k] = SliceState(None, 1.0, None if b is None else tuple(int(v) for v in b), anchor=True)
        else:
            pts, lab, b = self.check_prompt(k, points, labels, box)
            if pts is None and b is None:
                raise DataError("prompt: no box, points or mask given; expected at least one")
            self._reset()
            m, low, score = self._predict(k, 1, pts, lab, b)
            self._mask_view[k] = m
            clicks = () if pts is None else tuple((float(x), float(y), int(v)) for (x, y), v in zip(pts, lab))
            self._states[k] = SliceState(low, score, None if b is None else tuple(float(v) for v in b), clicks, True)
        for direction in (1, -1):
            self._propagate(k, direction, correcting=False)
        return self.mask

    def correct(self, slice_index: int, *, points=None, labels=None, box=None) -> np.ndarray:
        """Add clicks (and/or a new box) on slice `slice_index`; re-segment it and re-propagate (see module doc)."""
        k = self.check_index(slice_index)
        pts, lab, b = self.check_prompt(k, points, labels, box)
        if pts is None and b is None:
            raise DataError("correct: no points and no box given; expected at least one")
        self._history.append((self._mask.copy(), dict(self._states)))
        if len(self._history) > self.max_rounds:
            self._history.pop(0)
        old = self._states.get(k)
        clicks = (old.clicks if old else ()) + (() if pts is None else
                                                tuple((float(x), float(y), int(v)) for (x, y), v in zip(pts, lab)))
        use_box = b if b is not None else (None if old is None or old.box is None else np.asarray(old.box, float))
        mask_input = old.low_res if old is not None and old.low_res is not None and self._mask_view[k].any() else None
        all_pts = np.array([c[:2] for c in clicks], float) if clicks else None
        all_lab = np.array([c[2] for c in clicks], int) if clicks else None
        m, low, score = self._predict(k, 1, all_pts, all_lab, use_box, mask_input,
                                      new_points=0 if pts is None or b is not None else len(pts))
        unchanged = _dice(m, self._mask_view[k]) >= self.settle_dice
        self._mask_view[k] = m
        self._states[k] = SliceState(low, score, None if use_box is None else tuple(float(v) for v in use_box),
                                     clicks, True)
        if unchanged and self.repropagate != "always":
            return self.mask  # slice k kept its result: nothing new to carry to its neighbours
        for direction in (1, -1):
            self._propagate(k, direction, correcting=True)
        return self.mask

    def undo(self) -> np.ndarray:
        """Restore the result before the last correction."""
        self._need_volume()
        if not self._history:
            raise DataError("undo: no correction to undo")
        mask, states = self._history.pop()
        self._mask[...] = mask
        self._states = states
        return self.mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def segment_objects(vp: VolumePredictor, prompts: list[dict]) -> np.ndarray:
    """One object per prompt dict ({"slice": k, "box": ..., "points": ..., "labels": ..., "mask": ...,
    optional "id", optional "corrections": [{"slice": j, "points": ..., "labels": ..., "box": ...}, ...]});
    returns an int16 label volume with id i+1 (or the dict's "id") per object. Each object's corrections are
    applied in order after its prompt (`correct`). Where two objects overlap, the earlier one keeps the voxel."""
    if not prompts:
        raise DataError("prompts: empty; expected at least one object")
    allowed = {"slice", "box", "points", "labels", "mask", "id", "name", "corrections"}
    labels_vol = None
    seen = set()
    for i, p in enumerate(prompts):
        if not isinstance(p, dict):
            raise DataError(f"prompts[{i}]: expected a dict with 'slice' and 'box'/'points', got {type(p).__name__}")
        extra = set(p) - allowed
        if extra:
            raise DataError(f"prompts[{i}]: unknown keys {sorted(extra)}; expected some of {sorted(allowed)}")
        if "slice" not in p:
            raise DataError(f"prompts[{i}]: missing 'slice' (the index of the prompted slice)")
        oid = int(p.get("id", i + 1))
        if not 1 <= oid <= np.iinfo(np.int16).max or oid in seen:
            raise DataError(f"prompts[{i}].id: expected a unique id in 1..{np.iinfo(np.int16).max}, got {oid}")
        seen.add(oid)
        try:
            mask = vp.segment(p["slice"], box=p.get("box"), points=p.get("points"), labels=p.get("labels"),
                              mask=p.get("mask"))
        except DataError as exc:
            raise DataError(f"prompts[{i}]: {exc}") from None
        for j, c in enumerate(corrections_of(p, f"prompts[{i}]")):
            try:
                mask = vp.correct(c["slice"], points=c.get("points"), labels=c.get("labels"), box=c.get("box"))
            except DataError as exc:
                raise DataError(f"prompts[{i}].corrections[{j}]: {exc}") from None
        if labels_vol is None:
            labels_vol = np.zeros(mask.shape, np.int16)
        labels_vol[mask & (labels_vol == 0)] = oid
    return labels_vol


def corrections_of(prompt: dict, where: str) -> list[dict]:
    """The "corrections" list of a prompt dict (empty if absent), each entry checked for its keys."""
    items = prompt.get("corrections", [])
    if not isinstance(items, list):
        raise DataError(f"{where}.corrections: expected a list of {{\"slice\": k, \"points\": [[x, y]], "
                        f"\"labels\": [1 or 0]}}, got {type(items).__name__}")
    allowed = {"slice", "points", "labels", "box"}
    for j, c in enumerate(items):
        if not isinstance(c, dict) or "slice" not in c:
            raise DataError(f"{where}.corrections[{j}]: expected {{\"slice\": k, \"points\": [[x, y]], "
                            f"\"labels\": [1 or 0]}} (or a \"box\"), got {c!r}")
        extra = set(c) - allowed
        if extra:
            raise DataError(f"{where}.corrections[{j}]: unknown keys {sorted(extra)}; expected some of {sorted(allowed)}")
    return items
