"""Benchmarks: rmlx (MLX) against HF (torch) on the same CPU, in the same process, at real shapes.

    python benchmarks/bench.py [--out DIR] [--repeat N] [--only gemm,kernels,codec,vision,masks,harness,layers]
    python benchmarks/bench.py --only stream --checkpoint DIR [--tokens 280,1120] [--threads 2]
                               [--precisions float32,bfloat16,mxfp8]

Writes DIR/bench.json and DIR/bench.md (default reports/bench-<time>/), atomically. Every number is a
median of N timed repeats after one warm-up, with the thread counts and versions recorded. Where rmlx is
set against torch (gemm fp32, vision, layers) the two are timed in alternating rounds (:func:`paired`),
and the range of the per-round ratios is reported next to the ratio of the medians. Sections:

- gemm: fp32 280x6912 @ 6912x3840 (the vision patch_dense at 280 soft tokens) in MLX, torch and NumPy;
  bf16 in MLX and torch; MXFP8 in MLX (``mx.quantized_matmul``, mode "mxfp8").
- kernels: the candidate's bf16 and mxfp8 products (``rmlx.nn.kernels``) at the same shape, against
  torch's bf16 GEMM and torch's fp32 GEMM on the dequantized weights, and MLX's own kernels.
- codec: MXFP8 quantization of the 12B decoder's largest weight (15360 x 3840, fp32 and bf16): MLX's
  ``mx.quantize`` against the port's C loops (``rmlx.nn.mxcodec``), and the reference's torch round trip
  (``reference/mxfp8_torch.py``), in ns per value.
- vision: the vision embedder at the real shape (6912 -> 3840 -> 3840) at 280 and 1120 soft tokens.
- masks: both mask policies at 8k and 32k tokens (an 8k-token image block in the middle).
- harness: the embedded default (tiny fixtures), the time of the two forwards against everything else
  the harness does (capture, compare, oracle, report).
- layers: one sliding and one full decoder layer of the 12B shapes at 512 and 2048 tokens, fp32.
- stream (only with --only stream --checkpoint DIR): ``rmlx-parity run --stream`` at real size, one
  image at 280 and 1120 soft tokens, each in its own process: wall time, forwards vs harness, peak RSS.

Not a test: timings are reported, never asserted (tests/ never time anything).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rmlx  # noqa: E402,F401  (first: the fast BLAS is loaded before mlx)


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired(fns: dict, repeat: int) -> dict[str, list[float]]:
    """Times of each of ``fns`` over ``repeat`` rounds, interleaved: every round runs each in turn (the
    order reversed every other round), so drift of the machine (another process, the page cache, the
    clock) falls on all of them alike rather than on whichever ran last. Each turn is one untimed call,
    then one timed: the untimed call absorbs the switch from another library (NumPy's OpenBLAS threads
    spin on for a while after a call; measured: MLX's GEMM 16 % slower right after NumPy's)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeat):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fns[name]()
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def ratio_row(case: str, times: dict[str, list[float]]) -> dict:
    """``mlx s`` / ``torch s`` medians, their ratio, and the range of the per-round ratios."""
    per_round = [m / t for m, t in zip(times["mlx"], times["torch"], strict=True)]
    t_mlx, t_torch = statistics.median(times["mlx"]), statistics.median(times["torch"])
    return {"case": case, "mlx s": t_mlx, "torch s": t_torch, "mlx / torch": t_mlx / t_torch,
            "per-round ratio min": min(per_round), "per-round ratio max": max(per_round)}


