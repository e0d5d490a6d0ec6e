"""Secrets kept out of what lmforge writes and prints: saved configs, summaries, `validate`'s output.

A config may carry credentials: a tracker URI with a password (``https://user:pw@mlflow.example``),
a URL with a token in its query, or a key named like one (``comet_api_key``, ``swanlab_lark_secret``,
``hub_token``). :func:`redact` replaces each with ``***``; everything else is kept as written, so a
saved config still reruns (a credential comes from the environment: ``WANDB_API_KEY``,
``MLFLOW_TRACKING_PASSWORD``, ``HF_TOKEN``, ``LMFORGE_API_KEY``, which lmforge never writes down).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Key names that hold a credential. Tokenizer keys (eos_token, special_tokens, eot_tokens, ...) do not match.
SECRET_KEY = re.compile(r"(api_?key|secret|password|passwd|credential|auth_token|access_token|hub_token|hf_token|bearer)",
                        re.IGNORECASE)
SECRET_PARAM = re.compile(r"(token|key|secret|password|passwd|sig|signature|auth|credential)", re.IGNORECASE)
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def redact_url(value: str) -> str:
    """A URL with its password and credential-like query values masked; other strings unchanged."""
    if not URL.match(value):
        return value
    try:
        parts = urlsplit(value)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, MASK if SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not parseable as a URL: mask it whole rather than risk leaking it
        return MASK


def redact(value: Any, key: str = "") -> Any:
    """`value` (a config mapping, list or scalar) with secrets masked; `key` is the name it is stored under."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if key and SECRET_KEY.search(key) and value:
            return MASK
        return redact_url(value)
    return value
