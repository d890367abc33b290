"""The real entry points in subprocesses, as users start them: ``python -m
fake_openai_server`` and ``uvicorn --factory``; refusals for bad settings; a clean exit
(not a hang) when the model cannot be loaded; ``--help``."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fake_openai_server.cpus import usable_cores
from fake_openai_server.settings import Settings
from tests.support.contract import EMBEDDINGS_MODEL, RERANKER_MODEL
from tests.support.live import (
    LiveServer,
    fake_cli,
    free_port,
    run_cli,
    run_server_process,
    wait_ready,
)
from tests.support.local_hub import broken_hub, local_hub

# Settings the tests' parent environment might carry; a subprocess must not inherit them.
_SETTING_NAMES = [name.upper() for name in Settings.model_fields]


def clean_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k.upper() not in _SETTING_NAMES}
    return {**base, **env}


def run_entrypoint(
    env: dict[str, str], args: list[str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fake_openai_server", *(args or [])],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service_type", "port"), [("embeddings", 8081), ("reranker", 8082), (None, 8081)]
)
def test_default_ports(
    monkeypatch: pytest.MonkeyPatch, service_type: str | None, port: int
) -> None:
    for name in _SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    if service_type is not None:
        monkeypatch.setenv("SERVICE_TYPE", service_type)
    settings = Settings()
    assert settings.effective_port == port
    assert settings.embeddings_model == [EMBEDDINGS_MODEL]
    assert settings.reranker_model == RERANKER_MODEL
    monkeypatch.setenv("PORT", "9999")
    assert Settings().effective_port == 9999


@pytest.mark.parametrize("unset", ["", " ", "null", "NULL"])
def test_an_optional_setting_given_empty_or_null_is_left_unset(
    monkeypatch: pytest.MonkeyPatch, unset: str
) -> None:
    """compose's ``PORT: ${PORT:-}`` (or a chart's empty value) passes "" through; that
    had stopped the start-up ("not a valid integer"). ``null`` means unset as on the
    command line, as --help says."""
    optional = ("port", "max_seq_length", "default_input_type", "tokenizer_workers")
    for name in (*optional, "cpu_threads", "api_keys_file"):
        monkeypatch.setenv(name.upper(), unset)
    settings = Settings()
    assert settings.effective_port == 8081
    assert all(getattr(settings, name) is None for name in optional)
    assert settings.cpu_threads is settings.api_keys_file is None
    monkeypatch.setenv("QUERY_PREFIX", "")  # a string: empty is a value (no prefix)
    monkeypatch.setenv("DOCUMENT_PREFIX", unset)
    settings = Settings()
    assert settings.query_prefix == ""
    # null is unset; an empty or blank prefix is a value (no prefix)
    assert (settings.document_prefix is None) == (unset.strip().lower() == "null")


def test_a_commit_is_pinned_in_lower_case() -> None:
    """As the cache's folders and the Hub write it (an upper-case one was taken for a
    branch, and not found in the cache)."""
    settings = Settings(model_revisions=[f" {EMBEDDINGS_MODEL} = {'A1' * 20} "])
    assert settings.revisions() == {EMBEDDINGS_MODEL: "a1" * 20}
    tagged = Settings(model_revisions=[f"{EMBEDDINGS_MODEL}=V1.0", f"{RERANKER_MODEL}=20240101"])
    assert tagged.revisions() == {EMBEDDINGS_MODEL: "V1.0", RERANKER_MODEL: "20240101"}


def test_the_restart_settings_are_valid_settings() -> None:
    """What the engine process rebuilds its settings from on a restart: the start's
    commits pinned, whatever else it was told left out."""
    settings = Settings(service_type="all", model_revisions=[f"{RERANKER_MODEL}=v1"])
    pinned = settings.pinned_to(
        {EMBEDDINGS_MODEL: "b" * 40, "someone/else": "c" * 40, RERANKER_MODEL: "1ae7c3f"}
    )
    sent = pinned.model_dump(mode="json", exclude={"api_keys", "api_keys_file"})
    assert Settings(**sent).revisions() == {RERANKER_MODEL: "v1", EMBEDDINGS_MODEL: "b" * 40}


@contextlib.contextmanager
def uvicorn_factory(env: dict[str, str], log_path: Path, wait: bool = True) -> Iterator[LiveServer]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "fake_openai_server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with run_server_process(command, port, log_path, clean_env(**env), wait) as server:
        yield server


MISSING_MODEL = "nobody/no-such-model"
# A commit of the embeddings model older than main's, as MODEL_REVISIONS pins it.
OLDER = "1" * 40


@pytest.fixture(scope="session")
def two_revisions(cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose embeddings model has a second commit, OLDER, besides main's: one
    that reads at most 256 tokens (its sentence_bert_config.json), so a server shows in
    /info which of the two it loaded."""
    hf_home = tmp_path_factory.mktemp("two-revisions")
    folder = f"models--{EMBEDDINGS_MODEL.replace('/', '--')}"
    repository = shutil.copytree(
        Path(cli_env["HF_HOME"]) / "hub" / folder, hf_home / "hub" / folder
    )
    main = (repository / "refs" / "main").read_text().strip()
    older = shutil.copytree(repository / "snapshots" / main, repository / "snapshots" / OLDER)
    config = older / "sentence_bert_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_seq_length": 256}))
    return hf_home


