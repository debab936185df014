"""Check and time llmc's prefill kernels (``intn_linear`` rules 8 and 9, ``fp6_linear`` rule 7) against
dequantize-then-cuBLAS and cuBLAS float16, from 17 to 1024 rows of x, on one GPU in one run.

    python benchmarks/kernels_prefill.py [--out DIR] [--bits 4|8|2|6] [--rows 17,32,...]   # on a CUDA machine

For each linear shape of ``benchmarks/kernels.py`` (symmetric int-N codes, int4 by default, in
groups of 128, 64 where K = 576; ``--bits 6``: FP6 e3m2 with one scale per output channel) and
each number of rows M: the fused kernel at ``prefill_launch``'s launch (whatever the
bounds of ``prefill_config``), on an sm_90 GPU the Hopper kernel (rule 9,
``wgmma_prefill``) at ``wgmma_launch``'s launch, llmc's dequantize kernel then ``torch.matmul``,
``torch.matmul`` on the float16 weight, and ``intn_linear``'s own dispatch (rule 9, the prefill
kernel, the 2-16 row kernel in blocks of 16 rows, or dequantize-then-matmul), named and timed, beside
what it runs without rule 9. Correctness first (a fresh ``x``, a
NaN-filled output, the float32 reference, relative error under 2e-3), then the same L2-cold,
graph-replayed timing as ``kernels.py``. Writes ``kernels_prefill.md`` (``kernels_prefill-int8.md``,
``kernels_prefill-fp6.md`` ...) under ``--out`` (default ``$OUT``, else the current directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import SHAPES, TOLERANCE, _checked, _copies_of, _timed, clocks_up

ROWS = (17, 32, 64, 96, 128, 192, 256, 512, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--bits", type=int, choices=(2, 4, 6, 8), default=4, help="6: FP6 e3m2")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated rows of x")
    args = parser.parse_args()
    rows = tuple(int(r) for r in args.rows.split(","))

    import torch
    import triton

    from llmc.passes.fpx import FORMATS, fpx_quantize
    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.plugins import fp6_linear as fp
    from llmc.plugins import intn_linear as intn
    from llmc.plugins import wgmma_prefill
    from llmc.plugins.splitk import sm_count

    if args.bits == 6:  # FP6 e3m2, one scale per output channel (as kernels.py)
        pack = lambda weight, k: fp.pack_fpx(fpx_quantize(weight, FORMATS["e3m2"], None, scale_dtype=torch.float16))  # noqa: E731
        dequantize_reference, reference, linear = fp.fpx_dequantize_reference, fp.fpx_reference, fp.fpx_linear
        dequantize, config_of = fp.fpx_dequantize, fp.fpx_config
        what = "FP6 e3m2 per channel"
    else:
        pack = lambda weight, k: intn.pack_intn(  # noqa: E731
            rtn_quantize(weight, args.bits, 128 if k % 128 == 0 else 64, symmetric=True))
        dequantize_reference, reference, linear = intn.intn_dequantize_reference, intn.intn_reference, intn.intn_linear
        dequantize, config_of = intn.intn_dequantize, intn.intn_config
        what = f"int{args.bits} symmetric"

    device = torch.device("cuda")
    hopper = wgmma_prefill.available(device)
    props = torch.cuda.get_device_properties(device)
    sms = sm_count(device)
    torch.manual_seed(0)
    clocks_up(device)
    started = time.time()
    worst = 0.0
    lines = []
    for name, k, n in SHAPES:
        weight = torch.randn(n, k, device=device) * 0.02
        w = pack(weight, k)
        half = dequantize_reference(w).half()  # [N, K]
        weights, halves = _copies_of(w), _copies_of(half)
        first = True
        for m in (rows[0], *rows):  # the first timing of a shape ran slow (up to 2x), so it is run twice
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = reference(x, w).float()
            launch = intn.prefill_launch(m, args.bits, k, n, sms)
            fused = lambda x, y, w: linear(x, w, launch, out=y)  # noqa: E731
            y = _checked(fused, x, w, ref, (m, n), f"{name} M={m} fused")
            if y is None:
                raise SystemExit("the prefill kernel is wrong; no timing")
            worst = max(worst, float((y.float() - ref).norm() / ref.norm()))
            times = {
                "llmc": _timed(lambda i: (lambda: linear(x, weights(i), out=y)), w.nbytes, props.L2_cache_size),
                "fused": _timed(lambda i: (lambda: linear(x, weights(i), launch, out=y)), w.nbytes, props.L2_cache_size),
                "deq+mm": _timed(lambda i: (lambda: torch.matmul(x, dequantize(weights(i)).t(), out=y)),
                                 w.nbytes, props.L2_cache_size),
                "fp16": _timed(lambda i: (lambda: torch.matmul(x, halves(i).t(), out=y)), 2 * n * k, props.L2_cache_size),
            }
            config = config_of(m, w, sms)  # without rule 9
            before = "deq+mm" if config is None else "prefill" if config.block_m > 16 else "2-16 row"
            times["before"] = times["deq+mm"] if config is None else _timed(
                lambda i: (lambda: linear(x, weights(i), config, out=y)), w.nbytes, props.L2_cache_size)
            hopper_cell = "-"
            if hopper:
                wgmma = wgmma_prefill.wgmma_launch(m, args.bits, k, n, sms)
                run = lambda x, y, w: wgmma_prefill.wgmma_linear(x, w, wgmma, y)  # noqa: E731
                y9 = _checked(run, x, w, ref, (m, n), f"{name} M={m} wgmma")
                if y9 is None:
                    raise SystemExit("the Hopper prefill kernel is wrong; no timing")
                worst = max(worst, float((y9.float() - ref).norm() / ref.norm()))
                times["wgmma"] = _timed(lambda i: (lambda: wgmma_prefill.wgmma_linear(x, weights(i), wgmma, y)),
                                        w.nbytes, props.L2_cache_size)
                hopper_cell = f"{times['wgmma'] * 1e6:.1f}"
            picked = "wgmma" if hopper and wgmma_prefill.wgmma_config(m, args.bits, k, n, sms) else before
            if first:
                first = False
                continue
            lines.append(f"| {name} ({k}→{n}) | {m} | {hopper_cell} | {times['fused'] * 1e6:.1f} | "
                         f"{times['deq+mm'] * 1e6:.1f} | {times['fp16'] * 1e6:.1f} | {before} {times['before'] * 1e6:.1f} | "
                         f"{picked} {times['llmc'] * 1e6:.1f} | {times['before'] / times['llmc']:.2f}x | "
                         f"{times['fp16'] / times['llmc']:.2f}x |")
            print(lines[-1], flush=True)
    header = (f"{what}; {props.name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, {date.today()}; "
              f"largest relative error of the fused kernels {worst:.1e} (tolerance {TOLERANCE}); {time.time() - started:.0f} s\n\n"
              "| shape (K→N) | M | Hopper kernel, rule 9 (us) | prefill kernel, rule 8 (us) | deq+mm (us) | fp16 (us) "
              "| llmc without rule 9 (us) | llmc (us) | llmc vs without rule 9 | llmc vs fp16 |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")
    text = header + "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = {4: "", 6: "-fp6"}.get(args.bits, f"-int{args.bits}")
    (args.out / f"kernels_prefill{suffix}.md").write_text(text)
    print(header)


if __name__ == "__main__":
    main()
