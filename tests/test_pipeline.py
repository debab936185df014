"""The pass runner: caching, verification between passes, failures named with their history."""

from __future__ import annotations

import pytest

from llmc.errors import EXIT_USAGE, PassError
from llmc.ir import dump_program
from llmc.passes.calibrate import CalibratePass
from llmc.passes.ingest import IngestPass
from llmc.pipeline import run_pipeline
from llmc.testing import TINY_TEXT


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TINY_TEXT)
    return path


def _passes(model_dir, text, **calibrate):
    return [IngestPass(source=model_dir), CalibratePass(text=text, seq_len=32, windows=4, **calibrate)]


def test_second_run_is_served_from_the_cache(tmp_path, tiny_model_dir, text):
    cache = tmp_path / "cache"
    first = run_pipeline(_passes(tiny_model_dir, text), cache_root=cache, seed=0, verify=True, show_progress=False)
    second = run_pipeline(_passes(tiny_model_dir, text), cache_root=cache, seed=0, verify=True, show_progress=False)
    assert [t.cached for t in first.timings] == [False, False]
    assert [t.cached for t in second.timings] == [True, True]
    assert dump_program(first.program) == dump_program(second.program)
    assert first.program.layers[0].linears[0].name == "model.layers.0.self_attn.q_proj"


def test_changed_input_content_or_option_reruns_only_what_depends_on_it(tmp_path, tiny_model_dir, text):
    cache = tmp_path / "cache"
    run_pipeline(_passes(tiny_model_dir, text), cache_root=cache, seed=0, show_progress=False)
    text.write_text(TINY_TEXT + " more words at the end.")
    changed = run_pipeline(_passes(tiny_model_dir, text), cache_root=cache, seed=0, show_progress=False)
    assert [t.cached for t in changed.timings] == [True, False]
    reseeded = run_pipeline(_passes(tiny_model_dir, text), cache_root=cache, seed=1, show_progress=False)
    assert [t.cached for t in reseeded.timings] == [False, False]


def test_failure_names_the_pass_and_its_history_and_keeps_the_exit_code(tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(PassError) as info:
        run_pipeline(_passes(tiny_model_dir, short), cache_root=tmp_path / "c", seed=0, show_progress=False)
    assert "(in 'calibrate' after [ingest])" in str(info.value)
    assert info.value.exit_code == EXIT_USAGE
    # nothing half-written is left in the cache for the failed pass
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith((".tmp", "calibrate"))]


def test_verification_reports_a_missing_prerequisite(tmp_path, text):
    with pytest.raises(PassError, match="run 'ingest' first"):
        run_pipeline([CalibratePass(text=text)], cache_root=tmp_path, seed=0, verify=True, show_progress=False)


def test_calibration_windows_are_seeded(tmp_path, tiny_model_dir, text):
    from safetensors.torch import load_file

    def windows(seed):
        run = run_pipeline(_passes(tiny_model_dir, text), cache_root=tmp_path, seed=seed, show_progress=False)
        return load_file(tmp_path / run.program.calibration.tokens_ref)["tokens"]

    assert windows(0).shape == (4, 32)
    assert windows(0).equal(windows(0))
    assert not windows(0).equal(windows(1))


def test_the_cache_key_holds_a_digest_of_llmcs_own_source(tmp_path):
    from llmc.pipeline import source_digest, tool_versions

    assert tool_versions()["llmc-source"] == source_digest()
    a, b = tmp_path / "llmc", tmp_path / "passes"
    for root in (a, b):
        root.mkdir()
        (root / "m.py").write_text("X = 1\n")
    before = source_digest((a, b))
    (b / "m.py").write_text("X = 2\n")  # a changed pass under the same version number
    assert source_digest((a, b)) != before
    (b / "notes.txt").write_text("not source")
    assert source_digest((a, b)) == source_digest((a, b))
