"""The run's tokenizer into an export, verified id for id: `write_tokenizer`.

A dataset encoded with a Hugging Face tokenizer (``tokenizer.kind: hf``) exports the same
files (``tokenizer.json``, ``tokenizer_config.json``, ...), byte for byte, and
`hf_source.verify_hf_tokenizer` checks that `AutoTokenizer` on the export gives the ids the
data was encoded with. A sentencepiece model is converted (`export_tokenizer`), as follows.

Sentencepiece model -> Hugging Face fast tokenizer, verified id for id.

Why not `LlamaTokenizer(vocab_file=...)`: in transformers 5.x `LlamaTokenizer` (and its alias
`LlamaTokenizerFast`) is a `tokenizers` backend whose constructor takes `vocab=`/`merges=`;
`vocab_file=` lands in `**kwargs` and is ignored, so the tokenizer holds only
`<unk>, <s>, </s>`, no merges and no byte pieces, and encodes every text to `[]`. Its
Metaspace pre-tokenizer also skips the dummy prefix when a text starts with a space, and the
transformers `SpmConverter` strips and collapses whitespace, which our models
(`remove_extra_whitespaces=False`) never do.

So the `tokenizers.Tokenizer` is built here from the sentencepiece model proto:

- model: BPE with every piece at its sentencepiece id and merges for every split of a normal
  piece into two mergeable pieces, ranked by the merged piece's score (sentencepiece merges
  the best-scoring adjacent pair whose concatenation is a piece); or Unigram with the
  pieces' scores. Byte fallback on, as in training.
- normalizer: spaces -> "▁", and the dummy "▁" prefix prepended to the whole text
  (`\\A` regex, so also before a leading space or a leading special token, as sentencepiece
  does). Added tokens are `normalized=True` so the text is normalized once, as one piece.
- pre-tokenizer: sentencepiece's word split (a run of "▁" then non-"▁" characters); no
  piece crosses it, so it only keeps words short for the BPE cache. For unigram, literal
  "<0x..>" text is also cut after "<" so the lattice cannot match it to a byte piece.
- control pieces (pad/unk/bos/eos) and user-defined symbols become special added tokens.

Known differences, both inherent to Hugging Face added tokens: a text that *is* exactly one
special-token string (e.g. "<mask>") gets no dummy prefix ("▁"), and special-token strings
inside text ("<s>") become the special id where sentencepiece spells them out. Unigram
models match on ordinary texts; on very long texts sentencepiece's float32 Viterbi can break
near-ties differently from the float64 one in `tokenizers`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from lmforge.launch.export import ExportError
from lmforge.launch.export.hf_source import check_hf_source, verify_hf_tokenizer
from lmforge.pipeline.contract.dataset_tokenizer import HF, DatasetTokenizer

SPACE = "\u2581"  # sentencepiece's whitespace symbol "▁"
_Piece = spm_pb2.ModelProto.SentencePiece
_BPE, _UNIGRAM = spm_pb2.TrainerSpec.BPE, spm_pb2.TrainerSpec.UNIGRAM



# Varied strings every export is checked on: whitespace runs and edges, newlines, tabs,
# digits (split_digits), punctuation, accents, CJK and emoji (byte fallback).
DEFAULT_VERIFY_TEXTS: list[str] = [
    "The king",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "hello world",
    "two  spaces",
    "three   spaces and    four",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    " both ",
    " ",
    "    ",
    "line one\nline two\n",
    "\nstarts with a newline",
    "blank\n\n\nlines",
    "tab\tseparated\tvalues",
    "\t indented with tab and space",
    "mixed \t\n whitespace \n\t",
    "digits 0123456789 and 3.14159",
    "year 2026, 1,000,000 people",
    "x=1; y = 2*(x+3) - 4/5",
    "punctuation!? ... -- 'quotes' \"double\" (parens) [brackets] {braces}",
    "naïve café résumé Ångström",
    "Größe straße Ærø",
    "Привет, мир",
    "Γειά σου Κόσμε",
    "中文字符和标点。",
    "日本語のテキスト",
    "한국어 텍스트",
    "emoji 😀🎉👍🏽 end",
    "👨‍👩‍👧 family",
    "مرحبا بالعالم",
    "ﬁ ligature and ½ fraction",
    "KING RICHARD III:\nWhat say you, my lord?",
    "a",
    "I",
    "supercalifragilisticexpialidocious",
    "ALL CAPS SHOUTING",
    "mid\u00a0nbsp and zero\u200bwidth",
    "windows\r\nline endings\r\n",
    "<0x41> is text, not the byte piece",
]


def _load_proto(spm_model: str | Path) -> spm_pb2.ModelProto:
    """Parses a sentencepiece `.model` file, naming it in any error."""
    path = Path(spm_model)
    if not path.is_file():
        raise ExportError(f"{path}: sentencepiece model not found; pass the run's tokenizer.model")
    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise ExportError(f"{path}: not a sentencepiece model ({err})") from err
    if not proto.pieces:
        raise ExportError(f"{path}: sentencepiece model has no pieces")
    return proto


def _check_supported(proto: spm_pb2.ModelProto, path: str | Path) -> None:
    """Refuses sentencepiece options whose behaviour the converter does not reproduce."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type not in (_BPE, _UNIGRAM):
        problems.append(f"model_type={spm_pb2.TrainerSpec.ModelType.Name(trainer.model_type)}")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalization_rule_name={norm.name!r}")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=True")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=True")
    if not trainer.split_by_whitespace:
        problems.append("split_by_whitespace=False")
    if problems:
        raise ExportError(
            f"{path}: cannot convert a sentencepiece model trained with {', '.join(problems)}; "
            "lmforge exports models trained with model_type bpe or unigram, "
            "normalization_rule_name='identity' and remove_extra_whitespaces=False"
        )