@pytest.fixture(scope="session")
def background(
    cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, two_revisions: Path
) -> Iterator[dict[str, Any]]:
    """The slow subprocesses of this module, started together so their start-ups overlap:
    the reranker CLI, uvicorn --factory, and a CLI whose model does not exist."""
    logs = tmp_path_factory.mktemp("cli-background")
    with contextlib.ExitStack() as stack:
        reranker = stack.enter_context(
            run_cli({**cli_env, "SERVICE_TYPE": "reranker", "WARMUP": "false"}, logs, wait=False)
        )
        factory = stack.enter_context(
            uvicorn_factory(
                {**cli_env, "SERVICE_TYPE": "all", "WARMUP": "false", "TOKENIZER_WORKERS": "1"},
                logs / "uvicorn.log",
                wait=False,
            )
        )
        missing_port = free_port()
        missing_log = (logs / "missing.log").open("w")
        stack.callback(missing_log.close)
        # API_KEY: a misspelt API_KEYS, which the start-up log names.
        env = {**cli_env, "EMBEDDINGS_MODEL": MISSING_MODEL, "HOST": "127.0.0.1"}
        env["API_KEY"] = "sk-misspelt"
        missing = subprocess.Popen(
            [sys.executable, "-m", "fake_openai_server"],
            env=clean_env(**env, PORT=str(missing_port)),
            stdout=subprocess.DEVNULL,
            stderr=missing_log,
        )
        stack.callback(lambda: missing.poll() is None and missing.kill())
        command = [sys.executable, "-m", "fake_openai_server"]

        def exiting(env: dict[str, str]) -> subprocess.Popen[str]:
            """A CLI that is to stop with an error: its stderr kept for the test."""
            process = subprocess.Popen(
                command,
                env={**env, "PORT": str(free_port())},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            stack.callback(process.kill)
            return process

        def serving(name: str, env: dict[str, str]) -> LiveServer:
            """A CLI that is to serve, its output in ``name``.log."""
            port = free_port()
            return stack.enter_context(
                run_server_process(
                    command, port, logs / f"{name}.log", {**env, "PORT": str(port)}, wait=False
                )
            )

        # Each model where the other belongs: both loaded, then refused (exit 2).
        swapped = {}
        for service, setting, model in (
            ("embeddings", "EMBEDDINGS_MODEL", RERANKER_MODEL),
            ("reranker", "RERANKER_MODEL", EMBEDDINGS_MODEL),
        ):
            swapped_env = {**cli_env, "SERVICE_TYPE": service, setting: model, "WARMUP": "false"}
            swapped[service] = exiting(clean_env(**swapped_env, HOST="127.0.0.1"))
        # DEVICE=cuda where torch sees no GPU: refused before the model loads.
        no_gpu_env = {**cli_env, "DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}
        no_gpu = exiting(clean_env(**no_gpu_env, HOST="127.0.0.1"))
        # HF_HUB_OFFLINE unset and the Hub out of reach: one that answers at its root and
        # nowhere else (as a firewall that drops packets, but for the root), and one that
        # answers 502.
        online = clean_env(**cli_env, HF_HUB_ETAG_TIMEOUT="2", WARMUP="false", HOST="127.0.0.1")
        del online["HF_HUB_OFFLINE"]
        cached = serving(
            "hub-silent",
            {
                **online,
                "HF_ENDPOINT": stack.enter_context(broken_hub(stall=True)),
                # Above the model's 512: cut there, with a warning.
                "MAX_SEQ_LENGTH": "1024",
            },
        )
        # A mirror that answers 502 to everything: huggingface_hub retries those too.
        mirror = stack.enter_context(broken_hub())
        failing = exiting({**online, "EMBEDDINGS_MODEL": MISSING_MODEL, "HF_ENDPOINT": mirror})
        # A first start: the model comes from the Hub (one here, serving the stand-ins).
        hub_url, hub_requests = stack.enter_context(local_hub(Path(cli_env["HF_HOME"])))
        empty_cache = logs / "empty-hf"
        download = serving(
            "download", {**online, "HF_HOME": str(empty_cache), "HF_ENDPOINT": hub_url}
        )
        # MODEL_REVISIONS: a first start at an older commit than main's; a start with that
        # commit in the cache and a Hub that never answers (a commit's files never change:
        # nothing to ask); a revision missing from an offline cache, and from the Hub.
        pin = {"MODEL_REVISIONS": f"{EMBEDDINGS_MODEL}={OLDER}"}
        older_url, older_requests = stack.enter_context(local_hub(two_revisions))
        pinned_cache = logs / "pinned-hf"
        pinned = serving(
            "pinned", {**online, **pin, "HF_HOME": str(pinned_cache), "HF_ENDPOINT": older_url}
        )
        pinned_cached = serving(
            "pinned-cached",
            {
                **online,
                **pin,
                "HF_HOME": str(shutil.copytree(two_revisions, logs / "pinned-cached-hf")),
                "HF_ENDPOINT": stack.enter_context(broken_hub(stall=True)),
            },
        )
        pinned_missing = exiting(
            clean_env(**cli_env, MODEL_REVISIONS=f"{EMBEDDINGS_MODEL}={'2' * 40}")
        )
        # A copy cut short (the weights never arrived), offline.
        cut_short = shutil.copytree(two_revisions, logs / "cut-short-hf")
        repository = cut_short / "hub" / f"models--{EMBEDDINGS_MODEL.replace('/', '--')}"
        main = (repository / "refs" / "main").read_text().strip()
        (repository / "snapshots" / main / "model.safetensors").unlink()
        incomplete = exiting(clean_env(**{**cli_env, "HF_HOME": str(cut_short)}))
        # A pinned commit whose download was cut short, the Hub up: completed, then served.
        cut_pinned = shutil.copytree(two_revisions, logs / "cut-pinned-hf")
        folder = f"models--{EMBEDDINGS_MODEL.replace('/', '--')}"
        (cut_pinned / "hub" / folder / "snapshots" / OLDER / "model.safetensors").unlink()
        completed = serving(
            "completed",
            {**online, **pin, "HF_HOME": str(cut_pinned), "HF_ENDPOINT": older_url},
        )
        # A branch pin (v2, at main's commit), whose branch then moves to OLDER on the Hub
        # before the engine is killed: the restart must load the commit the start did.
        moving = shutil.copytree(two_revisions, logs / "moving-hub")
        refs = moving / "hub" / folder / "refs"
        (refs / "v2").write_text((refs / "main").read_text())
        moving_url, moving_requests = stack.enter_context(local_hub(moving))
        branch = serving(
            "branch",
            {
                **online,
                "MODEL_REVISIONS": f"{EMBEDDINGS_MODEL}=v2",
                "HF_HOME": str(logs / "branch-hf"),
                "HF_ENDPOINT": moving_url,
            },
        )
        # A pin for a model given as a folder: it pins nothing.
        snapshot = next((Path(cli_env["HF_HOME"]) / "hub" / folder / "snapshots").iterdir())
        pinned_folder = exiting(
            clean_env(**cli_env, EMBEDDINGS_MODEL=str(snapshot), MODEL_REVISIONS=f"{snapshot}=v1")
        )
        no_such = f"{EMBEDDINGS_MODEL}=v9"
        pinned_unknown = exiting({**online, "MODEL_REVISIONS": no_such, "HF_ENDPOINT": older_url})
        yield {
            "reranker": reranker,
            "factory": factory,
            "missing": (missing, missing_port, logs / "missing.log"),
            "swapped": swapped,
            "no_gpu": no_gpu,
            "hub_silent": cached,
            "hub_failing": failing,
            "download": (download, hub_requests, empty_cache),
            "pinned": (pinned, older_requests, pinned_cache),
            "pinned_cached": pinned_cached,
            "pinned_missing": pinned_missing,
            "pinned_unknown": (pinned_unknown, older_url),
            "incomplete": (incomplete, repository / "snapshots" / main),
            "completed": completed,
            "branch": (branch, refs, moving_requests),
            "pinned_folder": pinned_folder,
        }


# --- serving ------------------------------------------------------------------------------


def test_python_m_serves_embeddings(
    background: dict[str, Any], cli_embeddings_server: LiveServer
) -> None:
    with cli_embeddings_server.client() as client:
        assert client.get("/ready").status_code == 200
        info = client.get("/info").json()
        assert info["service_type"] == "embeddings"
        assert list(info["models"]) == [EMBEDDINGS_MODEL]
        # torch's threads on the CPU: never more than the cores a CPU limit leaves.
        assert 1 <= info["models"][EMBEDDINGS_MODEL]["cpu_threads"] <= usable_cores()
        reply = client.post("/v1/embeddings", json={"input": ["東京は日本の首都です"]})
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["data"][0]["embedding"]) == 64
        assert client.post("/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 404


def test_python_m_serves_reranker(background: dict[str, Any]) -> None:
    server: LiveServer = background["reranker"]
    wait_ready(server.base_url, process=server.process)
    with server.client() as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [RERANKER_MODEL]
        reply = client.post(
            "/v2/rerank", json={"query": "日本の首都", "documents": ["東京", "大阪", "京都"]}
        )
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["results"]) == 3
        assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 404


def test_uvicorn_factory_serves(background: dict[str, Any]) -> None:
    server: LiveServer = background["factory"]
    wait_ready(server.base_url, process=server.process)
    with server.client() as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert models == [EMBEDDINGS_MODEL, RERANKER_MODEL]
        embeddings = client.post("/v1/embeddings", json={"input": "東京"})
        assert embeddings.status_code == 200, embeddings.text
        rerank = client.post("/v1/rerank", json={"query": "東京", "documents": ["東京", "大阪"]})
        assert rerank.status_code == 200, rerank.text


# --- refusals -------------------------------------------------------------------------------


def assert_refused(done: subprocess.CompletedProcess[str], *names: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for name in names:
        assert name in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    return lines[0]


def _process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in _process_tree(int(child)))]


