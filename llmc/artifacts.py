"""The output directory: fixed layout, written aside and moved into place at once.

Layout (documented in the README)::

    OUT/
      plan.json            the source of truth: model, decisions, plan, measurements
      report.md            the plan report for people and CI summaries
      stages/stage_<k>.onnx
      engines/<sku>-sm<cc>-<flavor><version>/stage_<k>.engine, stage_<k>.json
      manifests/<node>-gpu<k>.yaml
      receipt.json         input hashes, tool versions, command, seed
      SHA256SUMS           every other file, sorted

Nothing here carries a timestamp or a duration, so identical inputs give identical bytes, with
one measured exception: TensorRT engines are not byte-reproducible (see ``llmc.tensorrt``), so
``engines/`` (the engines and the metadata that quotes their sha256) is left out of that
promise; :func:`reproducible_sums` is SHA256SUMS without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from llmc.errors import InputError
from llmc.ir import Program

RECEIPT = "receipt.json"
SUMS = "SHA256SUMS"
NOT_REPRODUCIBLE = ("engines/",)  # path prefixes whose bytes differ between identical builds


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(out: Path) -> None:
    """Refuse to replace a non-empty directory that is not an llmc build (a typo'd -o)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECEIPT).is_file())):
        raise InputError(f"{out}: exists and is not an llmc build directory; refusing to replace it")


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # same filesystem: no copy of large engines/graphs
    except OSError:
        shutil.copyfile(source, target)


def write_output(program: Program, out: Path, cache_root: Path, receipt: dict) -> list[str]:
    """Materialise ``program.artifacts`` plus receipt and sums into ``out``; returns the file list."""
    check_output_dir(out)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for artifact in sorted(program.artifacts, key=lambda a: a.path):
            _place(cache_root / artifact.ref, staging / artifact.path)
        (staging / RECEIPT).write_text(json.dumps(receipt, indent=2, sort_keys=True) + "\n")
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        sums = "".join(f"{sha256_file(staging / f)}  {f}\n" for f in files)
        (staging / SUMS).write_text(sums)
        # Swap: the old build stays whole until the new one is complete.
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files + [SUMS]


def verify_sums(out: Path) -> list[str]:
    """Files whose content no longer matches SHA256SUMS (empty when the build is intact)."""
    bad = []
    for line in (out / SUMS).read_text().splitlines():
        digest, name = line.split("  ", 1)
        path = out / name
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(name)
    return bad


def reproducible_sums(out: Path) -> str:
    """SHA256SUMS without the files that are not byte-reproducible (TensorRT engines)."""
    lines = (out / SUMS).read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.split("  ", 1)[1].startswith(NOT_REPRODUCIBLE))
