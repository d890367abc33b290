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

    from fake_openai_server.backends.hub import model_url, unreachable

    settings = load_settings(argv)
    names = list(settings.embeddings_model) if settings.serves_embeddings else []
    if settings.serves_rerank:
        names.append(settings.reranker_model)
    if not constants.HF_HUB_OFFLINE:
        # Asked once, with a time limit: huggingface_hub's first question has none.
        silence = unreachable(model_url(names[0]), constants.HF_HUB_ETAG_TIMEOUT)
        if silence is not None:
            fail(names[0], f"the Hub cannot be reached ({silence})")
    for name in names:
        try:
            path = snapshot_download(name)
        except Exception as exc:  # one line that says why, not huggingface_hub's traceback
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            fail(name, f"{type(exc).__name__}: {reason}")
        print(f"{name}: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
