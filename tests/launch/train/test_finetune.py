"""Fine-tuning inside the training worker and export: trainable subsets (freezing, LoRA),
warm starts (weights from a checkpoint or a Hugging Face folder; optimizer, schedule and
loader kept or reset), the task objectives and their metrics, and the exports of a
classifier and of a LoRA run.

The unit tests use tiny models and hand-built batches; the DeepSpeed tests (marked slow)
train 2 processes on gloo through ``lmforge train`` on fixture shards, a few steps each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import finish, losses, shard_fixtures, train

from lmforge.launch.config import ExportConfig, InitConfig, TrainableConfig, TrainConfig
from lmforge.launch.export.from_checkpoint import export_checkpoint, load_trained_model
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.objectives import IGNORE_INDEX, SpecialIds, build_objective
from lmforge.launch.train.optim import build_optimizer, lr_factor, param_groups
from lmforge.launch.train.task_metrics import classification_metrics, generation_metrics
from lmforge.launch.train.trainable import apply_trainable, merge_lora
from lmforge.launch.train.warm_start import (
    WarmStartError,
    load_source_weights,
    resolve,
    set_schedule_position,
)
from lmforge.model import ModelConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import file_sha256

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[3]
IDS = SpecialIds(pad=0, eos=3, mask=None, never_masked=(0, 1, 2, 3))


def tiny(family: str = "decoder", **overrides) -> ModelConfig:
    """Small models of each family that export exactly (Llama, BERT, BART)."""
    if family == "decoder":
        sizes = dict(vocab_size=1000, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
        return ModelConfig.from_preset("tiny", **{**sizes, **overrides})
    common = dict(family=family, vocab_size=1000, n_layers=2, d_model=32, n_heads=4, d_ff=64,
                  max_seq_len=64, position="learned", norm="layernorm", norm_position="post",
                  activation="gelu", bias=True, tie_embeddings=True, embedding_norm=True,
                  init="bert")
    return ModelConfig(**{**common, **overrides})


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- trainable subsets ----------------------------------------------------------------------


@pytest.mark.parametrize("mode,expected", [
    ("freeze_embeddings", lambda n: not n.startswith(("tok_emb", "pos_emb", "type_emb",
                                                      "emb_norm"))),
    ("freeze_blocks", lambda n: not n.startswith(("tok_emb", "pos_emb", "type_emb",
                                                  "emb_norm", "layers.0."))),
    ("head_only", lambda n: n.startswith(("pooler.", "classifier."))),
    ("lora", lambda n: ".lora_" in n or n.startswith(("pooler.", "classifier."))),
])
def test_trainable_modes_choose_their_parameters(mode, expected):
    torch.manual_seed(0)
    model = tiny("encoder", num_labels=3).build()
    extra = {"freeze_blocks": 1} if mode == "freeze_blocks" else {}
    apply_trainable(model, TrainableConfig(mode=mode, **extra))
    names = {n for n, _ in model.named_parameters()}
    assert trainable_names(model) == {n for n in names if expected(n)}
    assert trainable_names(model)  # something trains
    if mode == "lora":  # adapters on qkv and out of both blocks, nothing else
        adapted = {n.split(".lora_")[0] for n in names if ".lora_" in n}
        assert adapted == {f"layers.{i}.attn.{p}" for i in range(2) for p in ("qkv", "out")}
    # The optimizer holds exactly the trainable parameters (no state for frozen ones).
    optimizer = build_optimizer(model, TrainConfig())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_lora_targets_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match=r"trainable.lora_targets: \['c_attn'\] match no"):
        apply_trainable(tiny().build(), TrainableConfig(mode="lora", lora_targets=["c_attn"]))


def test_freezing_everything_but_norms_leaves_no_empty_group():
    model = tiny().build()
    for name, param in model.named_parameters():
        param.requires_grad_("norm" in name)
    groups = param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("overrides,message", [
    (["--train.objective=classify"], "train.objective .*: classify trains the encoder's"),
    (["--init.schedule=keep"], "init.schedule .*: keep needs init.source"),
    (["--trainable.mode=freeze_blocks", "--trainable.freeze_blocks=9"],
     "trainable.freeze_blocks .*: 9 is more than the model's 4 blocks"),
    (["--trainable.lora_rank=0"], "trainable.lora_rank .*: must be at least 1"),
])
def test_fine_tuning_settings_are_checked_at_load(overrides, message):
    from lmforge.launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


def test_objective_must_fit_the_prepared_data(prepared, tmp_path):
    from lmforge.launch.config import load_config
    from lmforge.launch.config.dataset_check import DatasetMismatchError, config_for_dataset

    write_classify_shards(tmp_path / "task", prepared / "tokenizer.model", ["no", "yes"])
    task = DatasetManifest.read(tmp_path / "task" / "manifest.json")
    text = DatasetManifest.read(prepared / "manifest.json")
    encoder = ["--model.preset=bert-base", "--model.d_model=32", "--model.n_layers=2",
               "--model.n_heads=4", "--model.d_ff=64", "--data.seq_len=16",
               "--model.max_seq_len=16", "--tokenizer.vocab_size=1000"]
    cfg = load_config(REPO / "configs" / "tiny-bert.yaml", [*encoder, "--train.objective=classify"])
    assert config_for_dataset(cfg, task).model.num_labels == 2  # from the task's labels
    with pytest.raises(DatasetMismatchError, match="train.objective: classify needs classify "
                                                    "task data, but .* a pretraining corpus"):
        config_for_dataset(cfg, text)
    mlm = load_config(REPO / "configs" / "tiny-bert.yaml", encoder)
    with pytest.raises(DatasetMismatchError, match="masked_lm pretrains on a corpus, but .* "
                                                    "classify task data"):
        config_for_dataset(mlm, task)


# -- objectives and metrics against hand-computed values ------------------------------------


def test_sft_loss_counts_response_tokens_and_isolates_packed_examples():
    torch.manual_seed(0)
    model = tiny().build().eval()
    a, b = torch.randint(4, 1000, (5,)), torch.randint(4, 1000, (6,))
    row = torch.cat([a, b, torch.zeros(1, dtype=torch.long)])[None]  # (1, 12), one pad
    # Responses: the last 2 tokens of a, the last 3 of b. labels[t] = row[t + 1] there.
    labels = torch.full((1, 12), IGNORE_INDEX)
    labels[0, 2:4] = a[3:5]
    labels[0, 7:10] = b[3:6]
    batch = {"input_ids": row, "labels": labels,
             "segment_ids": torch.tensor([[0] * 5 + [1] * 6 + [2]]),
             "position_ids": torch.tensor([list(range(5)) + list(range(6)) + [0]])}
    objective = build_objective("sft", fixture_tokenizer(), 1000, False)
    out = objective(model, batch, torch.device("cpu"), torch.Generator())
    with torch.no_grad():  # each example alone, as if never packed
        la, lb = model(a[None])[0], model(b[None])[0]
    by_hand = torch.cat([F.cross_entropy(la[2:4], a[3:5], reduction="none"),
                         F.cross_entropy(lb[2:5], b[3:6], reduction="none")]).mean()
    assert out.targets == 5
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-5, atol=1e-5)


def fixture_tokenizer():
    """The fixture shards' tokenizer section (pad 0, unk 1, bos 2, eos 3, vocabulary 1000)."""
    from lmforge.pipeline.contract.dataset_manifest import TokenizerInfo

    return TokenizerInfo(file="tokenizer.model", sha256="0" * 64, vocab_size=1000, type="bpe",
                         pad_id=0, unk_id=1, bos_id=2, eos_id=3, special_tokens={},
                         extra_special_tokens=[], byte_fallback=True)


