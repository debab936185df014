"""Masks (the patterns they promise), Wanda and magnitude scores, the pruning rules and config,
and the prune-wanda / prune-magnitude passes on a tiny model with outlier input features."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from llmc.checkpoint import load_hf_model, load_model, load_reference_model
from llmc.config import Pruning
from llmc.errors import EXIT_USAGE, PassError
from llmc.passes.calibrate import CalibratePass
from llmc.passes.ingest import IngestPass
from llmc.passes.prune_sparsegpt import SparseGptPrunePass
from llmc.passes.prune_wanda import MagnitudePrunePass, WandaPrunePass
from llmc.passes.sparsity import (
    MeanSquareAccumulator,
    block_ratio_mask,
    magnitude_scores,
    n_m_mask,
    n_m_violations,
    row_ratio_mask,
    wanda_scores,
)
from llmc.pipeline import PassContext, run_pipeline
from llmc.pruning import PruneOverride, PruningRules, Sparsity, parse_pattern, resolve_sparsity
from llmc.testing import TINY_TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: two threads on a busy two-core host only add synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_row_ratio_removes_exactly_that_share_of_every_row(ratio):
    scores = torch.rand(12, 40, generator=torch.Generator().manual_seed(0))
    mask = row_ratio_mask(scores, ratio)
    assert (mask.sum(dim=1) == int(40 * ratio)).all()
    # The removed are the row's lowest scores.
    assert (scores.masked_fill(~mask, -1).amax(dim=1) <= scores.masked_fill(mask, 2).amin(dim=1)).all()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_keeps_exactly_n_of_every_m(n, m):
    scores = torch.rand(6, 32, generator=torch.Generator().manual_seed(1))
    mask = n_m_mask(scores, n, m)
    assert ((~mask).reshape(6, -1, m).sum(dim=2) == n).all()
    weight = torch.randn(6, 32).masked_fill(mask, 0.0)
    assert n_m_violations(weight, n, m) == 0
    assert n_m_violations(torch.randn(6, 32), n, m) == 6 * 32 // m
    kept_low = scores.masked_fill(mask, 2).reshape(6, -1, m).amin(dim=2)
    removed_high = scores.masked_fill(~mask, -1).reshape(6, -1, m).amax(dim=2)
    assert (removed_high <= kept_low).all()


def test_ties_are_broken_by_position():
    assert n_m_mask(torch.ones(1, 4), 2, 4).tolist() == [[True, True, False, False]]
    assert row_ratio_mask(torch.ones(1, 4), 0.5).tolist() == [[True, True, False, False]]


def test_block_ratio_lets_rows_differ_but_hits_the_block_total():
    scores = torch.cat([torch.rand(4, 16) + 1, torch.rand(4, 16)])  # rows 4-7 are the least salient
    mask = block_ratio_mask(scores, 0.5)
    assert int(mask.sum()) == 64
    assert mask[4:].all() and not mask[:4].any()


def test_masks_decline_what_they_cannot_do():
    with pytest.raises(ValueError, match="do not divide"):
        n_m_mask(torch.rand(2, 10), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        n_m_mask(torch.rand(2, 8), 4, 4)
    with pytest.raises(ValueError, match="ratio"):
        row_ratio_mask(torch.rand(2, 8), 1.0)


def test_wanda_scores_weight_magnitude_by_input_rms():
    weight = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    accumulator = MeanSquareAccumulator(2)
    accumulator.add(torch.tensor([[2.0, 1.0], [2.0, -1.0]]))
    accumulator.add(torch.tensor([[[2.0, 1.0]]]))
    assert torch.allclose(accumulator.mean_square(), torch.tensor([4.0, 1.0]))
    assert torch.allclose(wanda_scores(weight, accumulator.mean_square()), torch.tensor([[2.0, 2.0], [6.0, 0.5]]))
    assert torch.equal(magnitude_scores(weight), weight.abs())


def outlier_inputs(columns=128, rows=2048, seed=0) -> torch.Tensor:
    """Activations with a few outlier features, as LLM hidden states have."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator) @ (torch.randn(columns, columns, generator=generator) * 0.2)
    scales = torch.ones(columns)
    scales[torch.randperm(columns, generator=generator)[:6]] = 20.0
    return (x + torch.randn(rows, columns, generator=generator)) * scales


@pytest.mark.parametrize("sparsity", ["50%", "2:4"])
def test_wanda_beats_magnitude_on_a_layer_with_outlier_features(sparsity):
    x = outlier_inputs()
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    s = Sparsity(0.5) if sparsity == "50%" else Sparsity.from_pattern(sparsity)
    accumulator = MeanSquareAccumulator(128)
    accumulator.add(x)

    def error(mask):
        return float((x @ (weight.masked_fill(mask, 0.0) - weight).T).square().mean())

    magnitude = error(row_ratio_mask(magnitude_scores(weight), 0.5) if s.n is None else n_m_mask(magnitude_scores(weight), 2, 4))
    scores = wanda_scores(weight, accumulator.mean_square())
    wanda = error(row_ratio_mask(scores, 0.5) if s.n is None else n_m_mask(scores, 2, 4))
    assert wanda < 0.5 * magnitude