def test_torch_is_loaded_only_in_the_engine_process(background: dict[str, Any]) -> None:
    """The HTTP process and the tokenizer processes open the tokenizers the engine saved
    without torch (transformers' AutoTokenizer imports it: ~500 MiB and seconds in each
    of them; seen to fail so). Read from each process's memory map, after a request of
    each kind has opened every tokenizer and vocabulary."""
    server: LiveServer = background["factory"]
    wait_ready(server.base_url, process=server.process)
    with server.client() as client:
        assert client.post("/v1/embeddings", json={"input": ["東京"]}).status_code == 200
        assert (
            client.post("/v1/rerank", json={"query": "首都", "documents": ["東京"]}).status_code
            == 200
        )
        assert client.post("/tokenize", json={"inputs": "東京タワー"}).status_code == 200
    assert server.process is not None
    torch_in = {}
    for pid in _process_tree(server.process.pid):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        torch_in[command] = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    assert len(torch_in) == 3, torch_in  # the server, its tokenizer process, the engine
    assert {"engine.worker" in command for command, torch in torch_in.items() if torch} == {True}
    assert sum(torch_in.values()) == 1, torch_in


@pytest.mark.parametrize(
    ("env", "args"),
    [({"SERVICE_TYPE": "rerank"}, []), ({}, ["--service-type", "embedding"])],
)
def test_unknown_service_type_is_refused(env: dict[str, str], args: list[str]) -> None:
    line = assert_refused(run_entrypoint(env, args), "SERVICE_TYPE", "embeddings", "reranker")
    assert "rerank" in line or "embedding" in line  # echoes what it got


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (
            {"MAX_SEQ_LENGTH": "512", "MAX_BATCH_TOKENS": "100"},
            ("MAX_SEQ_LENGTH", "MAX_BATCH_TOKENS"),
        ),
        (
            {"MAX_BATCH_TOKENS": "5000", "MAX_QUEUE_TOKENS": "1000"},
            ("MAX_BATCH_TOKENS", "MAX_QUEUE_TOKENS"),
        ),
        ({"DEVICE": "cpu", "DTYPE": "float16"}, ("DEVICE", "DTYPE")),
        ({"DEVICE": "cuda", "DTYPE": "int8"}, ("DEVICE", "DTYPE")),
        ({"PORT": "70000"}, ("PORT",)),
        # It had failed after start-up as "Name or service not known", naming no setting.
        ({"HOST": "http://0.0.0.0"}, ("HOST", "without a scheme")),
        ({"HOST": "0.0.0.0:8081"}, ("HOST", "PORT")),
        ({"HOST": "[::1]:8081"}, ("HOST", "PORT")),
        # A pin that would pin nothing, and one that is no pair.
        (
            {"MODEL_REVISIONS": "nobody/else=v1"},
            ("MODEL_REVISIONS", "not a configured model", "--build-arg MODEL_REVISIONS"),
        ),
        ({"MODEL_REVISIONS": EMBEDDINGS_MODEL}, ("MODEL_REVISIONS", "model=revision")),
        (
            {"MODEL_REVISIONS": f"{EMBEDDINGS_MODEL}=v1,{EMBEDDINGS_MODEL}=v2"},
            ("MODEL_REVISIONS", "twice"),
        ),
        # The Hub takes a commit in full only: a short one would be looked for as a tag.
        ({"MODEL_REVISIONS": f"{EMBEDDINGS_MODEL}=1ae7c3f"}, ("MODEL_REVISIONS", "40")),
        # huggingface_hub reads it with int() on import: it had failed with tracebacks.
        ({"HF_HUB_ETAG_TIMEOUT": "abc"}, ("HF_HUB_ETAG_TIMEOUT", "whole number of seconds")),
        ({"DTYPE": "fp8"}, ("DTYPE", "float32")),
        ({"HF_HUB_ETAG_TIMEOUT": "²"}, ("HF_HUB_ETAG_TIMEOUT", "whole number of seconds")),
        # An empty HOST had listened on every IPv4 and IPv6 address, unannounced.
        ({"HOST": ""}, ("HOST", "is empty", "0.0.0.0")),
        # inf had passed, then crashed the start-up with a traceback.
        ({"SHUTDOWN_GRACE_SECONDS": "inf"}, ("SHUTDOWN_GRACE_SECONDS", "finite")),
        ({"KEEP_ALIVE_SECONDS": "1e400"}, ("KEEP_ALIVE_SECONDS", "finite")),
        # A served model's name taken by an alias had sent that model's requests elsewhere.
        (
            {"MODEL_ALIASES": f"{EMBEDDINGS_MODEL}=other/model"},
            ("MODEL_ALIASES", "is a configured model", "another alias"),
        ),
        (
            {"MODEL_ALIASES": "ruri-large=other/model"},
            ("MODEL_ALIASES", f"already a name of {EMBEDDINGS_MODEL}"),
        ),
        ({"MODEL_ALIASES": "a=ruri-large,a=other"}, ("MODEL_ALIASES", "gives a twice")),
        ({"MODEL_ALIASES": "=ruri-large"}, ("MODEL_ALIASES", "alias=model")),
        # It had been loaded twice, twice the memory.
        (
            {"EMBEDDINGS_MODEL": f"{EMBEDDINGS_MODEL},{EMBEDDINGS_MODEL}"},
            ("EMBEDDINGS_MODEL", "twice"),
        ),
        ({"API_KEYS": '["a", b'}, ("API_KEYS", "not a JSON list")),
    ],
)
def test_contradictory_or_invalid_settings_are_refused(
    env: dict[str, str], names: tuple[str, ...]
) -> None:
    assert_refused(run_entrypoint(env), *names)


