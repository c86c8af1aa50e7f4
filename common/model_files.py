"""What the configured model's files say, read without loading it: its `model_index.json` (the components diffusers
loads), from a local directory or the Hub cache, never downloaded. Read once per process; when it cannot be read
yet, again after a minute."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from common.settings import ModelSettings, hub_cache_dir

log = logging.getLogger(__name__)
RETRY_S = 60.0

_read: dict[tuple, tuple[dict | None, float]] = {}
_lock = threading.Lock()


def model_index(model: ModelSettings) -> dict | None:
    """The model's model_index.json, or None when it cannot be found here."""
    key = (model.id, model.revision, model.hf_home)
    entry = _read.get(key)
    if entry is None or (entry[0] is None and time.monotonic() >= entry[1]):
        with _lock:
            _read[key] = (_load(model), time.monotonic() + RETRY_S)
    return _read[key][0]


def _load(model: ModelSettings) -> dict | None:
    if not model.id:
        return None
    try:
        root = Path(model.id).expanduser()
        if not root.is_dir():
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(model.id, revision=model.revision, cache_dir=hub_cache_dir(model),
                                          local_files_only=True, allow_patterns=["model_index.json"]))
        return json.loads((root / "model_index.json").read_text())
    except Exception as exc:  # noqa: BLE001 - not here (yet): the caller answers as for a model without it
        log.debug("model_index.json of %s not readable: %s", model.id, exc)
        return None


def has_component(model: ModelSettings, name: str) -> bool:
    """Whether the model ships the (optional) component `name`, e.g. `prompt_enhancer_head`."""
    index = model_index(model) or {}
    entry = index.get(name)
    return isinstance(entry, list) and entry[0] is not None


def forget() -> None:
    """Drop what was read (tests)."""
    with _lock:
        _read.clear()