# --------------------------------------------------------------------------- rules and config


def test_rules_resolve_targets_ignore_and_overrides():
    inputs = {"model.layers.0.mlp.down_proj": 128, "model.layers.0.self_attn.q_proj": 64,
              "model.layers.1.mlp.down_proj": 128, "lm_head": 64}
    rules = PruningRules(pattern="2:4", ignore=("lm_head", "*.q_proj"),
                         overrides=(PruneOverride("model.layers.0.*", ratio=0.0), PruneOverride("*.down_proj", ratio=0.3)))
    assert resolve_sparsity(inputs, rules) == {
        "model.layers.0.mlp.down_proj": None,  # the first matching override wins: dense
        "model.layers.0.self_attn.q_proj": None,
        "model.layers.1.mlp.down_proj": Sparsity(0.3),
        "lm_head": None,
    }
    assert resolve_sparsity(inputs, PruningRules(pattern="4:8"))["model.layers.1.mlp.down_proj"] == Sparsity(0.5, 4, 8)


def test_rules_refuse_patterns_that_select_nothing_and_groups_that_do_not_divide():
    with pytest.raises(Exception, match=r"pruning.overrides\[0\].match: '\*.down_prj' matches no linear"):
        resolve_sparsity({"model.layers.0.mlp.down_proj": 128}, PruningRules(ratio=0.5, overrides=(PruneOverride("*.down_prj", ratio=0.1),)))
    with pytest.raises(Exception, match="groups of 8 do not divide the input size 36"):
        resolve_sparsity({"model.layers.0.mlp.down_proj": 36}, PruningRules(pattern="4:8"))


def test_config_needs_one_of_ratio_and_pattern_and_a_valid_pattern():
    assert Pruning().method == "none"
    assert Pruning(method="wanda", pattern="2:4").pattern == "2:4"
    assert parse_pattern(" 4 : 8 ") == (4, 8)
    for bad, message in [
        (dict(method="wanda"), "exactly one of ratio"),
        (dict(method="sparsegpt", ratio=0.5, pattern="2:4"), "exactly one of ratio"),
        (dict(method="wanda", pattern="4:2"), "0 < N < M"),
        (dict(method="wanda", pattern="half"), "not an N:M pattern"),
        (dict(method="structured", pattern="2:4"), "give ratio"),
        (dict(method="structured"), "needs a ratio"),
        (dict(method="structured", ratio=0.2, overrides=[{"match": "*", "ratio": 0.1}]), "one global threshold"),
        (dict(method="wanda", ratio=0.5, overrides=[{"match": "*", "ratio": 0.1, "pattern": "2:4"}]), "exactly one"),
        (dict(method="wanda", ratio=1.0), "less than 1"),
        (dict(method="structured", ratio=0.2, structured={"align": 24}), "power of two"),
    ]:
        with pytest.raises(ValidationError, match=message):
            Pruning(**bad)


def test_model_yaml_pruning_errors_name_the_field(configs):
    from llmc.config import load_model_config
    from llmc.errors import ConfigError

    model, _ = configs
    model.write_text(model.read_text() + "pruning:\n  method: structured\n  ratio: 0.2\n  pattern: '2:4'\n")
    with pytest.raises(ConfigError) as info:
        load_model_config(model)
    assert info.value.exit_code == EXIT_USAGE
    assert "pruning.pattern: structured pruning removes whole heads and channels; give ratio" in str(info.value)


# --------------------------------------------------------------------------- the passes


@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory):
    """A two-layer tiny Llama whose norms blow up a few hidden channels (LLM outlier features)."""
    path = tmp_path_factory.mktemp("outliers") / "model"
    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=3, vocab_size=max(128, len(tokenizer)), num_hidden_layers=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(64, generator=generator)[:4]] = 8.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    (folder / "calib.txt").write_text(TINY_TEXT)
    return folder / "calib.txt"


def prune(model_dir, text, cache, *passes):
    base = [IngestPass(source=model_dir), CalibratePass(text=text, seq_len=32, windows=8)]
    return run_pipeline(base + list(passes), cache_root=cache, seed=0, verify=True, show_progress=False).program


def logits_error(program, cache) -> float:
    """Mean squared logit difference of the pruned model from the unpruned one, on held-out tokens."""
    ctx = PassContext(cache_root=cache, workdir=cache, entry="test", seed=0)
    ids = tiny_tokenizer()(TINY_TEXT[::-1][:400], return_tensors="pt")["input_ids"][:, :96]
    with torch.no_grad():
        reference = load_reference_model(program, ctx)(ids).logits
        return float((load_model(program, ctx)(ids).logits - reference).square().mean())


