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

import ctypes
import hashlib
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmc.errors import InputError, LlmcError, VerificationError
from llmc.ir import Program

PLAN = "plan.json"
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
    """Refuse to replace a non-empty directory that is not an llmc build (a typo'd -o), and a path
    that cannot become a directory (one of its parents is a file): before any pass runs."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECEIPT).is_file())):
        raise InputError(f"{out}: exists and is not an llmc build directory; refusing to replace it")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():  # the nearest existing one; above it, all are directories
            if not parent.is_dir():
                raise InputError(f"{out}: {parent} is not a directory, so the build directory cannot be made there")
            break


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # same filesystem: no copy of large engines/graphs
    except OSError:
        shutil.copyfile(source, target)


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``);
    False, changing nothing, where the C library or the file system lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


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
        # Swap: the old build stays whole until the new one is complete, and then OUT is never
        # missing (one exchange where the system has it; else two renames, with a moment between).
        if out.exists() and exchange(staging, out):
            shutil.rmtree(staging, ignore_errors=True)  # the old build
        elif out.exists():
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


_SUMS_LINE = re.compile(r"([0-9a-fA-F]{64})(?:  | \*)(.+)")


def _listed_name(name: str) -> bool:
    """A path inside the build: relative, no '..' (SHA256SUMS names no file outside it)."""
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def read_sums(out: Path) -> list[tuple[str, str]]:
    """(digest, file) of each line of SHA256SUMS; a line that is not ``<sha256>  <file>`` means the
    build's files changed (exit 6), and the error names the line."""
    path = out / SUMS
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise VerificationError(f"{path}: not UTF-8 text: the build's files changed; recompile it") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror or e}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        match = _SUMS_LINE.fullmatch(line)
        if match is None or not _listed_name(match[2]):
            raise VerificationError(
                f"{path}: line {number}: expected '<sha256>  <file in the build>', got {line[:80]!r}: "
                "the build's files changed; recompile it"
            )
        entries.append((match[1].lower(), match[2]))
    return entries


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file beside it, replaced in one rename: a reader
    never sees half a file, and a kill leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def update_sums(out: Path, names) -> None:
    """SHA256SUMS with the files ``names`` (relative to the build) hashed again or added, written
    atomically: what ``llmc build-engines`` and ``llmc render`` do after writing into a build."""
    sums = {name: digest for digest, name in read_sums(out)}
    sums.update({name: sha256_file(out / name) for name in names})
    write_atomically(out / SUMS, "".join(f"{sums[name]}  {name}\n" for name in sorted(sums)).encode())


def verify_sums(out: Path) -> list[str]:
    """Files whose content no longer matches SHA256SUMS (empty when the build is intact)."""
    bad = []
    for digest, name in read_sums(out):
        path = out / name
        try:
            same = path.is_file() and sha256_file(path) == digest
        except OSError:  # unreadable: cannot vouch for it
            same = False
        if not same:
            bad.append(name)
    return bad


def reproducible_sums(out: Path) -> str:
    """SHA256SUMS without the files that are not byte-reproducible (TensorRT engines)."""
    return "".join(f"{digest}  {name}\n" for digest, name in read_sums(out) if not name.startswith(NOT_REPRODUCIBLE))


# --------------------------------------------------------------------------- reading a build back


def check_sums(build: Path) -> None:
    """Refuse a directory that is not an llmc build (exit 2) or whose files differ from its
    SHA256SUMS (exit 6, naming them)."""
    if not (build / SUMS).is_file():
        raise InputError(f"{build}: not an llmc build directory (no {PLAN} or {SUMS})")
    bad = verify_sums(build)
    if bad:
        names = [name if (build / name).is_file() else f"{name} (missing)" for name in bad]
        raise VerificationError(f"{build}: files differ from {SUMS}: {', '.join(names)}")


def unusable(build: Path, error: InputError) -> LlmcError:
    """The error to raise for a build file that cannot be used: "files differ from SHA256SUMS"
    (exit 6) when the build changed since it was written, else ``error``. Only hashes the build on
    this failure path, so commands that do not verify it up front still say what happened."""
    if (build / SUMS).is_file():
        check_sums(build)
    return error


# What `llmc inspect` and `llmc run` read of plan.json and receipt.json (other fields pass).
class _Read(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Stage(_Read):
    index: int
    device: str
    sku: str
    compute_capability: str
    layer_start: int
    layer_end: int


class _Measured(_Read):
    name: str
    value: object
    unit: str


class _ModelRead(_Read):
    architecture: str
    hidden_size: int
    vocab_size: int


class _Quantization(_Read):
    summary: str


class _Predicted(_Read):
    tokens_per_s: float
    batch_latency_s: float


class PlanRead(_Read):
    model: _ModelRead
    cluster: str
    quantization: _Quantization
    predicted: _Predicted
    measured: list[_Measured]
    stages: list[_Stage] = Field(min_length=1)


class ReceiptRead(_Read):
    llmc: str


def _field_problem(doc, schema: type[BaseModel]) -> tuple[str, str] | None:
    """(field path, problem) of the first field of ``doc`` that ``schema`` refuses, or None."""
    from llmc.config import _field_path

    try:
        schema.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        return _field_path(first["loc"]), first["msg"].lower()
    return None


def read_build_json(build: Path, name: str, fields: type[BaseModel], *, verified: bool = False) -> dict:
    """A JSON file of the build, checked against ``fields``: a one-line error naming the file and the
    field when it is missing, not JSON or lacks a field (exit 6 when the build's files changed since
    SHA256SUMS was written, else exit 2). ``verified``: SHA256SUMS was checked already."""
    path = build / name

    def fail(message: str) -> LlmcError:
        error = InputError(f"{path}: {message}")
        return error if verified else unusable(build, error)

    if not path.is_file():
        if not (build / SUMS).is_file() and not (build / PLAN).is_file():
            raise InputError(f"{build}: not an llmc build directory (no {PLAN} or {SUMS})")
        raise fail("missing; the build is incomplete: recompile it")
    try:
        doc = json.loads(path.read_bytes())
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise fail(f"not valid JSON ({str(e).splitlines()[0][:120]}); recompile the build") from None
    problem = _field_problem(doc, fields)
    if problem:
        field, message = problem
        raise fail(f"{field + ': ' if field else ''}{message}; not a build of this llmc: recompile it")
    return doc


def read_plan(build: Path, *, verified: bool = False) -> dict:
    """plan.json, with the fields `llmc inspect` and `llmc run` read (see :func:`read_build_json`)."""
    return read_build_json(build, PLAN, PlanRead, verified=verified)


def load_build(build: Path) -> tuple[dict, dict]:
    """(plan.json, receipt.json) of a build whose files all match SHA256SUMS: ``llmc inspect``.

    Checks the sums before parsing anything, so a changed file is reported as one (exit 6)."""
    check_sums(build)
    return read_plan(build, verified=True), read_build_json(build, RECEIPT, ReceiptRead, verified=True)
