"""Download the configured model(s) into the Hugging Face cache, then exit.

    SERVICE_TYPE=all python -m fake_openai_server.preload

For images built for machines without internet at run time, and for compose's
one-shot preload.
"""

from __future__ import annotations

import sys

from fake_openai_server.cli import load_settings


def main(argv: list[str] | None = None) -> None:
    from huggingface_hub import constants, snapshot_download

    settings = load_settings(argv)
    names = list(settings.embeddings_model) if settings.serves_embeddings else []
    if settings.serves_rerank:
        names.append(settings.reranker_model)
    for name in names:
        try:
            path = snapshot_download(name)
        except Exception as exc:  # one line that says why, not huggingface_hub's traceback
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(
                f"fake-openai-server: could not download {name} from {constants.ENDPOINT} "
                f"into {constants.HF_HUB_CACHE}: {type(exc).__name__}: {reason}",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        print(f"{name}: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
