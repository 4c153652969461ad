"""Parameter counts that must match the papers (exact numbers stated)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from lmforge.model import ModelConfig, parameter_count


def test_gpt2_124m_exact() -> None:
    assert parameter_count(ModelConfig.from_preset("gpt2-124m")) == 124_439_808


def test_tiny_is_small_and_untied() -> None:
    cfg = ModelConfig.from_preset("tiny", vocab_size=8000)
    # 2*8000*128 embeddings/head + 4 layers * (attn 128*(128+2*64)+128*128 + mlp 3*128*384
    # + 2 norms of 128) + final norm 128.
    per_layer = 128 * 256 + 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert parameter_count(cfg) == 2 * 8000 * 128 + 4 * per_layer + 128


def test_transformer_2017_table3() -> None:
    # Paper, Table 3: base 65M, big 213M (rounded; shared 37000-token vocabulary, tied
    # source/target/output embeddings, sinusoidal positions). Exact counts here:
    base = parameter_count(ModelConfig.from_preset("transformer-base"))
    big = parameter_count(ModelConfig.from_preset("transformer-big"))
    assert base == 63_082_496 and big == 214_245_376
    assert abs(base / 65e6 - 1) < 0.05 and abs(big / 213e6 - 1) < 0.05


def test_bert_base_about_110m() -> None:
    # BertForMaskedLM layout (no pooler): 109,514,298; the paper's "110M".
    count = parameter_count(ModelConfig.from_preset("bert-base"))
    assert count == 109_514_298
    assert abs(count / 110e6 - 1) < 0.01


def test_llama_presets_sizes() -> None:
    sizes = {name: parameter_count(ModelConfig.from_preset(name, vocab_size=32000))
             for name in ("llama-125m", "llama-350m", "llama-1b")}
    assert sizes["llama-1b"] == 1_100_048_384  # TinyLlama-1.1B
    assert 115e6 < sizes["llama-125m"] < 135e6 and 330e6 < sizes["llama-350m"] < 370e6


def test_every_public_name_of_the_package_resolves() -> None:
    # lmforge.model loads its names on first use (so lmforge.model.config is torch-free).
    import lmforge.model as model
    from lmforge.model.decoder import DecoderLM

    assert model.DecoderLM is DecoderLM
    assert all(getattr(model, name) is not None for name in model.__all__)
    # No exported name is also a submodule's: importing that submodule would bind the
    # module to the package attribute, and `from lmforge.model import name` would give it.
    assert not [name for name in model.__all__ if inspect.ismodule(getattr(model, name))]
    code = ("from lmforge.model import generate_seq2seq\n"
            "from lmforge.model import generate\n"
            "assert callable(generate), generate\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    with pytest.raises(AttributeError, match="no attribute 'Decoder'"):
        model.Decoder  # noqa: B018


def test_counting_on_the_meta_device_does_not_import_the_compiler() -> None:
    # Every training start counts the model for FLOPs/MFU; the random initialisers' meta
    # kernels would import torch._dynamo and inductor (~2 s per rank) for nothing.
    code = ("import sys\n"
            "from lmforge.model import ModelConfig, parameter_count\n"
            "from lmforge.model.estimates import estimate_flops\n"
            "cfg = ModelConfig.from_preset('gpt2-124m')\n"
            "assert parameter_count(cfg) == 124_439_808\n"
            "assert estimate_flops(cfg, 64) > 0\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
