"""Property-based fuzzing of the real API against its own OpenAPI document (schemathesis).

A real uvicorn API runs on Redis DB 11 and a temporary artifacts directory, both emptied
afterwards, so nothing the fuzzer makes leaks into other tests. A worker finishes two tiny
jobs first and is stopped before fuzzing: jobs the fuzzer submits just stay queued. The schema
is loaded over HTTP from `/openapi.json`, as a client sees it, and every operation, the
multipart `POST /v1/jobs` included, gets a bounded number of generated requests, valid and
invalid (schemathesis's positive and negative modes).

Random bytes never make a loadable model, so the fuzzer alone would only ever reach the
first refusal of an upload, and random ids only ever name missing jobs. So about half the
valid-shaped uploads get their generated files swapped for a real tiny model and real data
(reaching the options, callback and Idempotency-Key paths, and making queued jobs), and
about two thirds of the job ids are aimed at jobs that exist (succeeded, queued or
cancelled). Which ones is a fixed function of the generated case (a CRC of it), not a second
random draw: schemathesis cannot combine `@schema.given` with the schema's examples, and
replays and shrinking must see the same request for the same case.

Every answer must be: no 5xx, a status code the operation declares, the declared content
type, headers and body schema; invalid requests refused (4xx); requests without the key 401.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.parameters import ParameterLocation  # noqa: E402
from schemathesis.core.result import Ok  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.serialization import Binary  # noqa: E402
from service_helpers import (  # noqa: E402
    API_KEY,
    CALLBACK_SECRET,
    final,
    free_port,
    owned_redis_db,
    poll_job,
    service_env,
    start_api,
    start_worker,
    wait_api,
    wait_worker,
)

REDIS_URL = "redis://127.0.0.1:6379/11"
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
"""Per operation and generation mode: every refusal path, in about a minute on two cores.
`FUZZ_EXAMPLES=500 FUZZ_RANDOM=1` hunts deeper, with fresh randomness each run."""
RANDOM = bool(os.environ.get("FUZZ_RANDOM"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]
UPLOAD = "POST /v1/jobs"


@dataclass
class Target:
    """The running API, real inputs to upload, and the jobs known to exist."""

    base_url: str
    files: dict[str, bytes]
    jobs: list[str] = field(default_factory=list)
    etag: str = ""
    seen: Counter[tuple[str, int, str]] = field(default_factory=Counter)


def _real_inputs(root: Path) -> dict[str, bytes]:
    """A tiny untrained model and matching data: what passes the upload's cheap checks."""
    from factories import save_npz, sequential_bn_flatten, textures, trigger_set

    sequential_bn_flatten(seed=0).save(root / "model.keras")
    x, y = textures(40, seed=1)
    xt, yt = trigger_set(20, seed=2)
    paths = {
        "model": root / "model.keras",
        "data": save_npz(root / "data.npz", x=x, y=y),
        "trigger_data": save_npz(root / "trigger.npz", x=xt, y_target=yt),
        "test_data": save_npz(root / "test.npz", x=x[:20], y=y[:20]),
    }
    return {name: path.read_bytes() for name, path in paths.items()}


@pytest.fixture(scope="module")
def fuzz_redis() -> Iterator[None]:
    """Redis DB 11 belongs to this module while it runs: emptied before and after."""
    with owned_redis_db(REDIS_URL):
        yield


