"""Hugging Face export folder: files, tied weights, atomic replace and logit parity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from lmforge.launch.export import ExportError
from lmforge.launch.export.hf_folder import MARKER, verify_logits, write_hf_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import (  # noqa: E402  (after the offline switch)
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"
IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def train_spm(prefix: Path, **overrides: object) -> Path:
    """A 1000-piece BPE sentencepiece model with lmforge's trainer options."""
    options = dict(
        input=str(CORPUS),
        model_prefix=str(prefix),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=["<mask>", "<sep>"],
        input_sentence_size=10000,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2,
    )
    options.update(overrides)
    spm.SentencePieceTrainer.train(**options)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm") / "spm")


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        **IDS,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128, **IDS)
    return GPT2LMHeadModel(config).eval()


def reference(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return input_ids, model(input_ids).logits


@pytest.mark.parametrize("tie", [False, True])
def test_llama_round_trip_matches_logits(tie: bool, spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie)
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(), spm_model)
    assert out == tmp_path / "hf"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        MARKER,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert json.loads((out / MARKER).read_text())["files"] == names[1:]
    assert (out / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tie)
    assert len(keys) == len(model.state_dict()) - int(tie)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 0,
    }
    input_ids, logits = reference(model)
    assert verify_logits(out, logits, input_ids, atol=1e-5) <= 1e-5


def test_gpt2_round_trip_matches_logits(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_gpt2()
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(), spm_model)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to transformer.wte.weight
    input_ids, logits = reference(model)
    assert verify_logits(out, logits, input_ids, atol=1e-5) <= 1e-5
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


def test_auto_classes_load_and_generate_greedy(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(), spm_model)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    prompt = tokenizer("First Citizen:", return_tensors="pt").input_ids
    assert prompt[0].tolist() == spm.SentencePieceProcessor(model_file=str(spm_model)).encode(
        "First Citizen:"
    )
    generated = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
    # The same greedy continuation, step by step, from the original model.
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert generated.tolist() == ids.tolist()
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_bfloat16_export_stores_bf16_weights(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie=True)
    out = write_hf_folder(
        tmp_path / "hf",
        model.config.to_dict(),
        model.state_dict(),
        spm_model,
        dtype=torch.bfloat16,
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # Parity against the same weights rounded to bf16, evaluated in fp32.
    model.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    input_ids, logits = reference(model)
    assert verify_logits(out, logits, input_ids, atol=1e-5) <= 1e-5


def test_verify_logits_reports_the_difference(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(), spm_model)
    input_ids, logits = reference(model)
    with pytest.raises(ExportError, match=r"differ from the trained model's by 0\.5"):
        verify_logits(out, logits + 0.5, input_ids)
    with pytest.raises(ExportError, match="logits of shape"):
        verify_logits(out, logits[:, :, :10], input_ids)


def test_verify_logits_names_missing_weights(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    state = model.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), state, spm_model)
    input_ids, logits = reference(model)
    with pytest.raises(ExportError, match=r"missing weights \['model.layers.1.mlp.up_proj"):
        verify_logits(out, logits, input_ids)