def bench_gemm(repeat: int) -> list[dict]:
    import mlx.core as mx
    import torch

    m, k, n = 280, 6912, 3840
    flop = 2 * m * k * n
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32) / 83
    rows = []

    def add(what, seconds):
        rows.append({"case": what, "seconds": seconds, "gflops": flop / seconds / 1e9})

    ma, mb = mx.array(a), mx.array(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    fp32 = paired({"mlx": lambda: mx.eval(ma @ mb), "torch": lambda: ta @ tb, "numpy": lambda: a @ b}, repeat)
    for name, times in fp32.items():
        add(f"{name} fp32", statistics.median(times))
    ma16, mb16 = ma.astype(mx.bfloat16), mb.astype(mx.bfloat16)
    add("mlx bf16", timed(lambda: mx.eval(ma16 @ mb16), repeat))
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    add("torch bf16", timed(lambda: ta16 @ tb16, repeat))
    wq, scales = mx.quantize(mb.T, group_size=32, bits=8, mode="mxfp8")[:2]
    add("mlx mxfp8 (fp32 activations)", timed(lambda: mx.eval(mx.quantized_matmul(
        ma, wq, scales, transpose=True, group_size=32, bits=8, mode="mxfp8")), repeat))
    add("mlx mxfp8 (bf16 activations)", timed(lambda: mx.eval(mx.quantized_matmul(
        ma16, wq, scales, transpose=True, group_size=32, bits=8, mode="mxfp8")), repeat))
    torch_fp32 = rows[1]["seconds"]
    for r in rows:
        r["vs torch fp32"] = r["seconds"] / torch_fp32
    return rows + bench_sgemm_output(repeat)


def bench_sgemm_output(repeat: int) -> list[dict]:
    """fp32 ``x @ w.T`` at the 12B decoder's shapes (512 tokens): MLX through rmlx's aligned-output
    ``cblas_sgemm`` (rmlx/blas.py), MLX writing where its allocator put the output (``align_from(inf)``,
    as ``RMLX_NATIVE_SGEMM=1``), and torch's ``F.linear``; the three in alternating rounds."""
    import math

    import mlx.core as mx
    import torch

    from rmlx import blas

    def unaligned(fn):
        def call():
            blas.align_from(math.inf)
            try:
                fn()
            finally:
                blas.align_from(blas.ALIGN_FROM)
        return call

    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in ((512, 3840, 15360), (512, 15360, 3840), (512, 3840, 4096)):
        a, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32) / k**0.5
        ma, mw, ta, tw = mx.array(a), mx.array(w), torch.from_numpy(a), torch.from_numpy(w)
        mlx_fn = lambda ma=ma, mw=mw: mx.eval(ma @ mw.T)  # noqa: E731
        times = paired({"mlx": mlx_fn, "mlx, output where MLX allocates it": unaligned(mlx_fn),
                        "torch": lambda ta=ta, tw=tw: torch.nn.functional.linear(ta, tw)}, repeat)
        for name, t in times.items():
            seconds = statistics.median(t)
            rows.append({"case": f"{name} fp32 {m}x{k} @ ({n}x{k}).T", "seconds": seconds,
                         "gflops": 2 * m * k * n / seconds / 1e9,
                         "vs torch fp32": seconds / statistics.median(times["torch"])})
    return rows


def bench_kernels(repeat: int) -> list[dict]:
    """The candidate's products (``rmlx.nn.kernels``) at 280x6912 @ 6912x3840, each against what issue
    #20 sets it against, timed in alternating rounds: bf16 against torch's bf16 GEMM; mxfp8 against
    torch's fp32 GEMM on the dequantized weights. MLX's own kernel (``RMLX_NATIVE_KERNELS=1``'s path)
    is timed once for the record (seconds each)."""
    import mlx.core as mx
    import torch

    from rmlx.nn import kernels

    m, k, n = 280, 6912, 3840
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32) / 83
    ma, mw = mx.array(a), mx.array(w)
    ma16, mw16 = ma.astype(mx.bfloat16), mw.astype(mx.bfloat16)
    lin16 = kernels.Linear(k, n, bias=False)
    lin16.weight = mw16
    lin8 = kernels.Linear(k, n, bias=False)
    lin8.weight = mw
    q = lin8.to_quantized(group_size=32, bits=8, mode="mxfp8")
    mx.eval(ma, ma16, mw16, q.parameters())
    deq = np.array(mx.dequantize(q.weight, q.scales, group_size=32, bits=8, mode="mxfp8", dtype=mx.float32))
    ta, ta16, tw16, tdeq = torch.from_numpy(a), torch.from_numpy(a).bfloat16(), torch.from_numpy(w).bfloat16(), \
        torch.from_numpy(deq)
    rows = []
    for case, ours, theirs in (
            ("bf16 GEMM: rmlx.nn.kernels / torch bf16", lambda: mx.eval(lin16(ma16)), lambda: ta16 @ tw16.T),
            ("mxfp8 GEMM, fp32 activations: rmlx.nn.kernels / torch fp32 on dequantized weights",
             lambda: mx.eval(q(ma)), lambda: ta @ tdeq.T)):
        row = ratio_row(case, paired({"mlx": ours, "torch": theirs}, repeat))
        rows.append(row)
    rows.append({"case": "mxfp8 GEMM, bf16 activations: rmlx.nn.kernels",
                 "mlx s": timed(lambda: mx.eval(q(ma16)), repeat)})
    rows.append({"case": "MLX's own bf16 GEMM (x @ w.T)", "mlx s": timed(lambda: mx.eval(ma16 @ mw16.T), 1)})
    rows.append({"case": "MLX's own mxfp8 quantized_matmul, fp32 activations",
                 "mlx s": timed(lambda: mx.eval(q._native(ma)), 1)})
    return rows


