"""A Hugging Face tokenizer (`tokenizer.json` + `tokenizer_config.json`), read with `tokenizers`
so that it encodes a text exactly as `transformers.AutoTokenizer.from_pretrained(folder)` does.

`AutoTokenizer` (transformers 5.x, `TokenizersBackend`) loads `tokenizer.json` as it is, then
changes two things from `tokenizer_config.json`, and `HFTokenizer` does the same:

- special tokens named in the config (``bos_token``, ``eos_token``, ``pad_token``, ...,
  ``extra_special_tokens``, ``added_tokens_decoder``) that `tokenizer.json` lacks are added
  as special tokens (new ids after the last one); ``special_tokens_map.json`` is read only
  when the config has no ``added_tokens_decoder`` (the legacy layout), and then wins;
- ``split_special_tokens`` sets whether special-token strings in text are split.

Whether bos/eos are added is `tokenizer.json`'s post-processor alone (Llama 3's prepends
``<|begin_of_text|>``): with a `tokenizer.json`, transformers 5 drops the config's
``add_bos_token`` / ``add_eos_token`` (transformers 4's Llama class rebuilt the post-processor
from them; lmforge follows the pinned transformers 5).

Not reproduced: tokenizer classes that rebuild their pre-tokenizer in their own constructor
(some model-specific classes), and transformers' regex patch for old Mistral tokenizers.
The export checks `AutoTokenizer` on the exported folder against this class on varied text,
so a difference is caught there (launch/export/hf_tokenizer.py).
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja")
"""The files of an HF tokenizer folder lmforge copies (those present); the first is required.
The chat template does not change encoding; it rides along for fine-tuning an export."""
ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
"""Special-token roles read from the config (``<role>_token``), in the order transformers
adds missing ones."""


def _content(value: Any) -> str | None:
    """The token string of a config entry (a string, or an AddedToken dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _added_token(value: Any) -> AddedToken | None:
    """A config entry as the AddedToken transformers makes of it (special, not normalized
    unless the dict says so)."""
    if isinstance(value, str) and value:
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and _content(value):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized")
                 if k in value}
        flags.setdefault("normalized", False)
        return AddedToken(value["content"], special=True, **flags)
    return None


class HFTokenizer:
    """A `tokenizers.Tokenizer` set up as `AutoTokenizer` sets it up, with its special ids.

    Args:
        tokenizer_json: The text of `tokenizer.json`.
        config: `tokenizer_config.json` parsed ({} without one).
        special_map: `special_tokens_map.json` parsed ({} without one).
        where: What to name in errors (the folder or file).

    Raises:
        ValueError: `tokenizer.json` is not a tokenizer `tokenizers` can read (names `where`).
    """

    kind = "hf"

    def __init__(self, tokenizer_json: str, config: dict[str, Any],
                 special_map: dict[str, Any], where: str) -> None:
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # tokenizers raises plain Exception on bad JSON
            raise ValueError(f"{where}: tokenizer.json is not a tokenizer the `tokenizers` "
                             f"library reads ({err}); point tokenizer.model_path at an HF "
                             "tokenizer folder or file") from err
        settings = dict(config)
        if "added_tokens_decoder" not in config:  # the legacy layout: the map wins
            settings.update(special_map)
        tok = self.tokenizer
        # In id order, as transformers adds them: the config's added tokens, then the roles
        # and extra special tokens that the tokenizer does not have yet.
        decoder = settings.get("added_tokens_decoder") or {}
        wanted = [_added_token(decoder[k]) for k in sorted(decoder, key=int)]
        wanted += [_added_token(settings.get(f"{role}_token")) for role in ROLES]
        extras = settings.get("extra_special_tokens") or settings.get(
            "additional_special_tokens") or []
        wanted += [_added_token(e) for e in extras] if isinstance(extras, list) else []
        vocab = tok.get_vocab(with_added_tokens=True)
        for token in wanted:
            if token is not None and token.content not in vocab:
                tok.add_special_tokens([token])
                vocab[token.content] = tok.token_to_id(token.content)
        self.roles = {role: _content(settings.get(f"{role}_token")) for role in ROLES}
        self.ids = {role: (tok.token_to_id(c) if c else None) for role, c in self.roles.items()}
        self.extras = [c for c in map(_content, extras if isinstance(extras, list) else [])
                       if c and tok.token_to_id(c) is not None]
        tok.encode_special_tokens = bool(settings.get("split_special_tokens", False))
        self.vocab_size = max(vocab.values(), default=-1) + 1  # ids need not be dense
        probe_with = tok.encode("a", add_special_tokens=True).ids
        probe_without = tok.encode("a", add_special_tokens=False).ids
        # Whether the tokenizer itself ends a text with eos (its post-processor): then
        # lmforge does not append a second one.
        self.adds_eos = (self.eos_id >= 0 and probe_with[-1:] == [self.eos_id]
                         and probe_without[-1:] != [self.eos_id])

    def _id(self, role: str) -> int:
        found = self.ids.get(role)
        return -1 if found is None else found

    @property
    def bos_id(self) -> int:
        """The bos id (-1 without one)."""
        return self._id("bos")

    @property
    def eos_id(self) -> int:
        """The eos id (-1 without one)."""
        return self._id("eos")

    @property
    def pad_id(self) -> int:
        """The pad id (-1 without one)."""
        return self._id("pad")

    @property
    def unk_id(self) -> int:
        """The unk id (-1 without one)."""
        return self._id("unk")

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """`AutoTokenizer.encode(text)`'s ids (``special_tokens=False``: the text's alone)."""
        return self.tokenizer.encode(text, add_special_tokens=special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, special tokens added, in one call (no offsets computed;
        on one thread unless TOKENIZERS_PARALLELISM allows `tokenizers`' own pool)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=True)]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        """The token string of an id."""
        return self.tokenizer.id_to_token(token_id) or ""

    def model_type(self) -> str:
        """The `tokenizer.json` model's type, lower case (`bpe`, `unigram`, `wordlevel`, ...)."""
        return type(self.tokenizer.model).__name__.lower()

    def byte_fallback(self) -> bool:
        """Whether unknown characters become byte tokens (a BPE/Unigram option)."""
        return bool(getattr(self.tokenizer.model, "byte_fallback", False))
