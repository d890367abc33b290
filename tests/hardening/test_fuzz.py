"""Property-based fuzzing of every route, generated from the app's own OpenAPI document.

schemathesis generates schema-valid (positive) and schema-violating (negative)
requests for each documented operation and sends them over a real socket to the
app served by uvicorn, over the deterministic fake backends, behind an API key.
Every reply must pass schemathesis's checks: no 5xx, the status code, content
type, headers and body are the documented ones, invalid data is rejected, and a
route that needs a key refuses a request without it.

Schema-valid requests may still get a (documented) 400: some constraints depend on
the model (``dimensions``, token ids in the vocabulary) or on other fields
(``rank_fields``), so the positive-acceptance check is left out; the test instead
requires a healthy share of 200s, so that the success path is fuzzed too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from fake_openai_server.api.app import build_app
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin
from tests.support.live import LiveServer, serve_app

KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 120  # per operation and generation mode
APP = build_app(
    Settings(service_type="all", warmup=False, allow_token_ids=True, api_keys=[KEY]),
    fake_plugin(),
)
SCHEMA = schemathesis.openapi.from_dict(APP.openapi())
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
STATUSES: Counter[tuple[str, str, int]] = Counter()


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serve_app(APP) as live:
        yield live


def test_every_route_is_documented(server: LiveServer) -> None:
    served = httpx.get(f"{server.base_url}/openapi.json", headers=AUTH).json()
    assert served == APP.openapi()
    assert set(OPERATIONS) == {
        "GET /",
        "GET /health",
        "GET /ready",
        "GET /v1/models",
        "GET /v1/models/{model}",
        "GET /info",
        "GET /metrics",
        "POST /v1/embeddings",
        "POST /v1/rerank",
        "POST /v2/rerank",
        "GET /info/quantization",
        "POST /embed",
        "POST /similarity",
        "POST /tokenize",
        "POST /decode",
        "POST /api/embed",
        "POST /api/embeddings",
        "POST /api/rerank",
        "GET /api/tags",
        "GET /api/ps",
        "GET /api/version",
        "POST /api/show",
        "POST /api/pull",
        "POST /v1/embed",
        "POST /v2/embed",
        "POST /openai/deployments/{deployment}/embeddings",
    }


def _fuzz(label: str, mode: GenerationMode, base_url: str, session: requests.Session) -> None:
    operation = OPERATIONS[label]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: failures reproduce
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        if mode is GenerationMode.POSITIVE and label in SERVED_PATH_PARAMETERS:
            case.path_parameters = SERVED_PATH_PARAMETERS[label]
        if mode is GenerationMode.POSITIVE and label in SERVED_BODY_FIELDS:
            case.body = {**case.body, **SERVED_BODY_FIELDS[label]}
        response = case.call_and_validate(
            base_url=base_url,
            session=session,
            headers=AUTH,
            excluded_checks=[positive_data_acceptance, *EXCLUDED.get(label, [])],
        )
        STATUSES[(label, mode.value, response.status_code)] += 1

    try:
        check()
    except Unsatisfiable:
        # No parameters and no body: there is nothing to make invalid.
        assert operation.method.upper() == "GET", label
        assert mode is GenerationMode.NEGATIVE


# A query parameter the route does not know is ignored, as HTTP servers do; schemathesis
# counts one (``?=0``) as invalid data that should have been refused. The route's own
# parameters are still fuzzed: a bad ``dimensions`` must get its documented 400.
EXCLUDED = {"GET /info/quantization": [negative_data_rejection]}

# Azure's deployment names a served model: any other string is rightly a 404 (the
# negative cases send those). The valid cases name one, so that their bodies are served.
SERVED_PATH_PARAMETERS = {
    "POST /openai/deployments/{deployment}/embeddings": {"deployment": "ruri-large"}
}

# Ollama's pull needs a model's name, and succeeds only for a served one: the valid
# bodies name one, so that they are served (the invalid ones are fuzzed as generated).
SERVED_BODY_FIELDS = {"POST /api/pull": {"model": "ruri-large"}}

# TEI's /decode takes nothing but token ids, which must lie in the model's vocabulary
# (1000 ids for the fake model): the schema cannot say that, so most generated requests
# are rightly refused with 400. A smaller share of 200s is still required.
SUCCESS_SHARE = {"POST /decode": 0.1}


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_fuzz(label: str, server: LiveServer) -> None:
    operation = OPERATIONS[label]
    with requests.Session() as session:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(label, mode, server.base_url, session)

    sent = {mode: n for (op, mode, _), n in STATUSES.items() if op == label}
    assert all(status < 500 for (op, _, status) in STATUSES if op == label)
    if operation.method.upper() == "POST":
        counts = Counter[str]()
        for (op, mode, status), n in STATUSES.items():
            if op == label:
                counts[mode] += n
                counts[f"{mode}-{status}"] += n
        assert counts["positive"] >= EXAMPLES * 0.9, counts
        assert counts["negative"] >= EXAMPLES * 0.9, counts
        assert counts["positive-200"] >= SUCCESS_SHARE.get(label, 0.15) * counts["positive"], counts
    else:
        assert sent


def test_fuzzing_sent_over_a_thousand_requests() -> None:
    """Runs after the fuzz tests above (file order): the total they sent."""
    if len({op for op, _, _ in STATUSES}) < len(OPERATIONS):
        pytest.skip("run with the whole module")
    total = sum(STATUSES.values())
    assert total >= 1000, STATUSES


# --- the real tokenizers and models (tiny stand-ins) ----------------------------------

REAL_EXAMPLES = 60


@pytest.mark.parametrize(
    ("fixture", "label"),
    [
        ("embeddings_server", "POST /v1/embeddings"),
        ("rerank_server", "POST /v1/rerank"),
    ],
)
def test_fuzz_real_models(fixture: str, label: str, request: pytest.FixtureRequest) -> None:
    """Schema-valid text, any Unicode, through MeCab, the HF tokenizers and the models."""
    server: LiveServer = request.getfixturevalue(fixture)
    document = httpx.get(f"{server.base_url}/openapi.json").json()
    operation = next(
        result.ok()
        for result in schemathesis.openapi.from_dict(document).get_all_operations()
        if result.ok().label == label
    )
    seen: Counter[int] = Counter()

    @settings(
        max_examples=REAL_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=server.base_url, session=session, excluded_checks=[positive_data_acceptance]
        )
        seen[response.status_code] += 1

    with requests.Session() as session:
        check()
    assert sum(seen.values()) >= REAL_EXAMPLES * 0.9, seen
    assert seen[200] >= 0.15 * sum(seen.values()), seen