def test_classify_loss_is_cross_entropy_of_the_cls_head():
    torch.manual_seed(0)
    model = tiny("encoder", num_labels=3).build().eval()
    ids = torch.randint(4, 1000, (3, 8))
    ids[1, 5:] = 0  # padding
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(),
             "labels": torch.tensor([2, 0, IGNORE_INDEX])}  # a padding row of the last batch
    objective = build_objective("classify", fixture_tokenizer(), 1000, False,
                                labels=["a", "b", "c"])
    out = objective(model, batch, torch.device("cpu"), torch.Generator())
    with torch.no_grad():
        scores = model.classify(ids[:2], (ids[:2] != 0).long())
    torch.testing.assert_close(out.loss, F.cross_entropy(scores, torch.tensor([2, 0])))
    assert out.targets == 2 and out.references == [2, 0]
    assert out.predictions == scores.argmax(-1).tolist()


def test_classification_metrics_match_hand_computed_values():
    refs = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(preds, refs, ["neg", "pos", "mixed"])
    # neg: tp 2, predicted 2, actual 3 -> 4/5; pos: tp 1, 2, 2 -> 1/2; mixed: tp 1, 2, 1 -> 2/3
    assert m["val_accuracy"] == pytest.approx(4 / 6)
    assert m["val_f1/neg"] == pytest.approx(0.8)
    assert m["val_f1/pos"] == pytest.approx(0.5)
    assert m["val_f1/mixed"] == pytest.approx(2 / 3)
    assert m["val_macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class absent from references and predictions does not count in the macro mean.
    m = classification_metrics([0, 1], [0, 1], ["a", "b", "c"])
    assert m["val_macro_f1"] == 1.0 and m["val_f1/c"] == 0.0


def test_generation_metrics_match_sacrebleu():
    import sacrebleu

    hyps = ["the cat sat on the mat", "a dog ran", "hello world "]
    refs = ["the cat sat on the mat", "the dog ran away", "hello world"]
    m = generation_metrics(hyps, refs)
    assert m["val_exact_match"] == pytest.approx(2 / 3)
    assert m["val_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < m["val_bleu"] < 100


def test_seq2seq_uses_teacher_forcing_on_the_shifted_target():
    torch.manual_seed(0)
    model = tiny("encoder_decoder").build().eval()
    source = torch.tensor([[7, 8, 9, 3, 0, 0], [10, 11, 12, 13, 14, 3]])
    target = torch.tensor([[20, 21, 3, 0, 0, 0], [22, 23, 24, 3, 0, 0]])
    batch = {"input_ids": source, "attention_mask": (source != 0).long(), "target_ids": target}
    objective = build_objective("seq2seq", fixture_tokenizer(), 1000, False,
                                decode=False)
    out = objective(model, batch, torch.device("cpu"), torch.Generator())
    decoder_input = torch.tensor([[3, 20, 21, 0, 0, 0], [3, 22, 23, 24, 0, 0]])
    labels = target.masked_fill(target == 0, IGNORE_INDEX)
    with torch.no_grad():
        logits = model(source, decoder_input, (source != 0).long())
    by_hand = F.cross_entropy(logits.reshape(-1, 1000), labels.reshape(-1))
    assert out.targets == 7
    torch.testing.assert_close(out.loss, by_hand)


def test_seq2seq_evaluation_decodes_greedily_to_text(prepared):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    torch.manual_seed(0)
    model = tiny("encoder_decoder").build().eval()
    target = torch.zeros(3, 12, dtype=torch.long)
    for row, text in enumerate(["To be, or not", "hear me speak"]):
        ids = sp.encode(text) + [3]
        target[row, : len(ids)] = torch.tensor(ids)
    source = target.clone()  # row 2: a padding row of the last batch
    batch = {"input_ids": source, "attention_mask": (source != 0).long(), "target_ids": target}
    objective = build_objective("seq2seq", fixture_tokenizer(), 1000, False,
                                tokenizer_model=DatasetManifest.read(prepared).tokenizer_model)
    out = objective(model, batch, torch.device("cpu"), torch.Generator())
    assert out.references == ["To be, or not", "hear me speak"]
    from lmforge.model import generate_seq2seq

    longest = int((target != 0).sum(-1).max())  # decoding stops there (or at eos)
    greedy = generate_seq2seq(model, source[:2], longest, decoder_start_id=3,
                              attention_mask=(source[:2] != 0).long(), eos_id=3)
    tails = [row[1:] for row in greedy.tolist()]  # after the decoder start
    expected = [sp.decode(t[: t.index(3)] if 3 in t else t) for t in tails]
    assert out.predictions == expected
    assert set(objective.metrics(out.predictions, out.references)) == {"val_exact_match",
                                                                        "val_bleu"}


# -- exports --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Fixture shards (decoder pretraining) with a real 1000-piece tokenizer beside them."""
    from test_export import train_spm

    root = tmp_path_factory.mktemp("finetune")
    shard_fixtures().write_shards(root / "data", {"d": {"train": [64, 64], "val": [16]}},
                                  seq_len=32)
    spm_model = train_spm(root / "spm")
    shutil.copyfile(spm_model, root / "data" / "tokenizer.model")
    manifest = root / "data" / "manifest.json"  # records the real tokenizer's sha256
    layout = json.loads(manifest.read_text())
    layout["tokenizer"]["sha256"] = file_sha256(spm_model)
    manifest.write_text(json.dumps(layout))
    return root / "data"


def test_classifier_export_loads_as_sequence_classification(prepared, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = tiny("encoder", num_labels=3)
    model = cfg.build().eval()
    manifest = DatasetManifest.read(prepared / "manifest.json")
    manifest.task = SimpleNamespace(kind="classify", labels=["negative", "neutral", "positive"])
    out = export_checkpoint(model, cfg, ExportConfig(verify_atol=1e-5), manifest,
                            tmp_path / "export")
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "BertForSequenceClassification"
    assert hf.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ids = torch.randint(4, 1000, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model.classify(ids),
                                   rtol=0, atol=1e-5)


def test_lora_merged_export_is_the_plain_architecture_with_the_adapted_logits(
        prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny()
    model = cfg.build().eval()
    apply_trainable(model, TrainableConfig(mode="lora", lora_rank=4))
    for name, param in model.named_parameters():  # trained adapters: B no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    ids = torch.randint(4, 1000, (2, 12))
    with torch.no_grad():
        adapted = model(ids)
    merge_lora(model)
    assert not any("lora" in k for k in model.state_dict())
    manifest = DatasetManifest.read(prepared / "manifest.json")
    out = export_checkpoint(model, cfg, ExportConfig(verify_atol=1e-5), manifest,
                            tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, adapted, rtol=0, atol=1e-4)
    # The same folder starts a run: a Hugging Face warm start gives the source's logits,
    # here into a model whose vocabulary is padded beyond the export's rows.
    padded = tiny(pad_vocab_to_multiple_of=64)
    start = resolve(InitConfig(source=str(out)), padded, TrainableConfig())
    torch.manual_seed(1)
    target = padded.build().eval()
    assert load_source_weights(target, start) == []
    with torch.no_grad():
        torch.testing.assert_close(target(ids), adapted, rtol=0, atol=1e-4)
    with pytest.raises(WarmStartError, match="init.optimizer: keep needs a lmforge checkpoint"):
        resolve(InitConfig(source=str(out), optimizer="keep"), cfg, TrainableConfig())
    with pytest.raises(WarmStartError, match="another architecture: .*d_model=32"):
        load_source_weights(tiny(d_model=64).build(), start)


def test_new_classification_head_is_listed_and_the_body_loads(prepared, tmp_path):
    """An MLM encoder export warm-starts a classifier: body loaded, head newly initialised."""
    torch.manual_seed(0)
    mlm_cfg = tiny("encoder")
    mlm = mlm_cfg.build().eval()
    manifest = DatasetManifest.read(prepared / "manifest.json")
    out = export_checkpoint(mlm, mlm_cfg, ExportConfig(verify_atol=1e-5), manifest,
                            tmp_path / "mlm")
    cls_cfg = tiny("encoder", num_labels=2)
    classifier = cls_cfg.build().eval()
    start = resolve(InitConfig(source=str(out)), cls_cfg, TrainableConfig())
    fresh = load_source_weights(classifier, start)
    assert sorted(fresh) == ["classifier.bias", "classifier.weight", "pooler.bias",
                             "pooler.weight"]
    ids = torch.randint(4, 1000, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(classifier.encode(ids), mlm.encode(ids), rtol=0, atol=0)


def test_schedule_position_gives_this_runs_lr():
    model = torch.nn.Linear(2, 2)
    train = TrainConfig(lr=1e-3, warmup_steps=4, max_steps=10)
    optimizer = build_optimizer(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train))
    for group in optimizer.param_groups:  # what a source optimizer's state brings along
        group["lr"] = 7.0
    set_schedule_position(scheduler, train)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3 / 4] * len(optimizer.param_groups)
    scheduler.last_epoch = 6
    set_schedule_position(scheduler, train)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * lr_factor(6, train))


# -- through DeepSpeed ----------------------------------------------------------------------

CONFIG = """\
name: finetune
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
  loader: {{document_masking: true}}
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, d_ff: 64}}
train:
  micro_batch_size: 4
  log_every: 1
  eval_every: 0
  eval_batches: 1
  warmup_steps: 0
  lr_schedule: constant
  lr: 0.003
  precision: fp32
tracking: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def source_run(prepared, tmp_path_factory) -> tuple[Path, Path]:
    """6 steps of pretraining, checkpoints at 3 and 6: (config, run dir)."""
    tmp = tmp_path_factory.mktemp("source")
    config = tmp / "finetune.yaml"
    config.write_text(CONFIG.format(data=prepared))
    run = tmp / "source"
    finish(train(config, run, "--train.max_steps=6", "--train.checkpoint_every=3"))
    return config, run


def metrics_at(run: Path, step: int) -> dict:
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] == step and "train/lr" in record:
            return record
    raise AssertionError(f"no step {step} in {run}")


@pytest.mark.slow
def test_keeping_optimizer_schedule_and_loader_continues_the_source_exactly(
        source_run, tmp_path):
    config, source = source_run
    step3 = source / "checkpoints" / "step_00000003"
    kept = tmp_path / "kept"
    finish(train(config, kept, "--train.max_steps=3", f"--init.source={step3}",
                 "--init.optimizer=keep", "--init.schedule=keep", "--init.loader=keep"))
    a, b = losses(source), losses(kept)
    assert [b[s] for s in (1, 2, 3)] == [a[s] for s in (4, 5, 6)]
    # Optimizer kept, schedule reset, another peak and warm-up: step 1 runs at the new
    # schedule's lr, not the source's last one.
    reset = tmp_path / "reset"
    finish(train(config, reset, "--train.max_steps=1", f"--init.source={step3}",
                 "--init.optimizer=keep", "--train.lr=0.001", "--train.warmup_steps=4",
                 "--train.lr_schedule=cosine"))
    assert metrics_at(reset, 1)["train/lr"] == pytest.approx(0.001 / 4)


@pytest.mark.slow
def test_frozen_blocks_stay_bit_identical_and_have_no_optimizer_state(source_run, tmp_path):
    config, source = source_run
    run = tmp_path / "frozen"
    finish(train(config, run, "--train.max_steps=2", f"--init.source={source}",
                 "--trainable.mode=freeze_blocks", "--trainable.freeze_blocks=1",
                 "--deepspeed.zero_stage=2"))
    before = ckpt.consolidated_state_dict(source / "checkpoints" / "step_00000006")
    folder = run / "checkpoints" / "step_00000002"
    after = ckpt.consolidated_state_dict(folder)
    frozen = [k for k in before if k.startswith(("tok_emb", "layers.0."))]
    trained = [k for k in before if k not in frozen]  # layers.1, final_norm, untied lm_head
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    states = ckpt.read_model_states(folder)
    in_optimizer = {n for group in states["param_shapes"] for n in group}
    assert in_optimizer == set(trained)
    assert set(states["frozen_param_shapes"]) == set(frozen)
    # A warm start from a checkpoint gives the source's logits.
    from lmforge.launch.config import load_resolved

    cfg = load_resolved(source)
    start = resolve(InitConfig(source=str(source)), cfg.model, TrainableConfig())
    model = cfg.model.build().eval()
    load_source_weights(model, start)
    reference = load_trained_model(cfg.model, source / "checkpoints")
    ids = torch.randint(4, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    # Keeping the optimizer needs the source's trainable set (its state is for those).
    with pytest.raises(WarmStartError, match="init.optimizer: keep needs the same model and "
                                             "trainable sections"):
        resolve(InitConfig(source=str(source), optimizer="keep"), cfg.model,
                TrainableConfig(mode="lora"))


@pytest.mark.slow
def test_lora_trains_only_adapters_resumes_exactly_and_exports_merged(source_run, tmp_path):
    config, source = source_run
    lora = ["--trainable.mode=lora", "--trainable.lora_rank=4", "--train.max_steps=4",
            "--train.checkpoint_every=2", f"--init.source={source}"]
    straight = tmp_path / "straight"
    finish(train(config, straight, *lora))
    resumed = tmp_path / "resumed"
    finish(train(config, resumed, *lora, resume=str(straight / "checkpoints" / "step_00000002")))
    a, b = losses(straight), losses(resumed)
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)] and a[4] != a[1]
    base = ckpt.consolidated_state_dict(source / "checkpoints" / "step_00000006")
    tuned = ckpt.consolidated_state_dict(straight / "checkpoints" / "step_00000004")
    for key, value in base.items():  # every base weight untouched, under peft's name
        name = key.replace(".qkv.", ".qkv.base_layer.").replace(".out.", ".out.base_layer.")
        assert torch.equal(tuned[name if name in tuned else key], value), key
    assert any(".lora_B." in k and tuned[k].abs().sum() > 0 for k in tuned)
    # Export: the adapters merged, the plain architecture, the adapted model's logits.
    from lmforge.launch.config import load_resolved

    cfg = load_resolved(straight)
    merged = load_trained_model(cfg.model, straight / "checkpoints")
    assert not any("lora" in k for k in merged.state_dict())
    reference = cfg.model.build()
    apply_trainable(reference, cfg.trainable)
    reference.load_state_dict(tuned)
    ids = torch.randint(4, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), reference.eval()(ids), rtol=0, atol=1e-5)
    # A warm start from the LoRA run's checkpoint gives the same (merged) logits.
    start = resolve(InitConfig(source=str(straight)), cfg.model, TrainableConfig())
    fresh = cfg.model.build().eval()
    load_source_weights(fresh, start)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), merged(ids), rtol=0, atol=1e-6)
    assert math.isfinite(a[4])


CLASSIFY = """\
name: classify
data:
  task: {{kind: classify, train: [unused.jsonl]}}
  output_dir: {data}
  seq_len: 16
tokenizer: {{model_path: {data}/tokenizer.model}}
model: {{preset: bert-base, d_model: 32, n_layers: 2, n_heads: 4, d_ff: 64, max_seq_len: 16,
         dropout: 0.0}}
train:
  objective: classify
  micro_batch_size: 4
  max_steps: 3
  log_every: 1
  eval_every: 0
  eval_batches: 0
  warmup_steps: 0
  precision: fp32
trainable: {{mode: head_only}}
tracking: {{enabled: false}}
"""


def write_classify_shards(root: Path, spm_model: Path, labels: list[str]) -> None:
    """Task shards in the contract format (one example per sample, ``label.npy``): the
    label is the parity of the first token."""
    import hashlib

    import numpy as np
    import webdataset as wds

    rng = np.random.default_rng(0)
    (root / "task").mkdir(parents=True)
    splits, task_splits = {}, {}
    for split, count in (("train", 32), ("val", 10)):
        path = root / "task" / f"{split}-000000.tar"
        counts = dict.fromkeys(labels, 0)
        with wds.TarWriter(str(path), mtime=0) as sink:
            for index in range(count):
                length = int(rng.integers(4, 15))
                tokens = np.zeros(17, dtype=np.uint16)
                tokens[:length] = rng.integers(4, 1000, length)
                label = int(tokens[0] % 2)
                counts[labels[label]] += 1
                sink.write({"__key__": f"task-{split}-{index:08d}", "tokens.npy": tokens,
                            "doc_starts.npy": np.zeros(1, dtype=np.int32),
                            "label.npy": np.array(label, dtype=np.int64)})
        shard = {"path": f"task/{split}-000000.tar", "samples": count, "tokens": count * 17,
                 "bytes": path.stat().st_size,
                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        splits[split] = {"samples": count, "tokens": count * 17, "padding_tokens": 0,
                         "shards": [shard]}
        task_splits[split] = {"examples": count, "label_counts": counts}
    shutil.copyfile(spm_model, root / "tokenizer.model")

    manifest = {
        "version": 1, "seq_len": 16, "token_dtype": "uint16",
        "tokenizer": {"file": "tokenizer.model", "sha256": file_sha256(spm_model),
                      "vocab_size": 1000, "type": "bpe", "pad_id": 0, "unk_id": 1,
                      "bos_id": 2, "eos_id": 3, "special_tokens": {}, "byte_fallback": True},
        "datasets": {"task": {"weight": 1.0, "sources": ["fixture"], "splits": splits}},
        "fingerprint": "classify-fixture", "stats": {},
        "task": {"kind": "classify", "labels": labels, "splits": task_splits},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.mark.slow
def test_classify_trains_the_head_reports_metrics_and_exports(prepared, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lmforge.launch.config import load_resolved

    labels = ["even", "odd"]
    write_classify_shards(tmp_path / "data", prepared / "tokenizer.model", labels)
    config = tmp_path / "classify.yaml"
    config.write_text(CLASSIFY.format(data=tmp_path / "data"))
    run = tmp_path / "run"
    finish(train(config, run))
    summary = json.loads((run / "train_summary.json").read_text())
    metrics = summary["val_metrics"]
    assert set(metrics) == {"val_loss", "val_accuracy", "val_macro_f1", "val_f1/even",
                            "val_f1/odd"}
    # 10 validation examples over 2 ranks: accuracy is a multiple of 1/10.
    assert round(metrics["val_accuracy"] * 10, 6) == round(metrics["val_accuracy"] * 10)
    cfg = load_resolved(run)
    assert cfg.model.num_labels == 2  # from the manifest's labels
    model = load_trained_model(cfg.model, run / "checkpoints")
    manifest = DatasetManifest.read(tmp_path / "data" / "manifest.json")
    out = export_checkpoint(model, cfg.model, cfg.export, manifest, tmp_path / "export")
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "even", 1: "odd"}
    ids = torch.randint(4, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model.classify(ids),
                                   rtol=0, atol=1e-5)