def _bpe_merges(pieces: list[_Piece]) -> list[tuple[str, str]]:
    """Merges reproducing sentencepiece BPE: every split of a normal piece into two pieces.

    Sentencepiece merges, among adjacent symbol pairs whose concatenation is a piece, the one
    with the best piece score; so every such pair is a merge, ranked by that score. Byte and
    control pieces never take part in merges.
    """
    mergeable = {p.piece for p in pieces if p.type in (_Piece.NORMAL, _Piece.USER_DEFINED)}
    ranked = []
    for piece_id, p in enumerate(pieces):
        if p.type != _Piece.NORMAL:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-p.score, piece_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(spm_model: str | Path) -> Tokenizer:
    """Builds a `tokenizers.Tokenizer` that encodes exactly like a sentencepiece model.

    Args:
        spm_model: Path of a sentencepiece `.model` (bpe or unigram, identity normalization).

    Returns:
        The tokenizer, with control pieces and user-defined symbols as special added tokens.

    Raises:
        ExportError: The file is missing, unreadable, or uses unsupported options.
    """
    proto = _load_proto(spm_model)
    _check_supported(proto, spm_model)
    trainer, pieces = proto.trainer_spec, list(proto.pieces)
    unk_piece = pieces[trainer.unk_id].piece

    if trainer.model_type == _BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces),
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    else:
        model = models.Unigram(
            [(p.piece, p.score) for p in pieces],
            unk_id=trainer.unk_id,
            byte_fallback=trainer.byte_fallback,
        )
    tokenizer = Tokenizer(model)

    specials = [
        p.piece for p in pieces if p.type in (_Piece.CONTROL, _Piece.UNKNOWN, _Piece.USER_DEFINED)
    ]
    steps = [normalizers.Replace(" ", SPACE)]
    if proto.normalizer_spec.add_dummy_prefix:
        # Added-token strings are normalized with this same normalizer before matching, so
        # the prefix must skip a string that is exactly one of them, or "<mask>" would only
        # match as "▁<mask>".
        exact_special = "|".join(re.escape(s) for s in specials)
        steps.append(normalizers.Replace(Regex(rf"\A(?!(?:{exact_special})\z)"), SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    words = pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated")
    if trainer.model_type == _UNIGRAM and trainer.split_digits:
        # Unigram's lattice would match literal "<0x41>" text to the byte piece, which
        # sentencepiece keeps out of its lattice. Cutting after "<" hides it and is exact:
        # with split_digits no piece spans "<" and the digit "0".
        byte_like = pre_tokenizers.Split(
            Regex("<(?=0x[0-9A-F]{2}>)"), behavior="merged_with_previous"
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([words, byte_like])
    else:
        tokenizer.pre_tokenizer = words
    decode_steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))  # sentencepiece drops one leading space
    tokenizer.decoder = decoders.Sequence(decode_steps)
    # normalized=True: the text is normalized (and given its dummy prefix) as a whole before
    # special tokens are split out, as sentencepiece does.
    tokenizer.add_special_tokens([AddedToken(s, normalized=True, special=True) for s in specials])
    return tokenizer


def _special_tokens(spm_model: str | Path) -> tuple[dict[str, str], list[str]]:
    """({HF role, e.g. "bos_token": piece}, user-defined pieces) of a sentencepiece model."""
    proto = _load_proto(spm_model)
    trainer, pieces = proto.trainer_spec, list(proto.pieces)
    roles = {}
    for role, piece_id in (
        ("pad_token", trainer.pad_id),
        ("unk_token", trainer.unk_id),
        ("bos_token", trainer.bos_id),
        ("eos_token", trainer.eos_id),
    ):
        if 0 <= piece_id < len(pieces):  # -1 disables a role in sentencepiece
            roles[role] = pieces[piece_id].piece
    user_defined = [p.piece for p in pieces if p.type == _Piece.USER_DEFINED]
    # lmforge's conventional names get their Hugging Face roles (masked-LM and seq2seq recipes).
    for role, piece in (("mask_token", "<mask>"), ("sep_token", "<sep>")):
        if piece in user_defined:
            roles[role] = piece
    return roles, user_defined


def export_tokenizer(
    spm_model: str | Path,
    out_dir: str | Path,
    *,
    add_bos_token: bool = False,
    add_eos_token: bool = False,
) -> None:
    """Writes a Hugging Face tokenizer for a sentencepiece model and verifies it.

    The folder gets what `save_pretrained` writes (`tokenizer.json`, `tokenizer_config.json`)
    and loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`.

    Args:
        spm_model: The run's sentencepiece `.model`.
        out_dir: Folder to write into (created if missing).
        add_bos_token: Whether `tokenizer(text)` prepends the bos id by default.
        add_eos_token: Whether `tokenizer(text)` appends the eos id by default.

    Raises:
        ExportError: The model cannot be converted, or the written tokenizer encodes or
            decodes any of `DEFAULT_VERIFY_TEXTS` differently from sentencepiece.
    """
    from transformers import PreTrainedTokenizerFast  # slow import; only when exporting

    roles, user_defined = _special_tokens(spm_model)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(spm_model),
        clean_up_tokenization_spaces=False,
        add_bos_token=add_bos_token,
        add_eos_token=add_eos_token,
        additional_special_tokens=user_defined,
        **roles,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out_dir))
    verify_tokenizer(spm_model, out_dir)