@pytest.mark.parametrize("cause", ["port taken", "no such host"])
def test_a_server_that_cannot_listen_says_which_setting_to_look_at(
    cli_env: dict[str, str], cause: str
) -> None:
    """Exit 3, as documented; uvicorn's own line ("[Errno -2] Name or service not known")
    had been the last, naming neither HOST nor PORT."""
    with contextlib.closing(socket.socket()) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        host, port = "127.0.0.1", holder.getsockname()[1]
        if cause == "no such host":
            host, port = "no-such-host.invalid", free_port()
        done = run_entrypoint({**cli_env, "HOST": host, "PORT": str(port), "WARMUP": "false"})
    assert done.returncode == 3, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"fake-openai-server: could not listen on {host}:{port}" in last, last
    assert "PORT" in last and "HOST" in last, last


def test_missing_model_exits_with_a_clear_message(background: dict[str, Any]) -> None:
    """Offline and not in the cache: exit non-zero and say so, instead of hanging."""
    process, port, log_path = background["missing"]
    code = process.wait(timeout=180)
    stderr = log_path.read_text()
    assert code == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert f"could not load EMBEDDINGS_MODEL={MISSING_MODEL}: {MISSING_MODEL} is" in last, last
    # Where the cache is, why nothing is downloaded, and how to get the model there.
    for words in ("not in the model cache", "HF_HUB_OFFLINE=1", "fake_openai_server.preload"):
        assert words in last, last
    # Said by the server's log and by the command's last line: not a third time.
    assert stderr.count("not in the model cache") == 2, stderr[-3000:]
    assert "API_KEY is not a setting and is ignored: did you mean API_KEYS?" in stderr
    assert "API keys: none; every route is open" in stderr
    assert "sk-misspelt" not in stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.parametrize(
    ("service", "words"),
    [
        ("embeddings", ["EMBEDDINGS_MODEL=", "is a reranker", "ForSequenceClassification"]),
        ("reranker", ["RERANKER_MODEL=", "is not a reranker", "no classification head"]),
    ],
)
def test_a_model_of_the_other_kind_is_refused(
    background: dict[str, Any], service: str, words: list[str]
) -> None:
    """A reranker named as the embedding model, or the other way round, had started and
    served: vectors of the reranker's body, or scores of a randomly initialised head."""
    process = background["swapped"][service]
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert all(word in last for word in words), last


