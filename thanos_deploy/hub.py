"""The Hugging Face hub, and this tool's cache: find out at once whether the hub can be reached;
keep converted models and downloaded data in one place.

Offline, huggingface_hub retries each request with back-off (about 20 s) and logs every retry;
we probe the endpoint once and, when it cannot be reached, switch to offline mode so that only a
local cache is used and a missing file fails immediately.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants


def reachable(timeout: float = 5.0) -> bool:
    """Whether the hub endpoint accepts a connection; if not, put huggingface_hub offline."""
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        return False


def cache_dir() -> Path:
    """Where converted models and downloaded data live: $THANOS_DEPLOY_CACHE or ~/.cache/thanos-deploy."""
    if env := os.environ.get("THANOS_DEPLOY_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "thanos-deploy"
