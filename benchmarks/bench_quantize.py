"""int8 ONNX on CPU: torch eager vs onnxruntime fp32 (default, tuned) vs int8 (dynamic, static), side by side.

    nice -n 10 python -m benchmarks.bench_quantize [--threads 2] [--repeats 5] [--vit-b-size 512]

LiteMedSAM (real weights) on real Colin27 + AAL slices (converted at 256² by the library's converter): the fp32
export (parity-gated against torch), int8 exports made by `quantize_export` in dynamic and static mode
(calibrated on 8 train slices), dynamic int8 encoder + fp32 decoder, and the library default (`quantize_export`
auto mode, built-in Colin27 slices, default 0.98 gate: it keeps the layers with the most output error per
multiply-accumulate fp32, a growing share until the gate passes), each gated against the fp32 export on 8
held-out val/test slices (one tight box per object; figures as the gate computes them; thresholds loosened
here so that every variant is measured). Timings: every variant runs once per round, rounds interleaved, same
thread count for torch and onnxruntime, median over rounds; "full predict" = encoder + one box decode at the
image's size. onnxruntime fp32 settings are measured one at a time on the encoder. vit_b (RANDOM weights, so
only its speed means anything) at --vit-b-size: encoder only, torch vs ORT fp32 vs ORT int8 dynamic.
Budget: about 10 minutes on 2 cores; writes benchmarks/results/quantize.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks._results import Results, weights_source
except ImportError:  # run as `python benchmarks/bench_quantize.py`
    from _results import Results, weights_source

GOAL_SPEEDUP = 2.5
GOAL_DICE = 0.98


def ort_session(path, threads=None, level=None, spinning=True, parallel=False, mem_pattern=True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if level is not None:
        opts.graph_optimization_level = level
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if parallel:
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    opts.enable_mem_pattern = mem_pattern
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per callable; one warm-up each, then `repeats` rounds running every callable once."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def predict_fn(backend, image, box):
    from medico_peft.runtime.predictor import decode_at_original_size
    from medico_peft.runtime.preprocess import build_prompt_arrays

    h, w = image.shape[:2]
    coords, labels = build_prompt_arrays((h, w), box=box)

    def run():
        with torch.no_grad():
            emb = backend.encode(image)
            return decode_at_original_size(backend, emb, coords, labels, None, 0.0, (h, w), False)
    return run


def bench_litemedsam(threads: int, repeats: int, work: Path) -> dict:
    import onnxruntime as ort

    from medico_peft.data.real_data import build_colin27_aal_shards
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.export.quantize import QuantGate, compare_backends, load_slices, quantize_export
    from medico_peft.models import load_model
    from medico_peft.runtime.ort_backend import OrtBackend
    from medico_peft.runtime.torch_backend import TorchBackend

    res = {"weights": weights_source("litemedsam")}
    build_colin27_aal_shards(work / "shards", size=256)
    model = load_model("litemedsam")
    t0 = time.perf_counter()
    export_onnx(model, work / "fp32", parity_random=2, parity_real=1, threads=threads)
    res["export_s"] = time.perf_counter() - t0
    loose = QuantGate(min_dice=0.0, max_logit_mean=1e9, max_logit_max=1e9)
    metas = {}
    for mode in ("dynamic", "static"):
        t0 = time.perf_counter()
        metas[mode] = quantize_export(work / "fp32", work / mode, mode=mode, calibration=work / "shards",
                                      gate=loose, threads=threads)
        res[f"quantize_s {mode}"] = time.perf_counter() - t0
    # the library default: auto mode, built-in Colin27 slices, the default gate (its ladder keeps layers fp32 until
    # the gate passes); if even the last step fails, that failure is recorded and the last step measured loosely
    from medico_peft.errors import ExportError
    from medico_peft.export.quantize import AUTO_FP32_FRACTIONS

    t0 = time.perf_counter()
    try:
        metas["auto"] = quantize_export(work / "fp32", work / "auto", mode="auto", threads=threads)
        res["auto_failure"] = None
    except ExportError as exc:
        res["auto_failure"] = str(exc)
        metas["auto"] = quantize_export(work / "fp32", work / "auto", mode="auto", threads=threads, gate=loose,
                                        fp32_fractions=(AUTO_FP32_FRACTIONS[-1],))
    res["quantize_s auto"] = time.perf_counter() - t0
    # dynamic int8 encoder + the fp32 decoder (the decoder is a small share of a predict)
    mixed = work / "dynamic_enc"
    shutil.copytree(work / "dynamic", mixed)
    shutil.copy2(work / "fp32" / "decoder.onnx", mixed / "decoder.onnx")
    _, gate_slices, held_out = load_slices(work / "shards", 256, 8, 8)
    fp32 = OrtBackend(work / "fp32", threads=threads)
    gates = {mode: metas[mode]["quantization"]["gate"] for mode in metas}
    gates["dynamic encoder + fp32 decoder"] = compare_backends(fp32, OrtBackend(mixed, threads=threads), gate_slices)
    res["gates"], res["held_out"] = gates, held_out
    res["graphs"] = {mode: metas[mode]["quantization"]["graphs"] for mode in metas}
    res["auto_attempts"] = metas["auto"]["quantization"]["attempts"]
    res["auto_same_slices"] = ([r["slice"] for r in gates["auto"]["rows"]] ==
                               [r["slice"] for r in gates["dynamic"]["rows"]])
    res["sizes_mb"] = {name: sum((work / folder / f"{p}.onnx").stat().st_size for p in ("encoder", "decoder")) / 1e6
                       for name, folder in (("fp32", "fp32"), ("dynamic", "dynamic"), ("static", "static"),
                                            ("auto", "auto"))}

    image = gate_slices[0].image
    from medico_peft.data.prompts import mask_box

    box = mask_box(gate_slices[0].masks[0]).astype(np.float32)
    res["image"] = f"{gate_slices[0].where} ({image.shape[0]}×{image.shape[1]})"
    default = OrtBackend(work / "fp32", threads=threads)
    default.sessions = {p: ort_session(work / "fp32" / f"{p}.onnx") for p in ("encoder", "decoder")}
    backends = {"torch eager": TorchBackend(model), "ORT fp32 default": default, "ORT fp32 tuned": fp32,
                "ORT int8 dynamic": OrtBackend(work / "dynamic", threads=threads),
                "ORT int8 static": OrtBackend(work / "static", threads=threads),
                "ORT int8 dynamic encoder + fp32 decoder": OrtBackend(mixed, threads=threads),
                "ORT int8 auto (library default)": OrtBackend(work / "auto", threads=threads)}
    feed = fp32.encoder_feed(image)
    encoders = {name: (lambda b=b: b.encode(image)) for name, b in backends.items()}
    res["encoder"] = interleaved(encoders, repeats)
    res["predict"] = interleaved({name: predict_fn(b, image, box) for name, b in backends.items()}, repeats)
    # onnxruntime fp32 settings, one at a time (encoder graph, same feed)
    enc = work / "fp32" / "encoder.onnx"
    L = ort.GraphOptimizationLevel
    knobs = {"tuned: ORT_ENABLE_ALL, intra-op threads = cores, sequential, memory pattern on":
             ort_session(enc, threads, L.ORT_ENABLE_ALL),
             "default SessionOptions (threads chosen by onnxruntime)": ort_session(enc),
             "optimisation ORT_DISABLE_ALL": ort_session(enc, threads, L.ORT_DISABLE_ALL),
             "optimisation ORT_ENABLE_BASIC": ort_session(enc, threads, L.ORT_ENABLE_BASIC),
             "optimisation ORT_ENABLE_EXTENDED": ort_session(enc, threads, L.ORT_ENABLE_EXTENDED),
             "thread spinning off": ort_session(enc, threads, L.ORT_ENABLE_ALL, spinning=False),
             "parallel execution mode": ort_session(enc, threads, L.ORT_ENABLE_ALL, parallel=True),
             "memory pattern off": ort_session(enc, threads, L.ORT_ENABLE_ALL, mem_pattern=False),
             "1 intra-op thread": ort_session(enc, 1, L.ORT_ENABLE_ALL)}
    torch_enc = backends["torch eager"]
    fns = {"torch eager (same threads)": lambda: torch_enc.encode(image)}
    fns.update({k: (lambda s=s: s.run(None, {"image": feed})) for k, s in knobs.items()})
    res["knobs"] = interleaved(fns, max(3, repeats - 2))
    return res


def bench_vit_b(size: int, threads: int, repeats: int, work: Path) -> dict:
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.export.quantize import quantize_graph
    from medico_peft.models import load_model
    from medico_peft.runtime.ort_backend import OrtBackend
    from medico_peft.runtime.torch_backend import TorchBackend

    model = load_model("vit_b", img_size=size)
    export_onnx(model, work / "vit_b", parity_random=1, parity_real=0, threads=threads)
    quantize_graph(work / "vit_b" / "encoder.onnx", work / "vit_b_int8" / "encoder.onnx", "dynamic")
    fp32 = OrtBackend(work / "vit_b", threads=threads)
    image = np.random.default_rng(0).integers(0, 255, (size * 3 // 4, size, 3), dtype=np.uint8)
    feed = {"image": fp32.encoder_feed(image)}
    from medico_peft.runtime.ort_backend import make_session

    int8 = make_session(work / "vit_b_int8" / "encoder.onnx", threads)
    tb = TorchBackend(model)
    times = interleaved({"torch eager": lambda: tb.encode(image),
                         "ORT fp32 tuned": lambda: fp32.sessions["encoder"].run(None, feed),
                         "ORT int8 dynamic": lambda: int8.run(None, feed)}, repeats)
    emb32 = fp32.sessions["encoder"].run(None, feed)[0]
    emb8 = int8.run(None, feed)[0]
    rel = float(np.abs(emb8 - emb32).mean() / np.abs(emb32).mean())
    return {"size": size, "weights": weights_source("vit_b"), "encoder": times, "rel_err": rel}


def render(lm: dict, vb: dict | None, threads: int, repeats: int) -> str:
    enc, pred = lm["encoder"], lm["predict"]
    t_enc, t_pred = enc["torch eager"], pred["torch eager"]
    lines = [f"CPU, {threads} threads for torch and onnxruntime alike, median of {repeats} interleaved rounds. "
             "Ratio = torch eager time / variant time, measured in the same run (higher is better).", "",
             f"- LiteMedSAM: {lm['weights']}; timed on the Colin27 slice {lm['image']}.",
             f"- Accuracy: int8 vs the fp32 export on {lm['gates']['dynamic']['slices']} "
             f"{'held-out ' if lm['held_out'] else ''}Colin27 + AAL slices (val/test slabs; calibration on 8 train "
             f"slices), one tight box per object ({lm['gates']['dynamic']['objects']} boxes), single-mask output. "
             "The library default row converts the same atlas itself (no --calibration) and gates on "
             + ("the same slices." if lm["auto_same_slices"] else "different slices (see its sidecar)."), "",
             "## LiteMedSAM (256²)", "",
             "| variant | encoder (s) | encoder ratio | full predict (s) | full predict ratio | mean mask Dice to fp32 | "
             "min slice Dice | mean abs logit error | max abs logit error | Dice to labels |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gate_of = {"ORT int8 dynamic": "dynamic", "ORT int8 static": "static",
               "ORT int8 dynamic encoder + fp32 decoder": "dynamic encoder + fp32 decoder",
               "ORT int8 auto (library default)": "auto"}
    fp32_labels = lm["gates"]["dynamic"]["mean_dice_to_labels_fp32"]
    for name in enc:
        g = lm["gates"].get(gate_of.get(name, ""), None)
        acc = (f"{g['mean_dice_to_fp32']:.4f} | {g['min_slice_dice_to_fp32']:.4f} | {g['logit_mean_abs']:.3f} | "
               f"{g['logit_max_abs']:.2f} | {g['mean_dice_to_labels_int8']:.4f}") if g else \
            ("1 (reference) | 1 | 0 | 0 | " + f"{fp32_labels:.4f}" if name.startswith("ORT fp32") else "— | — | — | — | —")
        lines.append(f"| {name} | {enc[name]:.4f} | {t_enc / enc[name]:.2f}× | {pred[name]:.4f} | "
                     f"{t_pred / pred[name]:.2f}× | {acc} |")
    lines += ["", "Modes per graph (quantize_export; op types MatMul/Gemm, weights int8 per output channel; "
              "LayerNorm, Softmax, GELU and convolutions stay fp32):", ""]
    def kept(g):
        ranked = len(g.get("sensitivity") or {}) or None
        n = len(g.get("keep_fp32") or [])
        return f" ({n} of {ranked} MatMul/Gemm kept fp32)" if ranked else ""

    for mode, graphs in lm["graphs"].items():
        lines.append(f"- {mode}: " + ", ".join(f"{p} {g['mode']}{kept(g)}" for p, g in graphs.items()))
    lines += ["", "Library default (auto) ladder, share of each int8 graph's layers kept fp32 (most output error "
              "per multiply-accumulate first) → gate figures: "
              + "; ".join(f"{a['keep_fp32_fraction']:.0%}: Dice {a['mean_dice_to_fp32']:.4f} (min slice "
                          f"{a['min_slice_dice_to_fp32']:.4f})" for a in lm["auto_attempts"]) + "."
              + (f" The default gate refused every step ({lm['auto_failure']}); the row shows the last step "
                 "measured with loose thresholds." if lm["auto_failure"] else "")]
    lines += ["", "Sizes (encoder + decoder .onnx): " + ", ".join(f"{k} {v:.1f} MB" for k, v in lm["sizes_mb"].items())
              + f". Export {lm['export_s']:.0f} s; quantize_export (incl. its gate) dynamic "
              f"{lm['quantize_s dynamic']:.0f} s, static {lm['quantize_s static']:.0f} s, auto "
              f"{lm['quantize_s auto']:.0f} s.", "",
              "## onnxruntime fp32 settings (LiteMedSAM encoder, one change at a time)", "",
              "| setting | encoder (s) | vs tuned | torch eager / this |", "|---|---|---|---|"]
    knobs = lm["knobs"]
    tuned = next(v for k, v in knobs.items() if k.startswith("tuned"))
    t_k = knobs["torch eager (same threads)"]
    for k, v in knobs.items():
        lines.append(f"| {k} | {v:.4f} | {v / tuned:.2f}× the time | {t_k / v:.2f}× |")
    if vb:
        e = vb["encoder"]
        lines += ["", f"## vit_b encoder ({vb['size']}², {vb['weights']})", "",
                  "| variant | encoder (s) | ratio vs torch eager |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {e['torch eager'] / v:.2f}× |" for k, v in e.items()]
        lines += ["", f"int8 dynamic vs fp32 embeddings: mean abs error / mean abs value = {vb['rel_err']:.4f} "
                  "(random weights: no mask accuracy is claimed)."]
    best_enc = max((t_enc / enc[k], k) for k in enc if "int8" in k)
    best_pred = max((t_pred / pred[k], k) for k in pred if "int8" in k)
    ok_dice = {k: lm["gates"][gate_of[k]]["mean_dice_to_fp32"] for k in gate_of}
    passing = [k for k, d in ok_dice.items() if d >= GOAL_DICE]
    both = [k for k in passing if t_enc / enc[k] >= GOAL_SPEEDUP]
    lines += ["", "## Goals", "",
              f"- int8 encoder ≥ {GOAL_SPEEDUP:g}× torch eager: {'met' if best_enc[0] >= GOAL_SPEEDUP else 'not met'} "
              f"(best {best_enc[0]:.2f}×, {best_enc[1]}; ORT fp32 tuned {t_enc / enc['ORT fp32 tuned']:.2f}×).",
              f"- int8 full predict ≥ {GOAL_SPEEDUP:g}× torch eager: "
              f"{'met' if best_pred[0] >= GOAL_SPEEDUP else 'not met'} (best {best_pred[0]:.2f}×, {best_pred[1]}; "
              f"ORT fp32 tuned {t_pred / pred['ORT fp32 tuned']:.2f}×).",
              f"- one int8 variant with encoder ≥ {GOAL_SPEEDUP:g}× torch eager and mean mask Dice to fp32 ≥ "
              f"{GOAL_DICE:g}: "
              + (("met by " + ", ".join(f"{k} (encoder {t_enc / enc[k]:.2f}×, Dice {ok_dice[k]:.4f})" for k in both))
                 if both else "not met by any int8 variant") + ".",
              f"- mean mask Dice to fp32 ≥ {GOAL_DICE:g} on Colin27 slices: "
              + (f"met by {', '.join(passing)}" if passing else "not met by any int8 variant")
              + " (" + ", ".join(f"{k.replace('ORT int8 ', '')} {d:.4f}" for k, d in ok_dice.items()) + ").",
              f"- Dice to the AAL labels: fp32 {fp32_labels:.4f}; int8 "
              + ", ".join(f"{k.replace('ORT int8 ', '')} {lm['gates'][gate_of[k]]['mean_dice_to_labels_int8']:.4f}"
                          for k in gate_of) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vit-b-size", type=int, default=512, help="0 skips vit_b")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize.md"))
    args = ap.parse_args(argv)
    record = Results("int8 quantization benchmark: torch eager vs onnxruntime fp32/int8 on CPU",
                     argv=None if argv is None else [__file__, *argv])
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lm = bench_litemedsam(args.threads, args.repeats, Path(tmp))
        vb = bench_vit_b(args.vit_b_size, args.threads, max(3, args.repeats - 2), Path(tmp)) if args.vit_b_size else None
    text = render(lm, vb, args.threads, args.repeats)
    print(text)
    record.write(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
