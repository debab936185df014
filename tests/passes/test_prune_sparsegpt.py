"""SparseGPT on bare tensors with known Hessians (patterns, OBS update, joint quantization), and
the pass: N:M weights through joint GPTQ, the planner and the ONNX export."""

from __future__ import annotations

import pytest
import torch

from llmc.checkpoint import load_packed
from llmc.passes.calibrate import CalibratePass
from llmc.passes.ingest import IngestPass
from llmc.passes.prune_sparsegpt import SparseGptPrunePass, sparsegpt_prune
from llmc.passes.quantize_gptq import GptqQuantizePass, HessianAccumulator, gptq_quantize, output_error
from llmc.passes.quantize_rtn import rtn_quantize
from llmc.passes.sparsity import MeanSquareAccumulator, magnitude_scores, n_m_mask, n_m_violations, row_ratio_mask, wanda_scores
from llmc.pipeline import run_pipeline
from llmc.pruning import Sparsity
from llmc.schemes import QuantizationRules
from llmc.testing import TINY_TEXT


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(columns=128, rows=2048, seed=0) -> torch.Tensor:
    """Inputs with correlated columns of unequal scale, as a transformer's activations have
    (scales shuffled, so neighbouring inputs, which N:M groups compare, differ too)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) * 0.3
    scales = torch.linspace(0.2, 3.0, columns)[torch.randperm(columns, generator=generator)]
    return (torch.randn(rows, columns, generator=generator) @ mixing + torch.randn(rows, columns, generator=generator)) * scales


@pytest.fixture(scope="module")
def layer():
    x = correlated_inputs()
    accumulator = HessianAccumulator(128)
    accumulator.add(x)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    return weight, accumulator.hessian(), x


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_keeps_at_most_n_of_every_m_and_exactly_m_minus_n_zeros(layer, n, m):
    weight, hessian, _ = layer
    result = sparsegpt_prune(weight, hessian, Sparsity.from_pattern(f"{n}:{m}"))
    assert n_m_violations(result.weight, n, m) == 0
    assert (result.mask.reshape(48, -1, m).sum(dim=2) == m - n).all()
    assert torch.equal(result.weight == 0, result.mask)  # kept weights were updated, none became 0


def test_unstructured_ratio_holds_per_block(layer):
    weight, hessian, _ = layer
    result = sparsegpt_prune(weight, hessian, Sparsity(0.5), block_size=32)
    per_block = result.mask.reshape(48, 4, 32).sum(dim=(0, 2))
    assert (per_block == 48 * 16).all()


@pytest.mark.parametrize("sparsity", ["50%", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_in_output_error(layer, sparsity):
    weight, hessian, x = layer
    s = Sparsity(0.5) if sparsity == "50%" else Sparsity.from_pattern(sparsity)
    squares = MeanSquareAccumulator(128)
    squares.add(x)

    def masked(scores):
        return weight.masked_fill(row_ratio_mask(scores, 0.5) if s.n is None else n_m_mask(scores, 2, 4), 0.0)

    magnitude = output_error(weight, masked(magnitude_scores(weight)), hessian)
    wanda = output_error(weight, masked(wanda_scores(weight, squares.mean_square())), hessian)
    result = sparsegpt_prune(weight, hessian, s)
    assert result.loss == pytest.approx(output_error(weight, result.weight, hessian), rel=1e-4)
    # Measured: 50% 39178 / 16550 / 13038, 2:4 67654 / 41685 / 27478.
    assert result.loss < 0.85 * wanda and wanda < 0.7 * magnitude


def test_a_given_mask_is_kept_and_the_update_lowers_the_error(layer):
    weight, hessian, x = layer
    squares = MeanSquareAccumulator(128)
    squares.add(x)
    mask = row_ratio_mask(wanda_scores(weight, squares.mean_square()), 0.5)
    result = sparsegpt_prune(weight, hessian, mask=mask)
    assert torch.equal(result.mask, mask) and torch.equal(result.weight == 0, mask)
    assert result.loss < 0.9 * output_error(weight, weight.masked_fill(mask, 0.0), hessian)  # measured 0.81


@pytest.mark.parametrize("symmetric", [True, False])
def test_joint_quantization_keeps_the_pattern_in_the_codes(layer, symmetric):
    weight, hessian, _ = layer
    result = sparsegpt_prune(weight, hessian, Sparsity.from_pattern("2:4"), bits=4, group_size=32, symmetric=symmetric)
    packed = result.packed
    assert torch.equal(packed.dequantize(), result.weight)  # what export reads is what the loop optimised
    zero = 0 if symmetric else packed.zero.repeat_interleave(32, dim=1)
    assert ((packed.q == zero) | ~result.mask).all()  # removed weights hold the zero point's code
    assert n_m_violations(packed.dequantize(), 2, 4) == 0
    low, high = (-8, 7) if symmetric else (0, 15)
    assert packed.q.min() >= low and packed.q.max() <= high
    # Joint beats pruning, then quantizing the survivors by rounding.
    pruned = sparsegpt_prune(weight, hessian, Sparsity.from_pattern("2:4")).weight
    rounded = rtn_quantize(pruned, 4, 32, symmetric).dequantize()
    assert result.loss < output_error(weight, rounded, hessian)


def test_dense_mask_is_gptq(layer):
    weight, hessian, _ = layer
    joint = sparsegpt_prune(weight, hessian, mask=torch.zeros_like(weight, dtype=torch.bool), bits=4, group_size=32)
    assert torch.equal(joint.packed.q, gptq_quantize(weight, hessian, 4, 32, True).packed.q)


def test_declines_what_it_cannot_do(layer):
    weight, hessian, _ = layer
    for kwargs, message in [
        (dict(sparsity=Sparsity.from_pattern("4:12")), "groups of 12 do not divide"),
        (dict(sparsity=Sparsity(0.5), mask=torch.zeros_like(weight, dtype=torch.bool)), "exactly one"),
        (dict(sparsity=Sparsity(0.5), bits=5), "bits must be one of"),
        (dict(sparsity=Sparsity(0.5), bits=4, group_size=48), "does not divide"),
    ]:
        with pytest.raises(ValueError, match=message):
            sparsegpt_prune(weight, hessian, **kwargs)
    with pytest.raises(ValueError, match="does not fit"):
        sparsegpt_prune(weight, hessian[:64, :64], Sparsity(0.5))


# --------------------------------------------------------------------------- the pass


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    (folder / "calib.txt").write_text(TINY_TEXT)
    return folder / "calib.txt"


def run(model_dir, text, cache, *passes):
    base = [IngestPass(source=model_dir), CalibratePass(text=text, seq_len=32, windows=8)]
    return run_pipeline(base + list(passes), cache_root=cache, seed=0, verify=True, show_progress=False).program


def test_joint_gptq_quantizes_the_pruned_linears_and_gptq_keeps_them(tmp_path, tiny_model_dir, texts):
    from llmc.pruning import PruneOverride

    cache = tmp_path / "cache"
    quantization = QuantizationRules(method="gptq", bits=4, group_size=32)
    prune = SparseGptPrunePass(pattern="2:4", overrides=(PruneOverride("model.layers.0.*", ratio=0.0),),
                               quantization=quantization)
    program = run(tiny_model_dir, texts, cache, prune, GptqQuantizePass(**vars(quantization)))
    decisions = {d.module: d for d in program.quantization}
    assert len(decisions) == 28 and {d.method for d in decisions.values()} == {"gptq"}
    packed = load_packed(cache / program.quantized_weights)
    sparse = {d.module for d in program.sparsity}
    assert len(sparse) == 21 and not any(m.startswith("model.layers.0.") for m in sparse)
    for name in sparse:  # the GPTQ pass did not refill the zeros
        assert n_m_violations(packed[name].dequantize(), 2, 4) == 0
    assert n_m_violations(packed["model.layers.0.mlp.up_proj"].dequantize(), 2, 4) > 0


def test_pruned_2_4_model_compiles_through_export(tmp_path, configs):
    """The real pipeline: prune-sparsegpt 2:4, plan, RTN, evaluate (against the unpruned model),
    export; the ORT check passes and the exported weights hold the pattern the engine build reads."""
    import onnx

    from llmc.config import load_cluster_config, load_model_config
    from llmc.passes.build_engines import n_m_violations as exported_violations
    from llmc.passes.build_engines import weight_nonzeros
    from llmc.pipeline import build_pipeline

    model_yaml, cluster_yaml = configs
    model_yaml.write_text(model_yaml.read_text().replace("max_perplexity_increase_pct: 50", "max_perplexity_increase_pct: 500")
                          + "pruning:\n  method: sparsegpt\n  pattern: '2:4'\n")
    config, base = load_model_config(model_yaml)
    _, cluster = load_cluster_config(cluster_yaml)
    passes = build_pipeline(config, base)
    names = [p.name for p in passes]
    assert names[:6] == ["ingest", "calibrate", "prune-sparsegpt", "plan", "quantize-rtn", "evaluate"]
    program = run_pipeline(passes[: names.index("export") + 1], cache_root=tmp_path / "cache", seed=0,
                           cluster=cluster, show_progress=False).program
    assert program.measurement("export.greedy_tokens_match").value == 1.0
    reference, compressed = program.measurement("perplexity.reference"), program.measurement("perplexity.compressed")
    assert compressed.value != reference.value  # measured against the unpruned model
    assert len(program.sparsity) == 28
    graph = onnx.load(str(tmp_path / "cache" / next(a.ref for a in program.artifacts if a.kind == "onnx")))
    for decision in program.sparsity:
        assert exported_violations(weight_nonzeros(graph, decision.module), 2, 4) == 0
