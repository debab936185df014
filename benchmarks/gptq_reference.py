"""Reference GPTQ for benchmarks/gptq.py: llm-compressor on llmc's checkpoint, windows and protocol.

Runs in its own virtual environment (llm-compressor pins its own transformers), so it imports
nothing from llmc:

    python3 -m venv /tmp/ref-venv && /tmp/ref-venv/bin/pip install torch==2.13.0 \\
        && /tmp/ref-venv/bin/pip install llmcompressor==0.14.0.1
    /tmp/ref-venv/bin/python benchmarks/gptq_reference.py '{"checkpoint": ..., "calibration": ...,
        "evaluation": ..., "bits": 4, "group_size": 128, "symmetric": true, "act_order": false}'

``checkpoint`` is llmc's ingested safetensors directory, ``calibration`` and ``evaluation`` are
the token windows llmc's calibrate pass and benchmarks/gptq.py stored ([windows, seq_len]).
GPTQ settings match llmc's: damping 0.01, blocks of 128, every decoder linear, LM head float,
static groups with act-order. Prints one JSON line: wall time of ``oneshot``, peak RSS,
perplexity (the formula of llmc.passes.evaluate.perplexity).
"""

from __future__ import annotations

import json
import math
import sys
import time



def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over from
    the parent through fork and exec, so a child of a large process would report the parent's."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

def main() -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    args = json.loads(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(args["checkpoint"], dtype=torch.float32).eval()
    calibration = load_file(args["calibration"])["tokens"]
    dataset = Dataset.from_dict({
        "input_ids": calibration.tolist(),
        "attention_mask": torch.ones_like(calibration).tolist(),
    })
    weights = {"num_bits": args["bits"], "type": "int", "symmetric": args["symmetric"]}
    if args["group_size"] == -1:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=args["group_size"])
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        block_size=128,
        dampening_frac=0.01,
        actorder="static" if args["act_order"] else None,
    )
    start = time.perf_counter()
    oneshot(
        model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calibration.shape[0],
        max_seq_length=calibration.shape[1], shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()

    windows = load_file(args["evaluation"])["tokens"]
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = window.unsqueeze(0)
            logits = model(ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    import llmcompressor

    print(json.dumps({
        "seconds": seconds, "peak_rss_bytes": peak, "perplexity": math.exp(total / count),
        "summary": f"llmcompressor {llmcompressor.__version__}",
    }))


if __name__ == "__main__":
    main()