def test_device_cuda_without_a_gpu_is_refused_before_loading(background: dict[str, Any]) -> None:
    """It had loaded the model first, then failed in torch's words with exit 1."""
    process = background["no_gpu"]
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert "invalid setting: DEVICE=cuda, but torch" in last, last
    assert "no GPU" in last and "DEVICE=auto" in last, last
    assert "loading embeddings model" not in stderr


def test_a_cached_model_loads_at_once_when_the_hub_does_not_answer(
    background: dict[str, Any],
) -> None:
    """HF_HUB_OFFLINE unset (compose's default) on a closed network: huggingface_hub had
    asked about each file six times, and the start-up took minutes. (This Hub answers at
    its root: a question there had counted as an answer, and the start-up had hung.)"""
    server: LiveServer = background["hub_silent"]
    wait_ready(server.base_url, timeout=240, process=server.process, log_path=server.log_path)
    log = server.log(200)
    assert "WARNING fake_openai_server.backends.hub: the Hugging Face Hub (http://127.0.0.1:" in log
    assert f"cannot be reached (timed out): loading {EMBEDDINGS_MODEL} from the cache" in log
    assert "Retrying" not in log, log
    assert f"ready: {EMBEDDINGS_MODEL} (revision " in log
    with server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "東京"})
        assert reply.status_code == 200, reply.text


def test_a_model_missing_from_the_cache_is_downloaded_at_start_up(
    background: dict[str, Any], cli_env: dict[str, str]
) -> None:
    """Every new user's first start, which no test had taken: the Hub here is one on this
    machine that serves the stand-ins."""
    server, requests, cache = background["download"]
    wait_ready(server.base_url, timeout=240, process=server.process, log_path=server.log_path)
    log = server.log()
    assert f"{EMBEDDINGS_MODEL} is not in the model cache ({cache / 'hub'}): downloading" in log
    weights = f"GET /{EMBEDDINGS_MODEL}/resolve/"
    assert any(r.startswith(weights) and r.endswith("/model.safetensors") for r in requests)
    # huggingface_hub's HTTP client logs every request at INFO: not in the server's log.
    assert "HTTP Request:" not in log
    folder = f"models--{EMBEDDINGS_MODEL.replace('/', '--')}"
    served = (Path(cli_env["HF_HOME"]) / "hub" / folder / "refs" / "main").read_text().strip()
    assert (cache / "hub" / folder / "refs" / "main").read_text().strip() == served
    with server.client() as client:
        assert client.get("/info").json()["models"][EMBEDDINGS_MODEL]["revision"] == served
        reply = client.post("/v1/embeddings", json={"input": "東京"})
        assert reply.status_code == 200, reply.text


