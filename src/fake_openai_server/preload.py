"""Download the configured model(s) into the Hugging Face cache, then exit.

    SERVICE_TYPE=all python -m fake_openai_server.preload

For images built for machines without internet at run time, and for compose's
one-shot preload.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from fake_openai_server.cli import load_settings


def fail(name: str, reason: str) -> NoReturn:
    from huggingface_hub import constants

    print(
        f"fake-openai-server: could not download {name} from {constants.ENDPOINT} into "
        f"{constants.HF_HUB_CACHE}: {reason}",
        file=sys.stderr,
    )
    raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import RevisionNotFoundError

    from fake_openai_server.backends.hub import (
        cached_folder,
        is_commit,
        model_url,
        no_such_revision,
        unreachable,
    )

    settings = load_settings(argv)
    names = list(settings.embeddings_model) if settings.serves_embeddings else []
    if settings.serves_rerank:
        names.append(settings.reranker_model)
    pinned = settings.revisions()
    wanted = []
    for name in names:
        found = cached_folder(name, pinned.get(name))
        if found is not None and is_commit(pinned.get(name)):
            print(f"{name}: {found}", file=sys.stderr)  # a commit's files never change
        else:
            wanted.append(name)
    if wanted and not constants.HF_HUB_OFFLINE:
        # Asked once, with a time limit: huggingface_hub's first question has none.
        first = wanted[0]
        url = model_url(first, pinned.get(first))
        silence = unreachable(url, constants.HF_HUB_ETAG_TIMEOUT)
        if silence is not None:
            found = cached_folder(first, pinned.get(first))
            fail(
                first,
                f"the Hub cannot be reached ({silence})"
                + (f"; the server can start from the copy in the cache ({found})" if found else ""),
            )
    for name in wanted:
        try:
            path = snapshot_download(name, revision=pinned.get(name))
        except RevisionNotFoundError:
            fail(name, no_such_revision(name, pinned.get(name)))
        except Exception as exc:  # one line that says why, not huggingface_hub's traceback
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            fail(name, f"{type(exc).__name__}: {reason}")
        print(f"{name}: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
