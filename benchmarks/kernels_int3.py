"""Check and time llmc's int3 kernels (``plugins/int3_linear.py``) beside int4 and cuBLAS float16, on one GPU in one run.

    python benchmarks/kernels_int3.py [--out DIR]             # the table (llmc's own dispatch)
    python benchmarks/kernels_int3.py --explore [--out DIR]   # candidate launch shapes, for tuning
    python benchmarks/kernels_int3.py --explore-prefill       # rule 4's launches at 4-256 rows, for tuning

For each linear shape of ``benchmarks/kernels.py`` and each batch of rows M in 1, 4, 16, 64, 256, 2048: int3
RTN codes in groups of 128 (64 where K = 576), symmetric, and asymmetric in groups of 32, through
``intn_linear`` (llmc's dispatch); int4 symmetric in groups of 128 (64) the same way; ``torch.matmul`` on
the float16 weight (cuBLAS); and int3 dequantize-then-matmul. Correctness first (a fresh ``x``, a
NaN-filled output, the float32 reference, relative error under 2e-3), then the L2-cold, graph-replayed
timing of ``kernels.py`` (weights cycled over copies exceeding 4x L2). The fraction of the roofline is
bytes moved (packed weights, scales and zero points, x, y) over time over the measured copy rate.
Writes ``kernels_int3.md`` (``--explore``: ``kernels_int3_explore.md``) under ``--out`` (default ``$OUT``,
else the current directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import SHAPES, TOLERANCE, _checked, _copies_of, _timed, clocks_up, copy_bandwidth

BATCHES = (1, 4, 16, 64, 256, 2048)  # the issue's, and 64 (the top of rule 4)
T, F = True, False
# --explore: (block_n, block_w tile rows, num_warps, programs per SM, prefetch, inline zero, evict-first)
DECODE_CANDIDATES = [(16, 32, 4, 0, F, T, T), (16, 64, 8, 0, F, T, T), (32, 32, 8, 0, T, T, T), (32, 32, 4, 1, F, T, T),
                     (16, 128, 8, 0, F, T, T), (32, 16, 8, 0, T, T, T), (16, 32, 4, 1, F, T, F), (64, 8, 2, 16, T, T, T),
                     (64, 16, 4, 4, T, T, T), (32, 16, 4, 2, F, T, T), (16, 64, 8, 0.5, F, T, T)]
# (block_n, block_w tile rows, num_warps, programs per SM, evict-first, swap, num_stages)
# with an eighth field, rows of x per program
MULTI_ROW_CANDIDATES = [(16, 32, 4, 0, F, T, T, 4), (16, 16, 4, 0, F, T, T, 4), (32, 16, 4, 0, F, T, T, 4),
                        (16, 32, 8, 0, F, T, T, 4), (16, 16, 4, 0, F, T, T, 8), (16, 32, 4, 1, F, T, T, 4)]
# --explore-prefill: (block_n, block_w tile rows, num_warps, num_stages, programs per SM)
PREFILL_CANDIDATES = [(64, 2, 4, 4, 2), (64, 4, 4, 3, 2), (128, 2, 4, 4, 2), (64, 1, 4, 4, 2), (128, 4, 8, 3, 2), (64, 2, 4, 4, 4)]
TENSOR_CORE_CANDIDATES = [(64, 16, 4, 2, F, F, 2), (128, 16, 4, 2, F, F, 2), (32, 16, 4, 4, F, F, 2), (64, 16, 4, 4, T, F, 2),
                          (64, 16, 4, 2, F, T, 2), (128, 16, 8, 2, F, F, 2), (32, 16, 4, 8, F, F, 3), (64, 16, 4, 0, F, F, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--explore", action="store_true", help="time candidate launch shapes instead of the table")
    parser.add_argument("--explore-prefill", action="store_true",
                        help="time int3_linear rule 4's kernel at candidate launches against llmc's dispatch")
    args = parser.parse_args()

    import torch
    import triton

    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.plugins import intn_linear as intn
    from llmc.plugins.splitk import sm_count

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    sms, l2 = sm_count(device), props.L2_cache_size
    torch.manual_seed(0)
    clocks_up(device)
    copy_rate = copy_bandwidth(device)
    started = time.time()
    worst = 0.0
    lines = []

    def measure(name, call, w, ref, m, k, n, nbytes):
        """(us, fraction of the roofline) of ``call(x, y, w)`` after checking it, or None if it failed."""
        nonlocal worst
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        expected = None if ref is None else ref(x)
        y = _checked(call, x, w, expected, (m, n), name)
        if y is None:
            return None
        if expected is not None:
            worst = max(worst, float((y.float() - expected).norm() / expected.norm()))
        copies = _copies_of(w)
        seconds = _timed(lambda i: (lambda wi=copies(i): call(x, y, wi)), nbytes, l2)
        return seconds * 1e6, (nbytes + 2 * m * (k + n)) / seconds / copy_rate

    for label, k, n in SHAPES:
        weight = torch.randn(n, k, device=device) * 0.02
        group = 128 if k % 128 == 0 else 64
        w3 = intn.pack_intn(rtn_quantize(weight, 3, group, symmetric=True))
        w3a = intn.pack_intn(rtn_quantize(weight, 3, 32, symmetric=False))
        w4 = intn.pack_intn(rtn_quantize(weight, 4, group, symmetric=True))
        w16 = weight.half()
        del weight
        refs = {}
        for key, w in (("int3", w3), ("int3a", w3a), ("int4", w4)):
            deq = intn.intn_dequantize_reference(w).t().contiguous()
            refs[key] = lambda x, deq=deq: (x.float() @ deq)
        linear = lambda x, y, w: intn.intn_linear(x, w, out=y)  # noqa: E731
        if args.explore_prefill:
            from llmc.plugins import int3_linear

            for m in (4, 16, 64, 256):
                cells = []
                for c in [None] + PREFILL_CANDIDATES:
                    if c is None:
                        call, name = linear, "llmc"
                    else:
                        config = int3_linear.prefill_launch(m, k, n, sms, c)
                        call, name = (lambda x, y, w, config=config: intn.intn_linear(x, w, config, out=y)), f"p{list(c)}"
                    result = measure(f"{label} M={m} {name}", call, w3, refs["int3"], m, k, n, w3.nbytes)
                    if result is not None:
                        cells.append((result[0], f"{name}={result[0]:.1f}"))
                fp16 = measure(f"{label} M={m} fp16", lambda x, y, w: torch.matmul(x, w.t(), out=y), w16, None,
                               m, k, n, 2 * n * k)
                cells.sort()
                line = f"{label} ({k}→{n}) M={m}: fp16 {fp16[0]:.1f}; int3 best first: " + "  ".join(t for _, t in cells[:5])
                lines.append(line)
                print(line, flush=True)
            continue
        if args.explore:
            for m in (1, 3, 4, 8, 16):
                cells = []
                candidates = [("llmc", None)]
                if m == 3:
                    candidates += [("decode", c) for c in DECODE_CANDIDATES[:2]]
                if m > 1 and k * n < 1 << 25:
                    candidates += [("decode", c) for c in MULTI_ROW_CANDIDATES]
                if m > 1:
                    candidates += [("tc", c) for c in TENSOR_CORE_CANDIDATES[:4]]
                for kind, c in candidates:
                    config = None if c is None else (intn.intn_config(m, w3, sms, decode=c) if kind == "decode"
                                                     else intn.intn_config(m, w3, sms, tensor_cores=c))
                    call = (lambda x, y, w, config=config: intn.intn_linear(x, w, config, out=y))
                    result = measure(f"{label} M={m} {kind} {c}", call, w3, refs["int3"], m, k, n, w3.nbytes)
                    if result is not None:
                        cells.append((result[0], f"{kind}{'' if c is None else list(c)}={result[0]:.1f}/{result[1]:.2f}"))
                fp16 = measure(f"{label} M={m} fp16", lambda x, y, w: torch.matmul(x, w.t(), out=y), w16, None,
                               m, k, n, 2 * n * k)
                int4 = measure(f"{label} M={m} int4", linear, w4, refs["int4"], m, k, n, w4.nbytes)
                cells.sort()
                line = (f"{label} ({k}→{n}) M={m}: fp16 {fp16[0]:.1f}, int4 {int4[0]:.1f}; int3 best first: "
                        + "  ".join(text for _, text in cells[:6]))
                lines.append(line)
                print(line, flush=True)
            continue
        for m in BATCHES:
            cells = {
                "int3": measure(f"{label} M={m} int3", linear, w3, refs["int3"], m, k, n, w3.nbytes),
                "int3 asym g32": measure(f"{label} M={m} int3 asym", linear, w3a, refs["int3a"], m, k, n, w3a.nbytes),
                "int4": measure(f"{label} M={m} int4", linear, w4, refs["int4"], m, k, n, w4.nbytes),
                "fp16": measure(f"{label} M={m} fp16", lambda x, y, w: torch.matmul(x, w.t(), out=y), w16, None,
                                m, k, n, 2 * n * k),
                "deq+mm int3": measure(f"{label} M={m} deq+mm int3",
                                       lambda x, y, w: torch.matmul(x, intn.intn_dequantize(w).t(), out=y), w3,
                                       refs["int3"], m, k, n, w3.nbytes),
            }
            if any(v is None for v in cells.values()):
                raise SystemExit(f"{label} M={m}: a kernel failed or was wrong; no table")
            line = (f"| {label} ({k}→{n}) | {m} | " + " | ".join(f"{us:.1f} ({roof:.2f})" for us, roof in cells.values())
                    + f" | {cells['fp16'][0] / cells['int3'][0]:.2f}x | {cells['int4'][0] / cells['int3'][0]:.2f}x |")
            lines.append(line)
            print(line, flush=True)
        del w3, w3a, w4, w16, refs
        torch.cuda.empty_cache()
    header = (f"{props.name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, {date.today()}; "
              f"copy {copy_rate / 1e9:.0f} GB/s; largest relative error against the float32 references {worst:.1e} "
              f"(tolerance {TOLERANCE}); {time.time() - started:.0f} s\n\n")
    if not (args.explore or args.explore_prefill):
        header += ("Time per call in us, in brackets the fraction of the copy roofline.\n\n"
                   "| shape (K→N) | M | int3 | int3 asym g32 | int4 | fp16 | deq+mm int3 | int3 vs fp16 | int3 vs int4 |\n"
                   "|---|---|---|---|---|---|---|---|---|\n")
    text = header + "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "kernels_int3_prefill.md" if args.explore_prefill else "kernels_int3_explore.md" if args.explore else "kernels_int3.md"
    (args.out / name).write_text(text)
    print(header)


if __name__ == "__main__":
    main()