def test_model_revisions_loads_the_pinned_commit_not_main(background: dict[str, Any]) -> None:
    """A model's repository moves on (main), and the vectors in a vector DB were made by
    one commit of it: MODEL_REVISIONS keeps serving that one."""
    server, requests, cache = background["pinned"]
    wait_ready(server.base_url, timeout=240, process=server.process, log_path=server.log_path)
    log = server.log()
    assert f"{EMBEDDINGS_MODEL} (revision {OLDER}) is not in the model cache" in log
    assert f"loading embeddings model {EMBEDDINGS_MODEL} (revision {OLDER}) on" in log
    assert f"ready: {EMBEDDINGS_MODEL} (revision {OLDER})" in log
    weights = [r for r in requests if r.endswith("/model.safetensors")]
    assert weights and all(f"/resolve/{OLDER}/" in r for r in weights), weights
    folder = cache / "hub" / f"models--{EMBEDDINGS_MODEL.replace('/', '--')}"
    assert [p.name for p in (folder / "snapshots").iterdir()] == [OLDER]
    with server.client() as client:
        model = client.get("/info").json()["models"][EMBEDDINGS_MODEL]
        assert (model["revision"], model["max_length"]) == (OLDER, 256)  # main's reads 512
        reply = client.post("/v1/embeddings", json={"input": "東京"})
        assert reply.status_code == 200, reply.text


def test_a_pinned_commit_in_the_cache_needs_no_hub(background: dict[str, Any]) -> None:
    """HF_HUB_OFFLINE unset and a Hub that never answers: a commit in the cache is loaded
    without asking it (nor waiting for it), where main would be asked about."""
    server: LiveServer = background["pinned_cached"]
    wait_ready(server.base_url, timeout=240, process=server.process, log_path=server.log_path)
    log = server.log()
    assert "cannot be reached" not in log and "WARNING" not in log, log
    with server.client() as client:
        model = client.get("/info").json()["models"][EMBEDDINGS_MODEL]
        assert (model["revision"], model["max_length"]) == (OLDER, 256)


def test_a_pinned_revision_that_is_nowhere_is_named(background: dict[str, Any]) -> None:
    """Offline, not in the cache: the message names the revision, not the model alone
    (main is there). On the Hub, no such revision: not huggingface_hub's bare
    "404 Client Error", but the setting and what to put there."""
    process = background["pinned_missing"]
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert f"{EMBEDDINGS_MODEL} (revision {'2' * 40}) is not in the model cache" in last, last
    process, url = background["pinned_unknown"]
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert f"MODEL_REVISIONS pins {EMBEDDINGS_MODEL} to v9, which {url} does not have" in last
    assert "404 Client Error" not in stderr, stderr[-2000:]


def test_a_pinned_commit_cut_short_in_the_cache_is_completed_from_the_hub(
    background: dict[str, Any],
) -> None:
    """A cached commit is loaded without asking the Hub; when its copy lacks its weights
    (a download cut short) the Hub is asked after all, as the message about it says."""
    server: LiveServer = background["completed"]
    wait_ready(server.base_url, timeout=240, process=server.process, log_path=server.log_path)
    assert f"{EMBEDDINGS_MODEL}: its copy in the cache is incomplete: completing it" in server.log()
    with server.client() as client:
        model = client.get("/info").json()["models"][EMBEDDINGS_MODEL]
        assert (model["revision"], model["max_length"]) == (OLDER, 256)


