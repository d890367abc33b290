"""The README is the front door: it documents every setting and its commands are real."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from fake_openai_server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented_with_env_and_flag() -> None:
    """Each setting's row names its variable and its flag; a switch, both of its flags
    (``--truncate false`` is not how argparse turns one off)."""
    for name, field in Settings.model_fields.items():
        env, flag = name.upper(), "--" + name.replace("_", "-")
        flags = f"`{flag}` / `--no-{flag[2:]}`" if field.annotation is bool else f"`{flag}`"
        row = re.search(rf"^\| `{env}` \| {flags} \|.+\|$", README, re.MULTILINE)
        assert row, f"README has no settings row for {env} / {flags}"


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.+?)\n```", README, re.DOTALL)
    assert "uv run pytest" in commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^uv run pytest$", ci, re.MULTILINE)


def test_the_server_command_is_the_console_script() -> None:
    assert "uv run fake-openai-server" in re.findall(r"```bash\n(.+?)\n```", README, re.DOTALL)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["fake-openai-server"] == "fake_openai_server.cli:main"


def test_every_route_is_in_the_readme() -> None:
    """The README's tables name every route the server answers, whichever API it is."""
    from fake_openai_server.api.app import routers_for

    routers = routers_for(Settings(service_type="all"))
    paths = {getattr(route, "path", "") for router in routers for route in router.routes}
    # A parameter as OpenAPI writes it ({deployment}), without Starlette's converter.
    paths = {re.sub(r"\{(\w+):\w+\}", r"{\1}", path) for path in paths}
    missing = sorted(p for p in paths if f"`{p}`" not in README and f" {p}`" not in README)
    assert not missing, f"routes missing from the README: {missing}"


def test_every_bound_on_a_setting_is_in_the_readme() -> None:
    """The sentence on the numeric settings' ranges names each bounded setting with its
    bound: a value outside it stops the server at start-up (exit 2)."""
    ranges = re.search(r"^数値の設定の範囲.+$", README, re.MULTILINE)
    assert ranges
    for name, field in Settings.model_fields.items():
        for bound in field.metadata:
            for kind in ("ge", "gt", "le"):
                value = getattr(bound, kind, None)
                if value is None:
                    continue
                assert f"`{name.upper()}`" in ranges[0], name
                # The setting's clause: from its name to the end of the bound it is given.
                clause = re.search(rf"`{name.upper()}`[^。]*?(以上|より大きい値|〜\d+)", ranges[0])
                assert clause and str(value) in clause[0], (name, kind, value)
