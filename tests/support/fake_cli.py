"""``python -m tests.support.fake_cli SETTINGS_JSON OPTIONS_JSON``: the CLI's own serving
path (``cli.serve``: uvicorn, drain, exit codes) over the fake models of ``fakes.py``."""

from __future__ import annotations

import json
import sys

from fake_openai_server import cli, logs
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin


def main() -> None:
    settings = Settings(**json.loads(sys.argv[1]))
    logs.configure(settings.log_level, settings.log_json)
    cli.serve(settings, fake_plugin(**json.loads(sys.argv[2])))


if __name__ == "__main__":
    main()
