"""Credential scrubbing for log records and error messages.

oss2 logs request headers and error bodies, and OSS error bodies can echo the access key id: every
credential string the OSS backend uses is remembered here, and `scrub` removes those and any
signature from a text before it is logged or raised.
"""

from __future__ import annotations

import logging
import re
import threading

_secrets_lock = threading.Lock()  # separate from the oss module's lock: scrub() runs inside logging calls
_secret_values: set[str] = set()  # every credential string seen, for scrubbing


def remember_secrets(*values: str | None) -> None:
    """Remember credential strings (the OSS backend passes its key id, secret and token) for `scrub`."""
    with _secrets_lock:
        _secret_values.update(v for v in values if v is not None and len(v) >= 4)


# Signatures and credential fields as they appear in oss2's debug logs and in OSS error bodies.
_SCRUB_PATTERNS = [
    (re.compile(r"(OSS4-HMAC-SHA256\s+Credential=)[^,\s'\"]+"), r"\1***"),
    (re.compile(r"(Signature=)[^,\s'\"&]+"), r"\1***"),
    (re.compile(r"\bOSS [^\s:'\"]+:[^\s'\",}]+"), "OSS ***:***"),
    (re.compile(r"((?:security-token|SecurityToken)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}&]+", re.I), r"\1***"),
    (re.compile(r"(<OSSAccessKeyId>)[^<]*"), r"\1***"),
    (re.compile(r"(<SignatureProvided>)[^<]*"), r"\1***"),
]


def scrub(text: str) -> str:
    """Remove every known credential and signature from a text before it is logged or raised."""
    with _secrets_lock:
        secrets = sorted(_secret_values, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    for pattern, repl in _SCRUB_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactFilter(logging.Filter):
    """oss2 logs request headers and error bodies at DEBUG/INFO; rewrite them without credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is not ours to fix
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


REDACT_FILTER = RedactFilter()
