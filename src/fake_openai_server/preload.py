"""Download the configured model(s) into the Hugging Face cache, then exit.

    SERVICE_TYPE=all python -m fake_openai_server.preload

For images built for machines without internet at run time, and for compose's
one-shot preload.
"""

from __future__ import annotations

import sys

from fake_openai_server.cli import load_settings


def main(argv: list[str] | None = None) -> None:
    from huggingface_hub import snapshot_download

    settings = load_settings(argv)
    names = list(settings.embeddings_model) if settings.serves_embeddings else []
    if settings.serves_rerank:
        names.append(settings.reranker_model)
    for name in names:
        path = snapshot_download(name)
        print(f"{name}: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
