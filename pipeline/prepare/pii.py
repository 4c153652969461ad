"""Personal data in documents: e-mail and IP addresses replaced with placeholders.

`PiiStep` is the `pii` cleaning step (counted per kind: documents changed, items replaced);
`redact` is the same replacement for what the pipeline shows of a document (the removed
samples in stats.json), whether or not the corpus itself is redacted.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.pipeline.config import PiiConfig
from lmforge.pipeline.prepare.steps import Step

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not part of a longer dotted number (a version 1.2.3.4.5, a date 2024.01.02.03.04).
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\w)")
_DOTTED = re.compile(r"\d\.\d+\.\d")  # what every IPv4 address has
# Candidates only; ipaddress decides (so 12:30:45 or a C++ a::b is left alone).
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _ip_replacer(placeholder: str, public_only: bool,
                 found: list[int]) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        try:
            address = ipaddress.ip_address(match.group(0))
        except ValueError:
            return match.group(0)
        if public_only and not address.is_global:
            return match.group(0)
        found[0] += 1
        return placeholder
    return replace


def replace_pii(text: str, config: PiiConfig) -> tuple[str, int, int]:
    """`text` with e-mail and IP addresses replaced by the configured placeholders.

    Returns:
        (new text, e-mail addresses replaced, IP addresses replaced); the text is the same
        object when nothing was replaced.
    """
    emails = ips = 0
    if "@" in text:
        text, emails = _EMAIL.subn(config.email_placeholder, text)
    # The regular expressions read ~10 MB/s; most texts have nothing they could match.
    v4 = _DOTTED.search(text) is not None
    v6 = "::" in text or text.count(":") >= 7
    if v4 or v6:
        found = [0]
        replace = _ip_replacer(config.ip_placeholder, config.public_ips_only, found)
        if v4:
            new = _IPV4.sub(replace, text)
            text = new if found[0] else text
        if v6:
            before = found[0]
            new = _IPV6.sub(replace, text)
            text = new if found[0] > before else text
        ips = found[0]
    return text, emails, ips


_REDACT = PiiConfig(public_ips_only=False)


def redact(text: str) -> str:
    """`text` with every e-mail and IP address (private ones too) replaced by a placeholder."""
    return replace_pii(text, _REDACT)[0]


@dataclass
class PiiStep(Step):
    """The `pii` step: replaces e-mail and IP addresses (rules `email`, `ip`: documents
    changed and addresses replaced)."""

    config: PiiConfig = field(default_factory=PiiConfig)

    def transform(self, text: str) -> str:
        new, emails, ips = replace_pii(text, self.config)
        if emails:
            self.stats.count("email", modified_docs=1, replaced=emails)
        if ips:
            self.stats.count("ip", modified_docs=1, replaced=ips)
        return new
