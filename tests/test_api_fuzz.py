"""Fuzz the HTTP API from its own OpenAPI description (/openapi.json) against the real daemon:
whatever the input, no 500, and every error in the documented shape — {"error": "..."} on the
Ollama routes, {"error": {"message": ..., "type": ...}} under /v1."""
from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from harness.daemon import running_daemon
from harness.models import scripted_model

EXAMPLES_PER_OPERATION = 100
WORDS = 2


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    entries = [scripted_model(root, "fz", reply_words=WORDS, tokens_per_second=2000)]
    with running_daemon(root, entries, "--max-body-bytes", "65536", "--request-deadline-s", "20") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def api_schema(fuzz_daemon):
    schema = schemathesis.openapi.from_url(f"{fuzz_daemon.url}/openapi.json")
    # follow=true is an endless NDJSON stream of the runner's log by design, /api/events an
    # endless event stream (its filters are checked in test_events)
    return schema.exclude(path="/api/logs/{model}").exclude(path="/api/events")


def assert_documented_error(path: str, status: int, body: bytes) -> None:
    try:
        data = json.loads(body)
    except ValueError:
        pytest.fail(f"{path} answered {status} with a body that is not JSON: {body[:300]!r}")
    if path.startswith("/v1/"):
        assert isinstance(data, dict) and set(data) == {"error"}, (path, status, data)
        error = data["error"]
        assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], (path, data)
        assert {"message", "type"} <= set(error), (path, data)
    else:
        assert isinstance(data, dict) and set(data) == {"error"}, (path, status, data)
        assert isinstance(data["error"], str) and data["error"], (path, status, data)


# Known daemon bugs, each pinned by a strict xfail test; the fuzzing looks past them so it can
# find the next one: add (status, body fragment) here while a bug waits for its fix.
KNOWN_BUGS: tuple[tuple[int, bytes], ...] = ()


def check_case(case) -> None:
    response = case.call(timeout=30)
    path = case.operation.path
    status = response.status_code
    if any(status == code and needle in response.content for code, needle in KNOWN_BUGS):
        return
    assert status != 500 and (status < 500 or status == 503), (
        f"{case.method} {case.formatted_path} -> {status}: {response.content[:500]!r}\n"
        f"reproduce: {case.as_curl_command()}"
    )
    if status >= 400 and case.method != "HEAD":
        assert_documented_error(path, status, response.content)


def test_no_input_gives_a_500_and_errors_keep_their_shape(api_schema):
    """Every operation, with valid and invalid inputs generated from its description (bounded,
    derandomized so a failure reproduces). Failures of all operations are reported together."""
    failures, operations = [], 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode), real_model=st.booleans())
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
            def run(case, real_model: bool) -> None:
                if real_model:  # half the cases name the served model, to reach past the 404
                    if isinstance(case.body, dict) and "model" in case.body:
                        case.body["model"] = "fz"
                    for key in ("model", "model_id"):
                        if key in (case.path_parameters or {}):
                            case.path_parameters[key] = "fz"
                check_case(case)

            try:
                run()
            except Unsatisfiable:
                continue  # no invalid input exists (e.g. a GET without parameters)
            except Exception as exc:  # noqa: BLE001 - collected, reported below with the case
                failures.append(f"{operation.method.upper()} {operation.path} [{mode.value}]: {exc}")
    assert operations >= 15, f"only {operations} operations in /openapi.json"
    assert not failures, "\n\n".join(failures)


def test_the_fuzzed_daemon_still_serves(fuzz_daemon):
    """After the fuzzing, the model answers exactly and the daemon is healthy."""
    from chaos_support import wait_answer

    wait_answer(fuzz_daemon.url, "fz", "after-fuzz", WORDS, timeout=30)
    with fuzz_daemon.client() as http:
        assert http.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("route, extra", [
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/api/generate", {"prompt": "hi"}),
])
@pytest.mark.parametrize("keep_alive", ["", "soon"])
def test_invalid_keep_alive_is_a_400_not_a_500(fuzz_daemon, route, extra, keep_alive):
    """Found by the fuzzing: `keep_alive: ""` raised ValueError inside the route, a 500."""
    with fuzz_daemon.client() as http:
        reply = http.post(route, json={"model": "fz", "stream": False, "keep_alive": keep_alive, **extra})
    assert reply.status_code == 400, reply.text
    assert "keep_alive" in reply.json()["error"]


@pytest.mark.parametrize("body", [b'{"keep_alive": 251605707415.0}', b'{"keep_alive": Infinity}', b'{"keep_alive": "99999999999h"}'])
def test_a_keep_alive_past_any_date_is_forever_not_a_500(fuzz_daemon, body):
    """Found by the fuzzing: a keep_alive of 8000 years (or JSON's Infinity, which Python's parser
    takes) put the expiry past the last date a timestamp can hold, and the load and every status
    answered 500. Longer than a century is forever, as a negative keep_alive is."""
    with fuzz_daemon.client() as http:
        reply = http.post("/api/models/fz/load", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 200, reply.text
        status = http.get("/api/status/fz")
        assert status.status_code == 200, status.text
        assert status.json()["expires_at"] is None
        http.post("/api/models/fz/load", json={"keep_alive": "5m"}).raise_for_status()
        assert http.get("/api/status/fz").json()["expires_at"] is not None  # the check above can fail
