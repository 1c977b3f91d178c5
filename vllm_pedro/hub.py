"""Adapters from the Hugging Face Hub by repository id, wherever an adapter folder is
expected (`--pedro-modules name=org/repo`, `PedroRequest(name, id, "org/repo")`,
`PedroModel.from_pretrained(model, "org/repo")`).

The id is resolved through huggingface_hub's own cache (`snapshot_download` of the two
adapter files only): with the files cached, nothing is downloaded; offline
(HF_HUB_OFFLINE=1, or no network) a cached snapshot is used and a missing one is a clear
AdapterError. The snapshot folder is then read like any adapter folder (adapter_io).
"""

from __future__ import annotations

import os
import re

from .config import CONFIG_NAME, WEIGHTS_NAME, AdapterError

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_repo_id(source: str) -> bool:
    """'org/repo' or 'org/repo@revision' that is not an existing local path."""
    repo = source.partition("@")[0]
    return bool(_REPO_ID.fullmatch(repo)) and not os.path.exists(source) and not repo.startswith(".")


def resolve_adapter(source: str) -> str:
    """A local adapter folder for `source`: a local path as is, a Hub id as its snapshot
    folder in the Hugging Face cache (downloading the adapter's two files when online)."""
    if not is_repo_id(source):
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = source.partition("@")
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        raise AdapterError(
            f"adapter {source!r} is not in the local Hugging Face cache ({_cache_dir()}) and the Hub "
            f"{'is switched off (HF_HUB_OFFLINE=1)' if offline else 'cannot be reached'}: download it once "
            f"where the Hub is reachable (huggingface-cli download {repo}) or give a local folder") from None
    except HfHubHTTPError as e:
        raise AdapterError(f"adapter {source!r} cannot be fetched from the Hugging Face Hub: {e}") from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