def test_tied_config_with_a_different_head_is_refused(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    config = model.config.to_dict() | {"tie_word_embeddings": True}
    with pytest.raises(ExportError, match="'lm_head.weight' differs from"):
        write_hf_folder(tmp_path / "hf", config, model.state_dict(), spm_model)
    assert not (tmp_path / "hf").exists()


def test_config_token_ids_must_match_the_tokenizer(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    config = model.config.to_dict() | {"bos_token_id": 1}
    with pytest.raises(ExportError, match="config.bos_token_id: 1 but .* has id 2"):
        write_hf_folder(tmp_path / "hf", config, model.state_dict(), spm_model)
    small = model.config.to_dict() | {"vocab_size": 500}
    with pytest.raises(ExportError, match="config.vocab_size: 500 is below the 1000 pieces"):
        write_hf_folder(tmp_path / "hf", small, model.state_dict(), spm_model)


def test_failed_export_keeps_the_previous_one(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(), spm_model)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Same vocabulary and ids, but a normalization the converter refuses: the failure comes
    # from the tokenizer step, after the weights were already written to the temp folder.
    nfkc = train_spm(tmp_path / "nfkc", normalization_rule_name="nmt_nfkc")
    other = tiny_llama(tie=True)
    with pytest.raises(ExportError, match="nmt_nfkc"):
        write_hf_folder(tmp_path / "hf", other.config.to_dict(), other.state_dict(), nfkc)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["hf"]


def test_successful_export_replaces_the_previous_one(spm_model: Path, tmp_path: Path) -> None:
    first, second = tiny_llama(tie=False), tiny_gpt2()
    write_hf_folder(tmp_path / "hf", first.config.to_dict(), first.state_dict(), spm_model)
    # A file an earlier export wrote and this one does not: listed in its marker, replaced.
    (tmp_path / "hf" / "stale.txt").write_text("from the old export")
    marker = json.loads((tmp_path / "hf" / MARKER).read_text())
    (tmp_path / "hf" / MARKER).write_text(json.dumps({**marker,
                                                      "files": marker["files"] + ["stale.txt"]}))
    out = write_hf_folder(
        tmp_path / "hf", second.config.to_dict(), second.state_dict(), spm_model
    )
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(json.loads((out / MARKER).read_text())["files"]) == sorted(
        p.name for p in out.iterdir() if p.name != MARKER)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def _run_directory(path: Path) -> Path:
    (path / "checkpoints" / "step_00000002").mkdir(parents=True)
    (path / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"w")
    (path / "mlflow.db").write_bytes(b"SQLite format 3\x00")
    (path / "config.yaml").write_text("name: mine\n")
    return path


@pytest.mark.parametrize("case,message", [
    ("other_model", "is not empty and is not an lmforge export (config.json, model.safetensors"),
    ("run_dir", "looks like a run directory (it holds checkpoints, config.yaml, mlflow.db)"),
    ("holds_run_dir", "is not empty and is not an lmforge export (my-run)"),
    ("export_plus_user_file", "an lmforge export that also holds files lmforge did not write "
                              "(README.md)"),
    ("a_file", "exists and is not a folder"),
    ("a_symlink", "exists and is not a folder"),
])
def test_an_export_never_replaces_a_folder_lmforge_did_not_write(
    case: str, message: str, spm_model: Path, tmp_path: Path
) -> None:
    """Issue 21: `lmforge export --out DIR` replaced whatever DIR held (another model, the
    run directory with its checkpoints and mlflow.db)."""
    model = tiny_llama(tie=False)
    out = tmp_path / "out"
    if case == "other_model":
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"someone else's weights")
    elif case == "run_dir":
        _run_directory(out.mkdir() or out)
    elif case == "holds_run_dir":
        _run_directory(out / "my-run")
    elif case == "export_plus_user_file":
        write_hf_folder(out, model.config.to_dict(), model.state_dict(), spm_model)
        (out / "README.md").write_text("my model card")
    elif case == "a_file":
        out.write_text("notes")
    else:
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    before = _tree(tmp_path)
    with pytest.raises(ExportError) as err:
        write_hf_folder(out, model.config.to_dict(), model.state_dict(), spm_model)
    assert str(err.value).startswith(f"{out}: the export folder ")
    assert message in str(err.value) and "choose another folder with --out" in str(err.value)
    assert _tree(tmp_path) == before  # nothing deleted, no temporary folder left


def test_an_export_fills_an_empty_folder(spm_model: Path, tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    (tmp_path / "hf").mkdir()
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(),
                          spm_model)
    assert (out / "model.safetensors").is_file() and (out / MARKER).is_file()


def test_bad_inputs_are_refused_before_writing(spm_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="config.model_type: 'resnet' is not a causal LM"):
        write_hf_folder(tmp_path / "hf", {"model_type": "resnet"}, {}, spm_model)
    model = tiny_llama(tie=False)
    with pytest.raises(ExportError, match="nope.model: sentencepiece model not found"):
        write_hf_folder(tmp_path / "hf", model.config.to_dict(), {}, tmp_path / "nope.model")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_verification_leaves_the_previous_export_untouched(
    spm_model: Path, tmp_path: Path
) -> None:
    model = tiny_llama(tie=False)
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(), spm_model)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tiny_gpt2()
    input_ids, logits = reference(other)
    checked = []

    def verify(folder: Path) -> None:  # sees the complete new folder, not the published one
        checked.append(json.loads((folder / "config.json").read_text())["model_type"])
        verify_logits(folder, logits + 0.25, input_ids)

    with pytest.raises(ExportError, match=r"differ from the trained model's by 0\.25 "):
        write_hf_folder(tmp_path / "hf", other.config.to_dict(), other.state_dict(), spm_model,
                        verify=verify)
    assert checked == ["gpt2"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("family", ["bert", "bart"])
def test_encoder_families_verify_with_their_auto_class(
    family: str, spm_model: Path, tmp_path: Path
) -> None:
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        BertForMaskedLM,
    )

    torch.manual_seed(0)
    sizes = dict(vocab_size=1000, max_position_embeddings=64, **IDS)
    if family == "bert":
        model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, **sizes))
    else:
        model = BartForConditionalGeneration(BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, **sizes))
    model.eval()
    config = model.config.to_dict() | {"architectures": [type(model).__name__]}
    out = write_hf_folder(tmp_path / "hf", config, model.state_dict(), spm_model)
    input_ids, target_ids = torch.randint(4, 1000, (2, 2, 12), generator=torch.Generator())
    extra = {"decoder_input_ids": target_ids} if family == "bart" else {}
    with torch.no_grad():
        logits = model(input_ids=input_ids, **extra).logits
    assert verify_logits(out, logits, input_ids, atol=1e-5, **extra) <= 1e-5