def verify_tokenizer(
    spm_model: str | Path, out_dir: str | Path, texts: list[str] | None = None
) -> None:
    """Checks an exported tokenizer against sentencepiece, text by text.

    Loads `out_dir` with `AutoTokenizer.from_pretrained` and requires, for every text, the
    same ids as sentencepiece (without added bos/eos), the same decoded string as
    sentencepiece's decode of those ids, and the same ids for pad/unk/bos/eos and every
    user-defined symbol.

    Args:
        spm_model: The sentencepiece `.model` the tokenizer was exported from.
        out_dir: The exported Hugging Face tokenizer folder.
        texts: Texts to compare; `DEFAULT_VERIFY_TEXTS` plus user-defined symbols in context
            when None.

    Raises:
        ExportError: Naming the first text (or special token) that differs, with both results.
    """
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    hf = AutoTokenizer.from_pretrained(str(out_dir))
    where = f"tokenizer export {out_dir} (from {spm_model})"

    roles, user_defined = _special_tokens(spm_model)
    pieces = list(dict.fromkeys([*roles.values(), *user_defined]))
    for piece in pieces:
        if hf.convert_tokens_to_ids(piece) != sp.piece_to_id(piece):
            raise ExportError(
                f"{where}: special token {piece!r} has id {hf.convert_tokens_to_ids(piece)} in "
                f"Hugging Face but {sp.piece_to_id(piece)} in sentencepiece; re-export it"
            )

    if texts is None:
        texts = DEFAULT_VERIFY_TEXTS + [f"a {s} b{s}c {s}" for s in user_defined]
    for index, text in enumerate(texts):
        want = sp.encode(text)
        got = hf.encode(text, add_special_tokens=False)
        if got != want:
            raise ExportError(
                f"{where}: text #{index} {text!r} encodes to {got} in Hugging Face but {want} in "
                f"sentencepiece{_hint(text, pieces)}"
            )
        want_text = sp.decode(want)
        got_text = hf.decode(got, clean_up_tokenization_spaces=False)
        if got_text != want_text:
            raise ExportError(
                f"{where}: text #{index} {text!r} ids {got} decode to {got_text!r} in Hugging "
                f"Face but {want_text!r} in sentencepiece"
            )


