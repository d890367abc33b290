"""Where a model's files come from: the Hugging Face cache, and the Hub when it answers.

Loading a model by name, huggingface_hub asks the Hub about each of its files and tries
every question six times (about 23 s). With the Hub out of reach and ``HF_HUB_OFFLINE``
unset (no DNS or a firewall on a closed network, compose's default) a model already in
the cache took six minutes to load, between 65 warnings. So the Hub is asked once first,
for as long as huggingface_hub itself waits for an answer (``HF_HUB_ETAG_TIMEOUT``,
10 s), about the first model, as loading does: no answer (or a proxy's or mirror's
error), and the models load from the cache alone. A model pinned to a commit
(``MODEL_REVISIONS``) that is in the cache needs no question at all: a commit's files
never change (unless a download was cut short: then the Hub is asked, to complete it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from fake_openai_server.backends.base import LoadError
from fake_openai_server.settings import COMMIT, SettingsError

log = logging.getLogger(__name__)

# Where a model missing from a closed network's cache comes from (README: オフライン).
_HOW_TO_FETCH = (
    "download it where the Hub can be reached (python -m fake_openai_server.preload, with "
    "the same settings) and copy that HF_HOME here"
)


def cache_only(names: Sequence[str], revisions: Mapping[str, str]) -> set[str]:
    """Those of ``names`` (at their pinned ``revisions``, else the latest) to load from the
    cache alone, never asking the Hub.

    Every model with ``HF_HUB_OFFLINE``; a model pinned to a commit that is in the cache
    (its files never change); the others when the Hub does not answer. Raises
    ``LoadError`` if a model that is not in the cache cannot be downloaded either, and
    ``SettingsError`` for a pin on a folder.
    """
    from huggingface_hub import constants

    check_pins(names, revisions)
    found = _cached(names, revisions)
    if constants.HF_HUB_OFFLINE:
        if missing := [pinned_name(name, revisions) for name, at in found.items() if at is None]:
            raise LoadError(
                f"{_not_cached(missing)} the model cache ({constants.HF_HUB_CACHE}), and "
                f"HF_HUB_OFFLINE=1 forbids downloading: {_HOW_TO_FETCH}, or unset "
                "HF_HUB_OFFLINE"
            )
        return set(found)
    settled = {
        name for name, at in found.items() if at is not None and is_commit(revisions.get(name))
    }
    asked = [name for name in found if name not in settled]
    if not asked:
        return settled  # local folders and cached commits: nothing to ask
    missing = [pinned_name(name, revisions) for name in asked if found[name] is None]
    silence = unreachable(
        model_url(asked[0], revisions.get(asked[0])), constants.HF_HUB_ETAG_TIMEOUT
    )
    if silence is None:
        for version in missing:
            log.info(
                "%s is not in the model cache (%s): downloading it from %s (minutes, the "
                "first time)",
                version,
                constants.HF_HUB_CACHE,
                constants.ENDPOINT,
            )
        return settled
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
        ", ".join(pinned_name(name, revisions) for name in asked),
        constants.HF_HUB_CACHE,
    )
    return settled | set(asked)


def check_pins(names: Sequence[str], revisions: Mapping[str, str]) -> None:
    """``SettingsError`` for a pin on a model that is a folder: it would pin nothing."""
    for name in names:
        if name in revisions and os.path.isdir(name):
            raise SettingsError(
                f"MODEL_REVISIONS pins {name}, a folder: a revision pins a model of the "
                "Hugging Face Hub only"
            )


def completable(name: str, pinned: str | None) -> bool:
    """Whether the files missing from ``name``'s copy in the cache can be downloaded now:
    ``HF_HUB_OFFLINE`` unset, and the Hub answers."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    return unreachable(model_url(name, pinned), constants.HF_HUB_ETAG_TIMEOUT) is None


def revision(name: str, pinned: str | None = None) -> str | None:
    """The Hub commit of ``name``'s files in the cache (what was just loaded), at its
    ``pinned`` revision if any; None for a folder. A name serves other weights once its
    repository is updated and the server has asked the Hub, and stored vectors then no
    longer compare: this says which."""
    found = cached_folder(name, pinned)
    return os.path.basename(found) if found is not None else None


def cached_folder(name: str, pinned: str | None = None) -> str | None:
    """The cache's folder of the Hub model ``name`` at its ``pinned`` revision, else at
    ``main``; None if it is not there, or ``name`` is no Hub name."""
    return _cached([name], {name: pinned} if pinned else {}).get(name)


def no_such_revision(name: str, revision: str | None) -> str:
    """What to say when the Hub has no ``revision`` of ``name``."""
    from huggingface_hub import constants

    return (
        f"MODEL_REVISIONS pins {name} to {revision}, which {constants.ENDPOINT} does not "
        f"have: name one of its commits (GET /info gives the one loaded, as "
        "models.*.revision), tags or branches"
    )


class UnreadableCopy(LoadError):
    """A model's copy in the cache that fails to load (a download that was cut short
    leaves a copy without its weights)."""

    def __init__(self, name: str, folder: str, error: Exception) -> None:
        why = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        super().__init__(
            f"{name}'s copy in the model cache ({folder}) cannot be loaded ({why}): if its "
            "download was cut short, start once where the Hugging Face Hub can be reached "
            "(HF_HUB_OFFLINE unset) to complete it, or run python -m "
            "fake_openai_server.preload there"
        )


def is_commit(revision: str | None) -> bool:
    """Whether ``revision`` names a commit (40 hexadecimal digits), whose files never
    change, rather than a branch or tag, which may move."""
    return revision is not None and COMMIT.fullmatch(revision) is not None


def model_url(name: str, revision: str | None = None) -> str:
    """The Hub's page about model ``name`` (at ``revision``): what loading it asks first
    (a Hub may answer at its root and never here, and huggingface_hub waits for this one
    without limit)."""
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/models/{name}"
    return f"{url}/revision/{quote(revision, safe='')}" if revision else url


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


def pinned_name(name: str, revisions: Mapping[str, str]) -> str:
    """``name``, and the revision MODEL_REVISIONS pins it to if any: how the log names
    it."""
    return f"{name} (revision {revisions[name]})" if name in revisions else name


def _cached(names: Sequence[str], revisions: Mapping[str, str]) -> dict[str, str | None]:
    """The Hub names among ``names``, each with its folder in the cache at its pinned
    revision, else at ``main`` (None: not there).
    A folder, or a path that names none, is no Hub name: sentence-transformers says what
    is wrong with it."""
    from huggingface_hub.errors import HFValidationError

    found: dict[str, str | None] = {}
    for name in names:
        if os.path.isdir(name):
            continue
        try:
            found[name] = _snapshot(name, revisions.get(name))
        except HFValidationError:
            continue
    return found


def _snapshot(name: str, revision: str | None) -> str | None:
    """The cache's folder of the Hub model ``name`` at ``revision``, else at ``main``
    (None: not there)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return str(snapshot_download(name, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