def bench_codec(repeat: int) -> list[dict]:
    """MXFP8 quantization of a 15360 x 3840 weight (the 12B MLP's largest), timed in alternating rounds:
    MLX's ``mx.quantize`` and the port's C loops (the same bytes, asserted), and the reference's torch
    round trip (quantize + dequantize in float32) of the same weight."""
    import mlx.core as mx
    import torch

    from reference.mxfp8_torch import roundtrip
    from rmlx.nn import mxcodec

    rng = np.random.default_rng(0)
    w = rng.standard_normal((15360, 3840), dtype=np.float32) * 0.02
    rows = []
    for name, dtype, tdtype in (("fp32", mx.float32, torch.float32), ("bf16", mx.bfloat16, torch.bfloat16)):
        mw = mx.array(w).astype(dtype)
        tw = torch.from_numpy(w).to(tdtype)
        mx.eval(mw)
        fast, mine = mxcodec.quantize(mw), mx.quantize(mw, group_size=32, bits=8, mode="mxfp8")
        if fast is None or not all(bool(mx.array_equal(a, b)) for a, b in zip(fast, mine, strict=True)):
            raise SystemExit(f"bench codec: the C loops are not built or differ from mx.quantize ({name})")
        times = paired({"mlx": lambda mw=mw: mx.eval(mx.quantize(mw, group_size=32, bits=8, mode="mxfp8")),
                        "rmlx": lambda mw=mw: mx.eval(mxcodec.quantize(mw)),
                        "torch": lambda tw=tw: roundtrip(tw)}, repeat)
        for who, what in (("mlx", "MLX mx.quantize"), ("rmlx", "rmlx.nn.mxcodec.quantize (C loops)"),
                          ("torch", "reference round trip (torch)")):
            t = statistics.median(times[who])
            rows.append({"case": f"{what}, {name}", "seconds": t, "ns per value": t / w.size * 1e9})
    return rows


def bench_vision(repeat: int) -> list[dict]:
    import mlx.core as mx
    import torch
    from transformers import Gemma4UnifiedConfig
    from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedVisionEmbedder

    from rmlx.models.gemma4_unified.config import VisionConfig
    from rmlx.models.gemma4_unified.image import preprocess_batch
    from rmlx.models.gemma4_unified.vision import VisionEmbedder

    cfg = Gemma4UnifiedConfig(text_config=dict(hidden_size=3840), vision_config=dict(
        mm_embed_dim=3840, output_proj_dims=3840, mm_posemb_size=1120))
    torch.manual_seed(0)
    hf = Gemma4UnifiedVisionEmbedder(cfg.vision_config, cfg.text_config).eval()
    ours = VisionEmbedder(VisionConfig(16, 3, 3840, 1120, 3840), 3840)
    from mlx.utils import tree_unflatten

    from rmlx.models.gemma4_unified.model import module_path
    state = {module_path("model.embed_vision." + k)[len("vision_embedder."):]: mx.array(v.detach().numpy())
             for k, v in hf.state_dict().items()}
    ours.update(tree_unflatten(list(state.items())))
    rows = []
    image = (np.random.default_rng(1).integers(0, 256, (768, 1024, 3))).astype(np.uint8)
    for tokens in (280, 1120):
        pv, pos = preprocess_batch([image], tokens)
        tpv, tpos = torch.from_numpy(pv), torch.from_numpy(pos)
        mpv, mpos = mx.array(pv), mx.array(pos)
        with torch.no_grad():
            times = paired({"mlx": lambda mpv=mpv, mpos=mpos: mx.eval(ours(mpv, mpos)),
                            "torch": lambda tpv=tpv, tpos=tpos: hf(pixel_values=tpv, image_position_ids=tpos)},
                           repeat)
        rows.append(ratio_row(f"vision embedder, {tokens} soft tokens", times))
    return rows