def _hint(text: str, special_pieces: list[str]) -> str:
    """Explains the known Hugging Face added-token differences when a text hits one."""
    if text in special_pieces:
        return (
            " (a text that is exactly one special token gets no dummy prefix in Hugging Face; "
            "verify it in context instead)"
        )
    found = [p for p in special_pieces if p in text]
    if found:
        return (
            f" (Hugging Face reads the special-token strings {found} inside text as special "
            "tokens; sentencepiece spells control tokens out)"
        )
    return "; please report this text with the sentencepiece model"


def write_tokenizer(tokenizer: str | Path | DatasetTokenizer, out_dir: Path) -> None:
    """Writes the run's tokenizer into an export folder and verifies it.

    Args:
        tokenizer: The dataset's tokenizer handle, or a sentencepiece ``.model`` path.
        out_dir: The (temporary) export folder.

    Raises:
        ExportError: The tokenizer cannot be exported, or `AutoTokenizer` on the export
            encodes differently from the tokenizer the data was encoded with.
    """
    if isinstance(tokenizer, DatasetTokenizer) and tokenizer.kind == HF:
        try:
            files = tokenizer.read_files()  # each checked against the manifest's sha256
        except ValueError as err:
            raise ExportError(str(err)) from err
        for name, data in files.items():
            (out_dir / name).write_bytes(data)
        verify_hf_tokenizer(tokenizer, out_dir, DEFAULT_VERIFY_TEXTS)
        return
    spm_model = tokenizer.path if isinstance(tokenizer, DatasetTokenizer) else tokenizer
    if not Path(spm_model).is_file():
        raise ExportError(f"{spm_model}: sentencepiece model not found; pass the run's tokenizer")
    # The original model rides along for sentencepiece users and converters (llama.cpp);
    # AutoTokenizer reads tokenizer.json, and verification runs with both present.
    shutil.copyfile(spm_model, out_dir / "tokenizer.model")
    export_tokenizer(spm_model, out_dir)


def tokenizer_ids(tokenizer: str | Path | DatasetTokenizer) -> tuple[int, dict[str, int]]:
    """(vocabulary size, ``{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...}``)
    of the run's tokenizer; an id is -1 where the tokenizer has no such token.

    Raises:
        ExportError: A sentencepiece model path that is not a file.
    """
    if isinstance(tokenizer, DatasetTokenizer) and tokenizer.kind == HF:
        info = tokenizer.info
        return info.vocab_size, {"bos_token_id": info.bos_id, "eos_token_id": info.eos_id,
                                 "pad_token_id": info.pad_id}
    spm_model = tokenizer.path if isinstance(tokenizer, DatasetTokenizer) else tokenizer
    if not Path(spm_model).is_file():
        raise ExportError(f"{spm_model}: sentencepiece model not found; pass the run's tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    return sp.get_piece_size(), {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
                                 "pad_token_id": sp.pad_id()}


def check_tokenizer_source(model_path: str | Path | None) -> None:
    """Before a corpus is encoded with an HF tokenizer: `hf_source.check_hf_source` on the
    varied `DEFAULT_VERIFY_TEXTS` (nothing for sentencepiece)."""
    check_hf_source(model_path, DEFAULT_VERIFY_TEXTS)
