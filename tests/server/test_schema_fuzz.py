"""Schema fuzzing (SPEC: "no 5xx under schema fuzzing of the OpenAPI document").

Every operation of the server's own `/openapi.json` is fuzzed with schemathesis (4.x API), with both
schema-valid (positive) and schema-violating (negative) inputs, against a real uvicorn server. A case
passes when the server answers with a status < 500; failures are collected and reported together.

Generation is bounded and derandomized so the run is fast and identical on every CI run: a few
examples per operation and mode, no Hypothesis database, and a server with a tiny context
(`max_model_len`/`default_max_tokens`) so no generated `max_tokens` can make a case run long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

schemathesis = pytest.importorskip("schemathesis",
                                   reason="schemathesis not installed (pip install 'delta-mem-vllm[test]')")

import requests  # noqa: E402  (a schemathesis dependency)

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tests.server.conftest import ThreadServer, make_settings  # noqa: E402

MAX_EXAMPLES = 20          # per operation and generation mode
HTTP_TIMEOUT = 30          # seconds per request; a hang is a failure too
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory):
    settings_ = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), max_model_len=64, default_max_tokens=2,
                              max_request_bytes=64 * 1024, session_wait_timeout=5)
    srv = ThreadServer(settings_).start()
    yield srv
    srv.stop()


@dataclass
class Tally:
    cases: int = 0
    note: str = ""
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _describe(case, status: int | str, body: str) -> str:
    """Operation, status, the exact request (as curl) and a response excerpt."""
    try:
        request = case.as_curl_command()
    except Exception:  # noqa: BLE001 - fall back to the raw parts
        request = f"{case.method.upper()} {case.formatted_path} query={case.query!r} body={case.body!r}"
    return f"{case.operation.label} -> {status}\n  {request[:800]}\n  response: {body[:400]!r}"


def _fuzz(operation, mode: GenerationMode, base_url: str, http: requests.Session, tally: Tally,
          **pinned) -> None:
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: every failure is recorded, not raised
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, **pinned))
    def run(case) -> None:
        tally.cases += 1
        try:
            response = case.call(base_url=base_url, session=http, timeout=HTTP_TIMEOUT)
        except requests.RequestException as exc:   # connection reset, timeout: the server fell over
            tally.failures.append(_describe(case, type(exc).__name__, str(exc)))
            return
        status = response.status_code
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        if status >= 500:
            tally.failures.append(_describe(case, status, response.text))

    try:
        run()
    except Unsatisfiable:
        # Negative mode on an operation whose inputs cannot be made schema-invalid (e.g. a path parameter of
        # plain `type: string`): schemathesis generates nothing. Positive mode still covers the operation.
        if mode is not GenerationMode.NEGATIVE or tally.cases:
            raise
        tally.note = "nothing to negate"


def test_no_5xx_under_schema_fuzzing(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]   # every route is in the document
    tallies: dict[str, Tally] = {}
    with requests.Session() as http:
        for operation in operations:
            for mode in MODES:
                if mode is GenerationMode.NEGATIVE and not _has_inputs(operation):
                    continue
                tally = tallies.setdefault(f"{operation.label} ({mode.value})", Tally())
                _fuzz(operation, mode, server.url, http, tally)
            # Generated ids are mostly invalid or unknown (400/404): fuzz the same operation once more on a
            # live session with history and state, so the handlers behind the id check see fuzzed input too.
            if any(p.name == "session_id" and p.location == "path" for p in operation.iter_parameters()):
                sid = _live_session(http, server.url, operation.label)
                tally = tallies.setdefault(f"{operation.label} (positive, live session)", Tally())
                _fuzz(operation, GenerationMode.POSITIVE, server.url, http, tally, path_parameters={"session_id": sid})
    failures = [f for t in tallies.values() for f in t.failures]
    total = sum(t.cases for t in tallies.values())
    summary = "\n".join(f"{k}: {t.cases} cases, statuses {dict(sorted(t.statuses.items()))} {t.note}".rstrip()
                        for k, t in tallies.items())
    print(f"\nschemathesis {schemathesis.__version__}: {len(operations)} operations, {total} cases\n{summary}")
    assert total >= len(operations) * 5, summary
    assert not failures, f"{len(failures)} case(s) got a 5xx or no response:\n\n" + "\n\n".join(failures[:20])
    assert requests.get(f"{server.url}/ready", timeout=HTTP_TIMEOUT).status_code == 200   # still serving


def _has_inputs(operation) -> bool:
    """Operations without parameters or a body have nothing negative mode could violate."""
    return any(True for _ in operation.iter_parameters()) or any(True for _ in operation.body)


def _live_session(http: requests.Session, base_url: str, label: str) -> str:
    """A fresh session with one turn of history (written state) behind it."""
    sid = "fuzz-" + "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    r = http.post(f"{base_url}/v1/chat/completions", timeout=HTTP_TIMEOUT,
                  json={"model": "tiny", "session_id": sid, "max_tokens": 2, "temperature": 0,
                        "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    return sid
