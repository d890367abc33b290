"""Where a model's files come from: the Hugging Face cache, and the Hub when it answers.

Loading a model by name, huggingface_hub asks the Hub about each of its files and tries
every question six times (about 23 s). With the Hub out of reach and ``HF_HUB_OFFLINE``
unset (no DNS or a firewall on a closed network, compose's default) a model already in
the cache took six minutes to load, between 65 warnings. So the Hub is asked once first,
for as long as huggingface_hub itself waits for an answer (``HF_HUB_ETAG_TIMEOUT``,
10 s), about the first model, as loading does: no answer (or a proxy's or mirror's
error), and the models load from the cache alone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from fake_openai_server.backends.base import LoadError

log = logging.getLogger(__name__)

# Where a model missing from a closed network's cache comes from (README: オフライン).
_HOW_TO_FETCH = (
    "download it where the Hub can be reached (python -m fake_openai_server.preload, with "
    "the same settings) and copy that HF_HOME here"
)


def cache_only(names: Sequence[str]) -> bool:
    """Whether to load ``names`` from the cache alone, never asking the Hub.

    Yes with ``HF_HUB_OFFLINE``, and when the Hub does not answer. Raises ``LoadError``
    if a model that is not in the cache cannot be downloaded either.
    """
    from huggingface_hub import constants

    found = _cached(names)
    hub_names = list(found)
    missing = [name for name, folder in found.items() if folder is None]
    if not hub_names:
        return False  # local folders only: nothing to ask
    if constants.HF_HUB_OFFLINE:
        if missing:
            raise LoadError(
                f"{_not_cached(missing)} the model cache ({constants.HF_HUB_CACHE}), and "
                f"HF_HUB_OFFLINE=1 forbids downloading: {_HOW_TO_FETCH}, or unset "
                "HF_HUB_OFFLINE"
            )
        return True
    silence = unreachable(model_url(hub_names[0]), constants.HF_HUB_ETAG_TIMEOUT)
    if silence is None:
        for name in missing:
            log.info(
                "%s is not in the model cache (%s): downloading it from %s (minutes, the "
                "first time)",
                name,
                constants.HF_HUB_CACHE,
                constants.ENDPOINT,
            )
        return False
    if missing:
        raise LoadError(
            f"{_not_cached(missing)} the model cache ({constants.HF_HUB_CACHE}), and the "
            f"Hugging Face Hub ({constants.ENDPOINT}) cannot be reached to download "
            f"({silence}): check the network and HTTPS_PROXY, or {_HOW_TO_FETCH}"
        )
    log.warning(
        "the Hugging Face Hub (%s) cannot be reached (%s): loading %s from the cache "
        "(%s) without looking for a newer version. Set HF_HUB_OFFLINE=1 to skip this check",
        constants.ENDPOINT,
        silence,
        ", ".join(hub_names),
        constants.HF_HUB_CACHE,
    )
    return True


def revision(name: str) -> str | None:
    """The Hub commit of ``name``'s files in the cache (what was just loaded); None for a
    folder. A name serves other weights once its repository is updated and the server
    has asked the Hub, and stored vectors then no longer compare: this says which."""
    folder = _cached([name]).get(name)
    return os.path.basename(folder) if folder is not None else None


def model_url(name: str) -> str:
    """The Hub's page about model ``name``: what loading it asks first (a Hub may answer
    at its root and never here, and huggingface_hub waits for this one without limit)."""
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/api/models/{name}"


def unreachable(url: str, timeout: float) -> str | None:
    """Why ``url`` gave no answer within ``timeout`` seconds; None if it answered.

    A reply counts as an answer (a 404 from a mirror without the model, a 401 for a
    gated one), unless it is a server error or a proxy's 407: huggingface_hub retries
    those just as long.
    The question runs in a thread of its own, as a name lookup is not bounded by the
    HTTP timeout.
    """
    from huggingface_hub import get_session

    outcome: list[str | None] = []

    def ask() -> None:
        try:
            # GET, as huggingface_hub asks: an API need not answer a HEAD.
            status = get_session().get(url, timeout=timeout).status_code
        except Exception as exc:  # whatever failed, the Hub did not answer
            outcome.append(str(exc) or type(exc).__name__)
        else:
            outcome.append(f"HTTP {status}" if status >= 500 or status == 407 else None)

    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer in {timeout:g} s"


def _not_cached(names: Sequence[str]) -> str:
    return f"{names[0]} is not in" if len(names) == 1 else f"{', '.join(names)} are not in"


def _cached(names: Sequence[str]) -> dict[str, str | None]:
    """The Hub names among ``names``, each with its folder in the cache (None: not there).
    A folder, or a path that names none, is no Hub name: sentence-transformers says what
    is wrong with it."""
    from huggingface_hub.errors import HFValidationError

    found: dict[str, str | None] = {}
    for name in names:
        if os.path.isdir(name):
            continue
        try:
            found[name] = _snapshot(name)
        except HFValidationError:
            continue
    return found


def _snapshot(name: str) -> str | None:
    """The cache's folder of the Hub model ``name`` at its ``main`` (None: not there)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return str(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
