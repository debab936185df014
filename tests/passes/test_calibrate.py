"""`calibrate`: seeded windows that are slices of the tokenised text, and the texts it refuses."""

from __future__ import annotations

import hashlib

import pytest
from safetensors.torch import load_file

from llmc.checkpoint import load_tokenizer
from llmc.errors import EXIT_USAGE, PassError
from llmc.passes.calibrate import CalibratePass, tokenize_text
from llmc.passes.ingest import IngestPass
from llmc.pipeline import run_pipeline
from llmc.testing import TINY_TEXT

SEQ_LEN, WINDOWS = 32, 6


def calibrate(model_dir, text, cache, seed=0, seq_len=SEQ_LEN, windows=WINDOWS):
    passes = [IngestPass(source=model_dir), CalibratePass(text=text, seq_len=seq_len, windows=windows)]
    program = run_pipeline(passes, cache_root=cache, seed=seed, verify=True, show_progress=False).program
    return program, load_file(cache / program.calibration.tokens_ref)["tokens"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def test_windows_are_contiguous_slices_of_the_tokenised_text(tmp_path, tiny_model_dir, text):
    program, windows = calibrate(tiny_model_dir, text, tmp_path / "cache")
    assert windows.shape == (WINDOWS, SEQ_LEN)
    assert str(windows.dtype) == "torch.int64"

    tokens = tokenize_text(load_tokenizer(tiny_model_dir), TINY_TEXT)
    every_slice = tokens.unfold(0, SEQ_LEN, 1)  # [positions, seq_len]
    for window in windows:
        assert (every_slice == window).all(dim=1).any(), "a window is not a slice of the text"

    info = program.calibration
    assert (info.source, info.seq_len, info.windows) == ("calib.txt", SEQ_LEN, WINDOWS)
    assert info.source_sha256 == hashlib.sha256(text.read_bytes()).hexdigest()


def test_windows_depend_on_the_seed_only(tmp_path, tiny_model_dir, text):
    _, first = calibrate(tiny_model_dir, text, tmp_path / "a", seed=0)
    _, again = calibrate(tiny_model_dir, text, tmp_path / "b", seed=0)
    _, other = calibrate(tiny_model_dir, text, tmp_path / "c", seed=1)
    assert first.equal(again)
    assert not first.equal(other)


def test_a_text_shorter_than_one_window_is_refused_with_exit_2(tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox")
    with pytest.raises(PassError) as info:
        calibrate(tiny_model_dir, short, tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert str(short) in str(info.value)
    assert "fewer than one window of 32" in str(info.value)


def test_a_file_that_is_not_utf8_is_refused_with_exit_2(tmp_path, tiny_model_dir):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("caf\u00e9 na\u00efve " * 200).encode("latin-1"))
    with pytest.raises(PassError) as info:
        calibrate(tiny_model_dir, latin1, tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert str(latin1) in str(info.value)
    assert "UTF-8" in str(info.value)


def test_a_text_of_exactly_one_window_gives_that_window(tmp_path, tiny_model_dir):
    exact = tmp_path / "exact.txt"
    exact.write_text("the quick brown fox jumps over the lazy dog.")
    tokens = tokenize_text(load_tokenizer(tiny_model_dir), exact.read_text())
    _, windows = calibrate(tiny_model_dir, exact, tmp_path / "cache", seq_len=tokens.numel(), windows=2)
    assert windows.equal(tokens.expand(2, -1))
