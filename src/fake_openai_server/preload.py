"""Download the configured model(s) into the Hugging Face cache, then exit.

    SERVICE_TYPE=all python -m fake_openai_server.preload

For images built for machines without internet at run time, and for compose's
one-shot preload.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from fake_openai_server.cli import load_settings
from fake_openai_server.settings import SettingsError


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
        check_pins,
        is_commit,
        model_url,
        no_such_revision,
        unreachable,
    )

    settings = load_settings(argv)
    names = settings.served_models()
    pinned = settings.revisions()
    try:
        check_pins(names, pinned)
    except SettingsError as error:
        print(f"fake-openai-server: invalid setting: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    cached = {name: cached_folder(name, pinned.get(name)) for name in names}
    if constants.HF_HUB_OFFLINE:
        for name, folder in cached.items():
            if folder is None:
                at = f" at revision {pinned[name]}" if name in pinned else ""
                fail(name, f"it is not in the cache{at}, and HF_HUB_OFFLINE=1 forbids downloading")
            print(f"{name}: {folder}", file=sys.stderr)
        return
    # Asked once, with a time limit: huggingface_hub's first question has none.
    first = names[0]
    silence = unreachable(model_url(first, pinned.get(first)), constants.HF_HUB_ETAG_TIMEOUT)
    if silence is not None:
        if all(cached[name] is not None and is_commit(pinned.get(name)) for name in names):
            # Commits in the cache, as pinned: there is nothing newer to look for.
            for name in names:
                print(f"{name}: {cached[name]} (the Hub not reached: {silence})", file=sys.stderr)
            return
        usable = all(folder is not None for folder in cached.values())
        fail(
            first,
            f"the Hub cannot be reached ({silence})"
            + ("; the server can start from the copies in the cache" if usable else ""),
        )
    for name in names:
        # Even a commit in the cache: a download cut short has left some of its files out.
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