@pytest.mark.parametrize("sparsity", [dict(ratio=0.5), dict(pattern="2:4")])
def test_wanda_and_sparsegpt_beat_magnitude_on_a_tiny_model(tmp_path, outlier_model_dir, texts, sparsity):
    cache = tmp_path / "cache"
    errors = {p.name: logits_error(prune(outlier_model_dir, texts, cache, p), cache)
              for p in (MagnitudePrunePass(**sparsity), WandaPrunePass(**sparsity), SparseGptPrunePass(**sparsity))}
    # Measured (seed 3): 50% 0.0119 / 0.0050 / 0.0038, 2:4 0.0112 / 0.0071 / 0.0046.
    assert errors["prune-wanda"] < 0.8 * errors["prune-magnitude"]
    assert errors["prune-sparsegpt"] < errors["prune-wanda"]


def test_wanda_prunes_the_checkpoint_and_records_it(tmp_path, outlier_model_dir, texts):
    cache = tmp_path / "cache"
    rules = dict(pattern="2:4", overrides=(PruneOverride("*.down_proj", ratio=0.25), PruneOverride("model.layers.0.*", ratio=0.0)))
    program = prune(outlier_model_dir, texts, cache, WandaPrunePass(**rules))
    model = load_hf_model(cache / program.model.checkpoint, "float32")
    # Layer 1's seven linears, and layer 0's down_proj: "*.down_proj" matches it first.
    assert program.pruning.method == "wanda" and program.pruning.modules == 8
    assert program.pruning.unpruned_checkpoint.startswith("ingest-")
    # N:M linears are recorded for the engine build; the ratio override and the dense layer are not.
    assert [(d.module, d.n, d.m) for d in program.sparsity] == [
        (f"model.layers.1.{n}", 2, 4) for n in ("mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                 "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")
    ]
    for decision in program.sparsity:
        assert n_m_violations(model.get_submodule(decision.module).weight, 2, 4) == 0
    for layer in model.model.layers:
        assert ((layer.mlp.down_proj.weight == 0).sum(dim=1) == 32).all()  # 25% of 128 inputs, in every row
    assert not (model.model.layers[0].self_attn.q_proj.weight == 0).any()
    assert not list(cache.glob(".resume-*"))


def test_magnitude_reads_no_calibration_data(tmp_path, outlier_model_dir, texts, monkeypatch):
    import llmc.passes.prune_blocks as blocks

    monkeypatch.setattr(blocks, "first_block_inputs", lambda *a: pytest.fail("magnitude pruning ran the model"))
    program = prune(outlier_model_dir, texts, tmp_path / "cache", MagnitudePrunePass(ratio=0.5))
    assert program.pruning.removed_fraction == 0.5


def test_a_pattern_that_matches_nothing_is_a_config_error(tmp_path, outlier_model_dir, texts):
    with pytest.raises(PassError) as info:
        prune(outlier_model_dir, texts, tmp_path / "cache", WandaPrunePass(ratio=0.5, targets=("model.layer.*",)))
    assert info.value.exit_code == EXIT_USAGE
    assert "pruning.targets[0]: 'model.layer.*' matches no linear" in str(info.value)


def test_an_interrupted_run_resumes_at_the_block_it_was_in(tmp_path, outlier_model_dir, texts, monkeypatch):
    import json

    from safetensors.torch import load_file

    uninterrupted = prune(outlier_model_dir, texts, tmp_path / "whole", WandaPrunePass(pattern="2:4"))
    real = WandaPrunePass.prune
    calls = []

    def failing_in_block_1(self, name, *args):
        calls.append(name)
        if len(calls) == 7 + 2:  # block 1's v_proj
            raise KeyboardInterrupt("simulated interruption")
        return real(self, name, *args)

    cache = tmp_path / "cache"
    monkeypatch.setattr(WandaPrunePass, "prune", failing_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        prune(outlier_model_dir, texts, cache, WandaPrunePass(pattern="2:4"))
    assert json.loads(next(cache.glob(".resume-prune-wanda-*/state.json")).read_text())["next_block"] == 1

    calls.clear()
    resumed = prune(outlier_model_dir, texts, cache, WandaPrunePass(pattern="2:4"))
    assert len(calls) == 7  # block 1 only
    assert resumed.pruning == uninterrupted.pruning and resumed.sparsity == uninterrupted.sparsity
    ours = load_file(next((cache / resumed.model.checkpoint).glob("*.safetensors")))
    theirs = load_file(next((tmp_path / "whole" / uninterrupted.model.checkpoint).glob("*.safetensors")))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not list(cache.glob(".resume-*"))