def test_an_engine_restart_loads_the_commit_the_start_loaded(background: dict[str, Any]) -> None:
    """Pinned to a branch (or to nothing: main), a restart had asked the Hub again and
    loaded whatever the branch had moved to, under the first commit's /info revision and
    tokenizer."""
    server, refs, requests = background["branch"]
    wait_ready(server.base_url, timeout=240, process=server.process, log_path=server.log_path)
    main = (refs / "main").read_text().strip()
    with server.client() as client:
        assert client.get("/info").json()["models"][EMBEDDINGS_MODEL]["revision"] == main
    (refs / "v2").write_text(OLDER)  # the branch moves on the Hub
    asked = len(requests)
    assert server.process is not None
    engine = [
        pid
        for pid in _process_tree(server.process.pid)
        if b"engine.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(engine) == 1, engine
    os.kill(engine[0], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while "engine restarted" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = server.log()
    assert "engine restarted" in log, log[-3000:]
    assert f"loading embeddings model {EMBEDDINGS_MODEL} (revision {main}) on" in log
    # Nor is the Hub asked about the model again (huggingface_hub asks other things of
    # its own, such as /api/agent-harnesses, whenever it likes).
    about = [r for r in requests[asked:] if EMBEDDINGS_MODEL in r]
    assert about == [], about
    with server.client() as client:
        assert client.post("/v1/embeddings", json={"input": "東京"}).status_code == 200


def test_a_pin_for_a_folder_is_refused(background: dict[str, Any]) -> None:
    process = background["pinned_folder"]
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert "MODEL_REVISIONS pins" in last and "a folder" in last, last


def test_a_copy_cut_short_in_the_cache_is_named_with_what_to_do(
    background: dict[str, Any],
) -> None:
    """A first download interrupted, then started offline: transformers' own words
    ("does not appear to have a file named ...") named neither the cache nor a remedy."""
    process, snapshot = background["incomplete"]
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert f"{EMBEDDINGS_MODEL}'s copy in the model cache ({snapshot}) cannot be loaded" in last
    assert "model.safetensors" in last and "HF_HUB_OFFLINE unset" in last, last
    assert "Traceback" not in stderr, stderr[-3000:]


def test_max_seq_length_above_the_models_own_is_cut_with_a_warning(
    background: dict[str, Any],
) -> None:
    server: LiveServer = background["hub_silent"]
    wait_ready(server.base_url, timeout=240, process=server.process, log_path=server.log_path)
    assert f"MAX_SEQ_LENGTH=1024 is more than {EMBEDDINGS_MODEL} reads" in server.log(200)
    with server.client() as client:
        assert client.get("/info").json()["models"][EMBEDDINGS_MODEL]["max_length"] == 512


def test_a_missing_model_fails_at_once_when_the_hub_cannot_be_reached(
    background: dict[str, Any],
) -> None:
    """Here the Hub is a mirror that answers 502: it had counted as an answer, and
    huggingface_hub had retried each file's question."""
    process = background["hub_failing"]
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    for words in (
        f"could not load EMBEDDINGS_MODEL={MISSING_MODEL}: {MISSING_MODEL} is not in the",
        "the Hugging Face Hub (http://127.0.0.1:",
        "cannot be reached to download (HTTP 502)",
        "HTTPS_PROXY",
    ):
        assert words in last, last
    assert "Retrying" not in stderr, stderr[-3000:]


def test_no_progress_bar_reaches_a_log(background: dict[str, Any]) -> None:
    """transformers' bar (carriage returns and escapes) had reached ``docker logs``."""
    server: LiveServer = background["reranker"]
    wait_ready(server.base_url, timeout=240, process=server.process, log_path=server.log_path)
    log = server.log()
    assert "loading reranker model" in log
    assert "Loading weights" not in log and "\r" not in log


def run_preload(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fake_openai_server.preload"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_preload_downloads_the_configured_models(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The documented offline preparation: every model of SERVICE_TYPE=all, from a Hub
    (one here, serving the stand-ins) into an empty cache."""
    cache = tmp_path / "hf"
    with local_hub(Path(cli_env["HF_HOME"])) as (url, _):
        env = clean_env(HF_HOME=str(cache), HF_ENDPOINT=url, SERVICE_TYPE="all")
        del env["HF_HUB_OFFLINE"]
        done = run_preload(env)
    assert done.returncode == 0, done.stderr
    for name in (EMBEDDINGS_MODEL, RERANKER_MODEL):
        folder = cache / "hub" / f"models--{name.replace('/', '--')}"
        commit = (folder / "refs" / "main").read_text().strip()
        assert f"{name}: {folder / 'snapshots' / commit}" in done.stderr
        source = Path(cli_env["HF_HOME"]) / "hub" / folder.name / "snapshots" / commit
        assert _files(folder / "snapshots" / commit) == _files(source)


@pytest.mark.parametrize(
    ("hub", "why"), [("closed", "Connection refused"), ("stalled", "timed out")]
)
def test_preload_that_cannot_download_says_why_in_a_line(
    tmp_path: Path, hub: str, why: str
) -> None:
    """It had ended in huggingface_hub's traceback, or (a Hub that stalls) never."""
    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(broken_hub(stall=True))
            if hub == "stalled"
            else f"http://127.0.0.1:{free_port()}"  # nothing listens there
        )
        env = clean_env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=url, HF_HUB_ETAG_TIMEOUT="2")
        del env["HF_HUB_OFFLINE"]
        done = run_preload(env)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"could not download {EMBEDDINGS_MODEL} from http://127.0.0.1:" in lines[0]
    assert str(tmp_path / "hf") in lines[0] and why in lines[0]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_preload_fetches_the_pinned_commit_and_completes_it(
    tmp_path: Path, two_revisions: Path
) -> None:
    cache = tmp_path / "hf"
    folder = f"models--{EMBEDDINGS_MODEL.replace('/', '--')}"
    snapshot = cache / "hub" / folder / "snapshots"
    source = two_revisions / "hub" / folder / "snapshots" / OLDER
    with local_hub(two_revisions) as (url, _):
        env = clean_env(HF_HOME=str(cache), HF_ENDPOINT=url)
        env["MODEL_REVISIONS"] = f"{EMBEDDINGS_MODEL}={OLDER}"
        del env["HF_HUB_OFFLINE"]
        done = run_preload(env)
        assert done.returncode == 0, done.stderr
        assert f"{EMBEDDINGS_MODEL}: {snapshot / OLDER}" in done.stderr
        assert [p.name for p in snapshot.iterdir()] == [OLDER]
        assert _files(snapshot / OLDER) == _files(source)  # 1_Pooling/config.json too
        # A download cut short: preload completes it (the commit alone is no proof).
        (snapshot / OLDER / "model.safetensors").unlink()
        again = run_preload(env)
        assert again.returncode == 0, again.stderr
        assert _files(snapshot / OLDER) == _files(source)
    # With the Hub gone: the commit is in the cache, so there is nothing newer to look for.
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    gone = run_preload(env)
    assert gone.returncode == 0, gone.stderr
    assert gone.stderr.startswith(f"{EMBEDDINGS_MODEL}: {snapshot / OLDER} (the Hub not reached")
    # main, which may have moved, cannot be checked: said, and whether the cache serves.
    del env["MODEL_REVISIONS"]
    unpinned = run_preload({**env, "HF_HOME": str(two_revisions)})
    assert unpinned.returncode == 1, unpinned.stderr
    assert "the Hub cannot be reached" in unpinned.stderr
    assert "the server can start from the copies in the cache" in unpinned.stderr
    both = run_preload({**env, "HF_HOME": str(two_revisions), "SERVICE_TYPE": "all"})
    assert both.returncode == 1, both.stderr
    assert "the server can start" not in both.stderr  # the reranker is not there


def test_preload_refuses_a_pin_for_a_folder(cli_env: dict[str, str]) -> None:
    folder = f"models--{EMBEDDINGS_MODEL.replace('/', '--')}"
    snapshot = next((Path(cli_env["HF_HOME"]) / "hub" / folder / "snapshots").iterdir())
    env = clean_env(**cli_env, EMBEDDINGS_MODEL=str(snapshot), MODEL_REVISIONS=f"{snapshot}=v1")
    done = run_preload(env)
    assert done.returncode == 2, done.stderr
    assert "invalid setting: MODEL_REVISIONS pins" in done.stderr and "a folder" in done.stderr


def test_preload_offline_names_what_is_missing(tmp_path: Path, cli_env: dict[str, str]) -> None:
    pin = f"{EMBEDDINGS_MODEL}={'3' * 40}"
    done = run_preload(clean_env(**cli_env, MODEL_REVISIONS=pin))
    assert done.returncode == 1, done.stderr
    assert f"not in the cache at revision {'3' * 40}, and HF_HUB_OFFLINE=1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_help_lists_every_setting() -> None:
    done = run_entrypoint({}, ["--help"])
    assert done.returncode == 0, done.stderr
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in done.stdout, flag
        assert field.description, name  # every setting says what it is
    # Every default is shown as a value: a default factory printed only as "Settings.<lambda>".
    assert "default factory" not in done.stdout
    assert "(default: ['cl-nagoya/ruri-large'])" in " ".join(done.stdout.split())
    # One default a setting: a description that gave its own had "(default ...) (default: null)".
    assert not re.search(r"\(default[^)]*\)\s+\(default", done.stdout), done.stdout


# --- keep-alive ------------------------------------------------------------------------------


def _idle_then_ask(server: LiveServer, idle: float) -> int | None:
    """Ask on one connection, leave it idle ``idle`` seconds, ask again: the second
    answer's status, or None when the server had closed the connection meanwhile."""
    request = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
    with server.connect() as sock:
        for attempt in range(2):
            if attempt:
                time.sleep(idle)
            try:
                sock.sendall(request)
                reply = http.client.HTTPResponse(sock)
                reply.begin()
                reply.read()
            except (http.client.RemoteDisconnected, ConnectionError):
                return None
    return reply.status


def test_an_idle_connection_outlives_the_clients_own_idle_limit(tmp_path: Path) -> None:
    """httpx (the openai SDK, Dify) drops a connection idle for 5 s, and so did uvicorn by
    default: a request sent on one just as the server closed it failed with a reset. The
    server keeps an idle connection KEEP_ALIVE_SECONDS (75 by default), so clients close
    first; a shorter setting closes sooner."""
    settings = {"service_type": "embeddings", "warmup": False}
    with fake_cli(settings, {}, tmp_path) as server:
        assert _idle_then_ask(server, idle=6) == 200
    with fake_cli({**settings, "keep_alive_seconds": 1}, {}, tmp_path) as server:
        assert _idle_then_ask(server, idle=2.5) is None


def test_a_request_that_does_not_arrive_in_time_loses_its_connection(tmp_path: Path) -> None:
    """READ_TIMEOUT_SECONDS reaches the CLI's uvicorn: a connection that stops half-way
    through its headers is closed, and the log says why (``api/connections.py``; the cases
    are in tests/hardening/test_slow_clients.py)."""
    settings = {"service_type": "embeddings", "warmup": False, "read_timeout_seconds": 1}
    with fake_cli(settings, {}, tmp_path) as server:
        with server.connect() as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: te")
            started = time.monotonic()
            assert sock.recv(1024) == b""
            assert 0.9 <= time.monotonic() - started < 5
        deadline = time.monotonic() + 5
        while "READ_TIMEOUT_SECONDS=1" not in server.log():
            assert time.monotonic() < deadline, server.log(20)
            time.sleep(0.05)
        with server.client() as client:
            assert client.post("/v1/embeddings", json={"input": "東京"}).status_code == 200
