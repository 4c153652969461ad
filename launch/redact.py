"""One redaction rule for everything lmforge shows or logs: MLflow, console, warnings, dry runs.

A value is a secret when its key (or environment variable name) contains the word ``token``,
``secret``, ``password``, ``passwd``, ``api_key``, ``apikey``, ``auth`` or ``credential``
(any case; words split at ``_``, ``-``, ``.`` and camelCase, so ``HF_TOKEN``,
``apiKey`` and ``db-password`` are secrets, while ``tokenizer``, ``max_new_tokens``,
``author`` and the special-token names ``mask_token``/``pad_token``/... are not); the
password in a URI's userinfo (``https://user:PASSWORD@host``) is one wherever it appears.
Only what leaves the job is redacted: the run directory's ``config.yaml``, which the workers
read, keeps real values.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "apikey", "auth", "credential",
                  "credentials", "token"}
_SPECIAL_TOKENS = {"mask", "sep", "pad", "bos", "eos", "unk", "cls"}  # tokenizer settings
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# scheme://user:password@ or scheme://token@ ; the host and path stay readable.
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")


def is_secret_key(key: str) -> bool:
    """Whether a config key or environment variable name holds a secret."""
    words = [w.lower() for w in _WORD.findall(str(key))]
    for i, word in enumerate(words):
        if word == "token" and i and words[i - 1] in _SPECIAL_TOKENS:
            continue
        if word in _SECRET_WORDS or (word == "api" and words[i + 1 : i + 2] == ["key"]):
            return True
    return False


def redact_text(text: str) -> str:
    """``text`` with the userinfo of every URI in it replaced (``https://***@host/...``)."""
    return _URI_USERINFO.sub(lambda m: f"{m['scheme']}{_hide_userinfo(m['userinfo'])}@", text)


def _hide_userinfo(userinfo: str) -> str:
    user, sep, _ = userinfo.partition(":")
    return f"{user}:{REDACTED}" if sep else REDACTED


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (nested dicts/lists/strings) with every secret replaced by ``***``.

    Args:
        value: a config as a dict, a list, a string, or any scalar.
        key: the key ``value`` sits under; a secret key hides the whole value.
    """
    if key and is_secret_key(key) and value not in (None, "", {}, []):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
