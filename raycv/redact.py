"""Credentials out of everything raycv writes or prints.

A URI may carry a secret: user-info (`https://user:pass@mlflow`, `s3://KEY:SECRET@bucket`) or a
signed query (`?X-Amz-Signature=...`, an Azure SAS `sig=...`, `token=...`). raycv keeps the
original in memory where it is needed (to open the file, to log to MLflow) and writes and prints
the redacted form: config.yaml, checkpoints' raycv.json, summary.json, MLflow params, Parquet
metadata, manifests, and every line on the console.
"""

from __future__ import annotations

import re
from typing import Any

HIDDEN = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@?#]+)@")
_SECRET_PARAMS = ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                  "x-goog-credential", "sig", "signature", "token", "access_token", "id_token", "password",
                  "secret", "client_secret", "api_key", "apikey", "key")
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>" + "|".join(re.escape(p) for p in _SECRET_PARAMS)
                    + r")=(?P<value>[^&#\s'\"]*)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with URI user-info and secret query values replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)
    return _QUERY.sub(lambda m: f"{m['sep']}{m['name']}={HIDDEN}", text)


def redact_tree(value: Any) -> Any:
    """Every string inside dicts and lists, redacted (for configs and metadata before they are written)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value


def has_secret(text: str) -> bool:
    return redact(text) != text