@pytest.fixture(scope="module")
def target(fuzz_redis: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A real API with an API key and a callback secret, and jobs in every reachable state.

    A worker runs just long enough to finish two tiny jobs, then stops: everything the fuzzer
    submits afterwards stays queued. The first keeps its files (report, HTML, PNG and model
    answer 200, and 304 to its ETag), the second's are deleted (410). Then one job stays
    queued and one is cancelled (409).
    """
    root = tmp_path_factory.mktemp("fuzz")
    env = service_env(
        root / "artifacts",
        REDIS_URL,
        api_keys=API_KEY,
        callback_secret=CALLBACK_SECRET,
        max_model_bytes=256 * 1024,
        max_data_bytes=256 * 1024,
    )
    port = free_port()
    api = start_api(env, port, root / "api.log")
    worker = start_worker(env, root / "worker.log", "fuzzworker")
    running = Target(f"http://127.0.0.1:{port}", _real_inputs(root))
    try:
        wait_api(running.base_url, api)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=running.base_url, headers=headers, timeout=30) as client:

            def submit(options: dict[str, int]) -> str:
                files = {k: (k, running.files[k]) for k in ("model", "data")}
                response = client.post(
                    "/v1/jobs", files=files, data={"options": json.dumps(options)}
                )
                assert response.status_code == 202, response.text
                return response.json()["id"]

            wait_worker(worker)
            done = [submit({"epochs": 1, "seed": seed}) for seed in (0, 1)]
            for job_id in done:
                body = poll_job(client, job_id, final, timeout=180, interval=0.5)
                assert body["state"] == "succeeded", body
            worker.stop()
            # The second keeps its record but loses its files: downloads answer 410.
            assert client.delete(f"/v1/jobs/{done[1]}").status_code == 200
            running.etag = client.get(f"/v1/jobs/{done[0]}/model").headers["etag"]
            running.jobs.extend(done)
            running.jobs.extend(submit({"seed": seed}) for seed in (2, 3))
            assert client.delete(f"/v1/jobs/{running.jobs[-1]}").status_code == 200
        yield running
        assert api.popen.poll() is None, f"the API died while fuzzed:\n{api.tail()}"
    finally:
        worker.stop()
        api.stop()
        _print_coverage(running.seen)


def _print_coverage(seen: Counter[tuple[str, int, str]]) -> None:
    """What the run reached, per operation, status and error code (visible with -s)."""
    if not seen:
        return
    print("\nfuzz examples per operation, status and error code:")
    for (label, status, code), count in sorted(seen.items()):
        print(f"  {count:5d}  {status}  {label}  {code}")
    print(f"  {sum(seen.values()):5d}  in all")


@pytest.fixture(scope="module")
def api_schema(target: Target) -> schemathesis.BaseSchema:
    """The schema as published over HTTP, bounded so the module runs in about a minute."""
    config = schemathesis.Config.from_dict(
        {
            # Through the security scheme, not a fixed header: schemathesis then knows which
            # requests it sent without a key (negative mode, `ignored_auth`) and expects 401.
            "auth": {"openapi": {"HTTPBearer": {"bearer": API_KEY}}},
            "generation": {"max-examples": MAX_EXAMPLES},
        }
    )
    return schemathesis.openapi.from_url(f"{target.base_url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


def _error_code(response: schemathesis.Response) -> str:
    """The ErrorBody code of an error answer, to show which refusal paths were reached."""
    if response.status_code < 400:
        return ""
    try:
        body = response.json()
    except ValueError:
        return "(not JSON)"
    return str(body.get("error")) if isinstance(body, dict) else "(not an object)"


def _is_positive(case: schemathesis.Case, location: ParameterLocation) -> bool:
    """Only a part meant to be valid may be aimed: a negative one must stay invalid."""
    meta = case.meta
    if meta is None:
        return False
    component = meta.components.get(location)
    mode = component.mode if component is not None else meta.generation.mode
    return mode == GenerationMode.POSITIVE


def _aim(case: schemathesis.Case, target: Target) -> None:
    """Swap in real files, an existing job's id or its ETag, for a fixed share of the cases."""
    draw = zlib.crc32(repr((case.path_parameters, case.query, case.body)).encode())
    if (
        draw % 2 == 0
        and case.operation.label == UPLOAD
        and isinstance(case.body, dict)
        and _is_positive(case, ParameterLocation.BODY)
    ):
        for name in ("model", "data", "trigger_data", "test_data"):
            if isinstance(case.body.get(name), (bytes, Binary)):
                case.body[name] = Binary(target.files[name])
    if draw % 3 != 0 and case.path_parameters and "job_id" in case.path_parameters:
        # Mostly the fixture's four jobs (one of each state), sometimes any the fuzzer made;
        # DELETE never aims at the first, so one succeeded job keeps its files throughout.
        pool = target.jobs[:4] if draw % 5 else target.jobs
        if case.method.upper() == "DELETE":
            pool = pool[1:]
        case.path_parameters["job_id"] = pool[(draw // 3) % len(pool)]
    if (
        draw % 4 == 1
        and case.operation.label == "GET /v1/jobs/{job_id}/model"
        and case.headers
        and "If-None-Match" in case.headers
        and _is_positive(case, ParameterLocation.HEADER)
    ):
        case.headers["If-None-Match"] = target.etag


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # the machine is shared; slowness is not what this test is about
    database=None,  # nothing written into the checkout
    suppress_health_check=list(HealthCheck),
    derandomize=not RANDOM,  # by default the same examples every run: failures reproduce
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, target: Target) -> None:
    _aim(case, target)
    response = case.call(timeout=30)
    target.seen[case.operation.label, response.status_code, _error_code(response)] += 1
    if case.operation.label == UPLOAD and response.status_code == 202:
        target.jobs.append(response.json()["id"])
    case.validate_response(response, checks=CHECKS)


def test_fuzzing_reached_every_operation(
    api_schema: schemathesis.BaseSchema, target: Target
) -> None:
    """Guard against a silently thin run: every operation fuzzed, uploads reaching queueing."""
    results = list(api_schema.get_all_operations())
    errors = [result.err() for result in results if not isinstance(result, Ok)]
    assert not errors, f"operations schemathesis could not load: {errors}"
    labels = {result.ok().label for result in results if isinstance(result, Ok)}
    assert UPLOAD in labels
    reached = {label for label, _, _ in target.seen}
    assert not labels - reached, f"operations never fuzzed: {sorted(labels - reached)}"
    statuses = {(label, status) for label, status, _ in target.seen}
    assert (UPLOAD, 202) in statuses, "no fuzzed upload was ever queued"
    assert ("GET /v1/jobs/{job_id}", 200) in statuses, "no existing job was ever fetched"


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_numbers_in_options_are_refused(target: Target, number: str) -> None:
    """JSON Schema has no such numbers, so schemathesis never sends them; Python's JSON reads
    them. `{"rescale": Infinity}` used to queue a job and then answer 500."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    files = {k: (k, target.files[k]) for k in ("model", "data")}
    with httpx.Client(base_url=target.base_url, headers=headers, timeout=30) as client:
        before = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
        response = client.post(
            "/v1/jobs", files=files, data={"options": f'{{"rescale": {number}}}'}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"
        assert client.get("/v1/jobs", params={"limit": 100}).json()["items"] == before
