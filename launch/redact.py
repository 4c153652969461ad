"""One redaction rule for every string that leaves the job: MLflow, console, warnings, errors,
dry runs, hooks, job specs.

A value is a secret when its key (or environment variable, query parameter or header name)
names one. Names are split into words at ``_``, ``-``, ``.`` and camelCase; a name is secret
when a word
- contains ``password``, ``passwd``, ``secret`` or ``credential`` (``PGPASSWORD``,
  ``secretkey``, ``gcp_credentials``), or is ``pwd``, ``auth``, ``authorization``, ``jwt``,
  ``sig``, ``signature`` or ``apikey``;
- is or ends with ``token`` and is the name's last word (``HF_TOKEN``, ``authtoken``), except
  the tokenizer's special tokens (``mask_token``, ``pad_token``, ...); never ``tokens``,
  ``tokenizer`` or a qualified ``token_dtype``/``token_ids``;
- is ``key`` after ``api``, ``access``, ``private``, ``secret``, ``storage``, ``account``,
  ``master``, ``signing``, ``client``, ``encryption`` or ``shared`` (``AZURE_STORAGE_KEY``,
  ``private_key``), or one word of those glued to ``key`` (``privatekey``, ``accesskey``).

In free text, these are hidden wherever they appear: the userinfo password of a URI
(``https://user:***@host``, also when the password holds ``@``), ``user:password@host``
without a scheme (a YAML error snippet that starts mid-URL), ``NAME=VALUE`` and
``name: value`` with a secret name (``--env HF_TOKEN=...``, query strings such as
``?X-Amz-Signature=...&sig=...``), an ``Authorization:`` header's value, and values shaped
like well-known credentials (Hugging Face ``hf_...``, AWS ``AKIA...``, GitHub
``ghp_...``/``github_pat_...``, ``sk-...`` API keys, Slack ``xox...``, JWTs).

Only what leaves the job is redacted: the run directory's ``config.yaml``, which the workers
read, keeps real values (and is written 0600).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_CONTAINED = ("password", "passwd", "secret", "credential")
_WHOLE = {"pwd", "auth", "authorization", "jwt", "sig", "signature", "apikey"}
_KEY_OWNERS = {"api", "access", "private", "secret", "storage", "account", "master", "signing",
               "client", "encryption", "shared"}
_SPECIAL_TOKENS = {"mask", "sep", "pad", "bos", "eos", "unk", "cls"}  # tokenizer settings
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

# scheme://userinfo@ : greedy up to the last '@' before the path, so a password may hold '@'.
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s'\"]+)@")
# user:password@host without a scheme (a snippet that starts inside a URI).
_BARE_USERINFO = re.compile(
    r"(?<![\w/:*])(?P<user>[\w.%+-]+):(?P<pw>[^\s/@'\"]+(?:@[^\s/@'\"]+)*)@(?=[\w.-]+(?:[:/\s'\"]|$))")
# NAME=VALUE (env items, query strings, key=value in messages); the value ends at a separator.
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][\w.-]*)=(?P<value>[^\s&;,'\"]+)")
# name: value (a YAML or log snippet); only secret names are touched.
_MAPPING = re.compile(r"(?P<name>[A-Za-z_][\w.-]*)(?P<sep>['\"]?:[ \t]+)"
                      r"(?P<value>'[^'\n]*'|\"[^\"\n]*\"|[^\s,}'\"]+)")
_AUTH_HEADER = re.compile(r"(?i)(?P<name>(?:proxy-)?authorization)(?P<sep>\s*[:=]\s*)"
                          r"(?P<value>(?:(?:bearer|basic|token|digest)\s+)?[^\s'\"]+)")
_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}"                               # Hugging Face
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"                      # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_\w{30,}"  # GitHub
    r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"             # API keys of the sk- family
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"                     # Slack
    r"|\beyJ[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]{5,}"             # JWT
)


def is_secret_key(key: str) -> bool:
    """Whether a config key, environment variable, query parameter or header names a secret."""
    words = [w.lower() for w in _WORD.findall(str(key))]
    for i, word in enumerate(words):
        before = words[i - 1] if i else ""
        if word in _WHOLE or any(stem in word for stem in _CONTAINED):
            return True
        if word.endswith("token") and i == len(words) - 1:  # a qualified token_dtype is not
            if word == "token" and before in _SPECIAL_TOKENS:
                continue
            return True
        if word == "key" and before in _KEY_OWNERS:
            return True
        if word.endswith("key") and word[:-3] in _KEY_OWNERS:
            return True
    return False


def redact_text(text: str) -> str:
    """``text`` with every secret the module docstring lists replaced by ``***``."""
    text = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{_hide_userinfo(m['userinfo'])}@", text)
    text = _BARE_USERINFO.sub(lambda m: f"{m['user']}:{REDACTED}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}", text)
    text = _ASSIGNMENT.sub(
        lambda m: f"{m['name']}={REDACTED}" if is_secret_key(m["name"]) else m[0], text)
    text = _MAPPING.sub(
        lambda m: f"{m['name']}{m['sep']}{REDACTED}" if is_secret_key(m["name"]) else m[0], text)
    return _SHAPES.sub(REDACTED, text)


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