def bench_masks(repeat: int) -> list[dict]:
    import mlx.core as mx
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    from rmlx.nn.base import attention_masks

    cfg = Gemma4UnifiedConfig(text_config=dict(hidden_size=8, num_hidden_layers=2, sliding_window=1024,
                                               layer_types=["sliding_attention", "full_attention"]))
    cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"  # materialised masks, as HFRunner
    build = Gemma4UnifiedForConditionalGeneration.create_masks_for_generate
    rows = []
    for length in (8192, 32768):
        types = np.zeros((1, length), np.int64)
        types[0, length // 4: length // 4 + 8192] = 1  # an 8k-token image block
        mtypes = mx.array(types)
        for policy in ("official", "hf-forward"):
            t_mlx = timed(lambda p=policy, t=mtypes: mx.eval(*attention_masks(t, 1024, p).values()), repeat)
            rows.append({"case": f"rmlx masks, {policy}, {length} tokens", "seconds": t_mlx})
        embeds = torch.zeros((1, length, 8))
        ttypes = torch.from_numpy(types)
        t_hf = timed(lambda e=embeds, t=ttypes, n=length: build(cfg, e, None, None, torch.arange(n)[None], t), repeat)
        rows.append({"case": f"HF create_masks_for_generate (official, eager: float masks), {length} tokens",
                     "seconds": t_hf})
    return rows


def bench_harness(repeat: int) -> list[dict]:
    """The embedded default once: the two forwards' share of the wall time, the rest is the harness."""
    from parity import report
    from parity.adapters import gemma4_unified as g
    from parity.cli import default_images, default_models, fixtures_dir
    from parity.runner import Settings, default_scenarios, record, run_cases

    spent = {"reference": 0.0, "candidate": 0.0}
    originals = {name: getattr(g.Gemma4UnifiedAdapter, name) for name in spent}

    def timing(name):
        def call(self, *a, **kw):
            t = time.perf_counter()
            try:
                return originals[name](self, *a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return call

    for name in spent:
        setattr(g.Gemma4UnifiedAdapter, name, timing(name))
    try:
        t0 = time.perf_counter()
        results = run_cases(default_models(), default_scenarios(default_images(), fixtures_dir() / "images"),
                            Settings())
        rec = record(results, Settings(), time.perf_counter() - t0, "bench")
        t_report = time.perf_counter()
        report.to_markdown(rec)
        from parity.report import html, junit
        html.to_html(rec)
        junit.to_junit(rec)
        report_s = time.perf_counter() - t_report
        total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(g.Gemma4UnifiedAdapter, name, fn)
    forwards = spent["reference"] + spent["candidate"]
    return [{"case": f"embedded default ({len(results)} cases)", "total s": total, "reference forward s":
             spent["reference"], "candidate forward s": spent["candidate"], "report render s": report_s,
             "harness overhead / forwards": (total - forwards) / forwards}]


def bench_layers(repeat: int) -> list[dict]:
    """One sliding (layer 0) and one full (layer 5) decoder layer of the 12B shapes, fp32, at 512 and
    2048 tokens: HF's ``Gemma4UnifiedTextDecoderLayer`` (eager attention, HF's own masks and RoPE) against
    rmlx's ``DecoderLayer`` with the same weights and the same boolean masks."""
    import mlx.core as mx
    import torch
    from mlx.utils import tree_unflatten
    from transformers import Gemma4UnifiedForConditionalGeneration
    from transformers.models.gemma4_unified.modeling_gemma4_unified import (
        Gemma4UnifiedTextDecoderLayer,
        Gemma4UnifiedTextRotaryEmbedding,
    )

    from reference.synthetic import config
    from reference.torch_ops import bool_mask
    from rmlx.nn.config import TextConfig
    from rmlx.nn.text import DecoderLayer

    cfg = config("12b", layers=6)
    cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"
    text = cfg.text_config
    ours_cfg = TextConfig.from_dict(text.to_dict())
    rotary = Gemma4UnifiedTextRotaryEmbedding(config=text)
    rows = []
    for i in (0, 5):
        torch.manual_seed(i)
        hf = Gemma4UnifiedTextDecoderLayer(text, i).eval()
        with torch.no_grad():
            for p in hf.parameters():  # the synthetic checkpoint's scales (reference/synthetic.py)
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.ndim > 1 else 1 + 0.1 * torch.randn_like(p))
        ours = DecoderLayer(ours_cfg, i)
        ours.update(tree_unflatten([(k, mx.array(v.detach().numpy())) for k, v in hf.state_dict().items()]))
        mx.eval(ours.parameters())
        kind = text.layer_types[i]
        for length in (512, 2048):
            x = torch.randn(1, length, text.hidden_size)
            pos = torch.arange(length)[None]
            masks = Gemma4UnifiedForConditionalGeneration.create_masks_for_generate(
                cfg, x, None, None, pos, torch.zeros((1, length), dtype=torch.long))
            pe = rotary(x, pos, kind)
            mx_x, mx_mask = mx.array(x.numpy()), mx.array(bool_mask(masks[kind], length).numpy())
            with torch.no_grad():
                times = paired({
                    "mlx": lambda a=mx_x, m=mx_mask, ours=ours: mx.eval(ours(a, m, None, 0, None)[0]),
                    "torch": lambda x=x, pe=pe, m=masks[kind], pos=pos, hf=hf: hf(
                        x, shared_kv_states={}, position_embeddings=pe, attention_mask=m, position_ids=pos)}, repeat)
            rows.append(ratio_row(f"decoder layer {i} ({kind}), {length} tokens, fp32", times))
        del hf, ours
    return rows


PRECISIONS = {"float32": [], "bfloat16": ["--dtype", "bfloat16"], "mxfp8": ["--quantize", "mxfp8"]}


def bench_stream(repeat: int, checkpoint: Path | None = None, tokens: tuple[int, ...] = (280, 1120),
                 threads: int = 2, precisions: tuple[str, ...] = ("float32",)) -> list[dict]:
    """``rmlx-parity run --stream`` on a real-size checkpoint (``--checkpoint``; e.g. one written by
    ``rmlx-parity fixtures --shape 12b``), one image at each soft-token budget, each in a fresh process
    (its peak RSS is that process's). Reports the record's own split: the two forwards (reading the
    weights included), the harness (capture, compare, oracle, report), and the peak RSS. Runs once:
    ``repeat`` does not apply (minutes per run). ``precisions``: float32, bfloat16 (``--dtype``), mxfp8
    (``--quantize``); each row's wall time is also given over the float32 row's at the same budget."""
    import resource
    import subprocess
    import tempfile

    if checkpoint is None:
        raise SystemExit("bench: the stream section needs --checkpoint DIR")
    rows = []
    image = ROOT / "fixtures" / "images" / "exact-672x960.png"
    fp32_wall: dict[int, float] = {}
    for n, precision in [(n, p) for n in tokens for p in precisions]:
        with tempfile.TemporaryDirectory() as tmp:
            rec_path = Path(tmp) / "record.json"
            cmd = [sys.executable, "-m", "parity.cli", "run", "--stream", "--threads", str(threads), "--model",
                   str(checkpoint), "--image", str(image), "--case", "image/*", "--max-soft-tokens", str(n),
                   "--decode-steps", "0", "--report-dir", str(Path(tmp) / "rep"), "--json", str(rec_path),
                   *PRECISIONS[precision]]
            t = time.perf_counter()
            code = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode
            wall = time.perf_counter() - t
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            rec = json.loads(rec_path.read_text())
        case = rec["cases"][0]
        st = case["stream"]
        forwards = st["reference_forward_s"] + st["candidate_forward_s"]
        if precision == "float32":
            fp32_wall[n] = wall
        rows.append({"case": f"{checkpoint.name}, {precision}, {case['n_soft_tokens']} soft tokens, "
                             f"{len(case['stages'])} stages",
                     "exit": code, "wall s": wall,
                     "wall / float32 wall": wall / fp32_wall[n] if n in fp32_wall else None,
                     "kernels": ", ".join(sorted((rec.get("kernels") or {}).get("used", {}))) or "MLX's own",
                     "kernel checks passed": (rec.get("kernels") or {}).get("passed"),
                     "record s": rec["wall_time_s"], "forwards s": forwards,
                     "HF s": st["reference_forward_s"], "rmlx s": st["candidate_forward_s"],
                     "HF read s": st["reference_load_s"], "rmlx read s": st["candidate_load_s"],
                     "capture s": st["capture_s"], "compare s": st["compare_s"],
                     "harness / forwards": (rec["wall_time_s"] - forwards) / forwards,
                     "peak RSS GiB (max so far)": peak,
                     "first divergence": (case["first_divergence"] or {}).get("stage"),
                     "top1": case["logits"]["top1_agreement"]})
    return rows


SECTIONS = {"gemm": bench_gemm, "kernels": bench_kernels, "codec": bench_codec, "vision": bench_vision,
            "masks": bench_masks, "harness": bench_harness, "layers": bench_layers, "stream": bench_stream}


def environment() -> dict:
    import mlx.core as mx
    import torch

    from parity.provenance import versions

    return {**versions(), "cpus": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "mlx device": str(mx.default_device())}


def to_markdown(result: dict) -> str:
    lines = [f"# rmlx benchmarks ({result['created']})", "",
             ", ".join(f"{k} {v}" for k, v in result["environment"].items()), ""]
    for section, rows in result["sections"].items():
        cols = list(dict.fromkeys(c for r in rows for c in r))  # rows may leave columns out ("")
        lines += [f"## {section}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                           for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", default=",".join(s for s in SECTIONS if s != "stream"))
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="stream section: a real-size checkpoint directory (rmlx-parity fixtures --shape 12b)")
    p.add_argument("--tokens", default="280,1120", help="stream section: soft-token budgets (default 280,1120)")
    p.add_argument("--threads", type=int, default=2, help="stream section: --threads of the run (default 2)")
    p.add_argument("--precisions", default="float32",
                   help="stream section: float32,bfloat16,mxfp8 (default float32; the ratios are to float32)")
    args = p.parse_args(argv)
    names = [s for s in args.only.split(",") if s]
    unknown = sorted(set(names) - SECTIONS.keys())
    if unknown or args.repeat < 1:
        print(f"bench: unknown section(s) {unknown} (known: {sorted(SECTIONS)}) or --repeat < 1", file=sys.stderr)
        return 2
    from parity import report
    from rmlx.errors import InputError

    out = args.out or ROOT / "reports" / time.strftime("bench-%Y%m%d-%H%M%S", time.gmtime())
    try:
        report.check_free(out)
    except InputError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    result = {"schema": "rmlx.bench/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(), "repeat": args.repeat, "sections": {}}
    for name in names:
        t = time.perf_counter()
        if name == "stream":
            precisions = tuple(s for s in args.precisions.split(",") if s)
            if set(precisions) - PRECISIONS.keys():
                print(f"bench: --precisions takes {sorted(PRECISIONS)}", file=sys.stderr)
                return 2
            result["sections"][name] = bench_stream(1, args.checkpoint, tuple(int(t) for t in args.tokens.split(",")),
                                                    args.threads, precisions)
        else:
            result["sections"][name] = SECTIONS[name](args.repeat)
        print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    report.write_files(out, {"bench.json": json.dumps(result, indent=2) + "\n", "bench.md": to_markdown(result)})
    print(to_markdown(result))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
