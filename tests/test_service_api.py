"""The HTTP API (DESIGN.md, Contract 3) and the metrics (Contract 4), on the real tiny bundle.

Requests go through the ASGI app in process (fastapi TestClient, or httpx.AsyncClient where the
test needs requests in flight at the same time); test_service_server.py runs the real uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from romebert.service.app import create_app
from romebert.core.bundle import load_bundle
from romebert.core.engine import Engine
from romebert.core.exits import entropy, exit_layers, softmax_entropy
from romebert.service.metrics import outcome_of
from romebert.service.runtime import default_engine
from romebert.service.schemas import classify_request_model
from romebert.service.settings import Settings
from romebert.core.tokenization import TextEncoder
from fixed_cost import FixedCost
from gated_engine import Gated

LN2 = math.log(2)
RESULT_FIELDS = {"label", "probabilities", "exit_layer", "layers_used", "entropy", "budget_exhausted", "truncated", "latency_ms"}


def settings(bundle, **overrides) -> Settings:
    """onnxruntime, as `reference` runs: `auto` would take the backend the tiny bundle's export timed
    fastest, which on a CPU with OpenVINO changes from one export to the next (test_backends covers it)."""
    return Settings(**(dict(bundle=str(bundle), device="cpu", backend="onnxruntime", threads=1, max_wait_ms=1.0) | overrides))


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def client(tiny_bundle):
    with TestClient(create_app(settings(tiny_bundle, max_items=4, max_body_bytes=2000))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """Logits of every exit, straight from the engine: what the server's answers must match."""
    bundle = load_bundle(tiny_bundle)
    engine, encoder = Engine(bundle, device="cpu"), TextEncoder(bundle.tokenizer_file, bundle.max_length)
    return lambda texts, pairs=None: engine.all_exit_logits(encoder.encode(texts, pairs))


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- the contract ---------------------------------------------------------------------------------


def test_one_text_gets_one_result_with_every_contract_field(client):
    body = client.post("/classify", json={"text": "a warm and funny film"}).json()
    assert set(body) == {"results", "latency_ms"}
    (result,) = body["results"]
    assert set(result) == RESULT_FIELDS
    assert list(result["probabilities"]) == ["negative", "positive"]
    assert math.isclose(sum(result["probabilities"].values()), 1.0, abs_tol=1e-9)
    assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
    assert 1 <= result["exit_layer"] <= 3 and result["layers_used"] == result["exit_layer"]
    assert 0.0 <= result["entropy"] <= LN2 + 1e-9
    assert result["budget_exhausted"] is False and result["truncated"] is False
    assert 0 < result["latency_ms"] <= body["latency_ms"]


def test_a_list_gets_one_result_per_text_in_order(client, reference):
    texts = ["bad", "a long, slow and ultimately pointless film", "superb"]
    results = client.post("/classify", json={"text": texts, "entropy_threshold": 0.0}).json()["results"]
    logits = reference(texts)[-1]
    for result, row in zip(results, logits):
        expected = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert np.allclose(list(result["probabilities"].values()), expected, atol=1e-5)


@pytest.fixture(scope="module")
def pair_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle, declared as a pair model (its segments do not care: token types are inputs)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("pair") / "bundle"
    shutil.copytree(tiny_bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(manifest | {"pair_input": True}))
    return folder


def test_text_pairs_are_accepted_by_a_pair_model_and_refused_by_a_single_input_one(client, pair_bundle, reference):
    body = {"text": ["a man sleeps", "it rains"], "text_pair": ["a person rests", "it is dry"]}
    labels = load_bundle(pair_bundle).labels
    # the pair bundle is the tiny bundle's files with pair_input set: the same model
    expected, _ = softmax_entropy(reference(body["text"], body["text_pair"])[-1])
    with TestClient(create_app(settings(pair_bundle))) as pair_client:
        wait_ready(pair_client)
        results = pair_client.post("/classify", json=body | {"entropy_threshold": 0.0}).json()["results"]
        assert np.allclose([[r["probabilities"][label] for label in labels] for r in results], expected, atol=1e-5)
        for single in ({"text": "a man sleeps"}, {"text": "a man sleeps", "text_pair": None}):  # the pair is optional
            assert pair_client.post("/classify", json=single).status_code == 200, single
        for mismatched in ({"text": ["a", "b"], "text_pair": ["c"]}, {"text": "a", "text_pair": ["c"]}, {"text": ["a"], "text_pair": "c"}):
            assert pair_client.post("/classify", json=mismatched).status_code == 422, mismatched
        assert "text_pair" in pair_client.get("/openapi.json").json()["components"]["schemas"]["ClassifyRequest"]["properties"]
        assert pair_client.post("/classify", content=b'{"text": "a", "text_pair": "\\ud800"}',
                                headers={"content-type": "application/json"}).status_code == 400  # a lone surrogate
    refused = client.post("/classify", json=body)
    assert refused.status_code == 422 and refused.json()["error"]["details"][0]["field"] == "text_pair"
    assert refused.json()["error"]["details"][0]["message"].endswith("(they take text, entropy_threshold, latency_budget_ms)")
    assert "text_pair" not in client.get("/openapi.json").json()["components"]["schemas"]["ClassifyRequest"]["properties"]


def test_a_text_longer_than_the_max_length_is_truncated_and_flagged(client):
    results = client.post("/classify", json={"text": ["short", "word " * 100]}).json()["results"]
    assert [r["truncated"] for r in results] == [False, True]


def test_threshold_zero_means_full_depth(client):
    results = client.post("/classify", json={"text": ["great", "awful", "fine I guess"], "entropy_threshold": 0.0}).json()["results"]
    assert [r["exit_layer"] for r in results] == [3, 3, 3]


def test_the_exit_is_the_first_with_entropy_strictly_below_the_threshold(client, reference):
    texts = ["great", "awful", "fine I guess", "the cast is strong but the script is weak"]
    per_exit = reference(texts)
    for threshold in (0.0, float(np.median(entropy(per_exit))), LN2):
        results = client.post("/classify", json={"text": texts, "entropy_threshold": threshold}).json()["results"]
        assert [r["exit_layer"] for r in results] == exit_layers(per_exit, threshold).tolist()


def test_without_a_threshold_the_bundles_default_applies(client, tiny_bundle, reference):
    default = load_bundle(tiny_bundle).default_threshold
    results = client.post("/classify", json={"text": ["great", "awful"]}).json()["results"]
    assert [r["exit_layer"] for r in results] == exit_layers(reference(["great", "awful"]), default).tolist()


@pytest.mark.asyncio
async def test_concurrent_requests_with_different_thresholds_get_the_answers_they_get_alone(tiny_bundle):
    texts = ["great", "awful", "fine I guess", "the cast is strong but the script is weak"]
    app = create_app(settings(tiny_bundle, max_wait_ms=20.0))  # a wide window: the requests share batches
    async with serving(app) as client:
        async def ask(threshold):
            return (await client.post("/classify", json={"text": texts, "entropy_threshold": threshold})).json()["results"]

        together = await asyncio.gather(ask(0.0), ask(LN2), ask(0.0), ask(LN2))
        alone = [await ask(0.0), await ask(LN2)]
    for got, want in zip(together, alone * 2):
        assert [r["exit_layer"] for r in got] == [r["exit_layer"] for r in want]
        for g, w in zip(got, want):
            assert np.allclose(list(g["probabilities"].values()), list(w["probabilities"].values()), atol=1e-5)


def test_the_server_exports_every_metric_of_the_contract_and_no_other(client):
    from romebert.core import metric_names

    exported = {name for name, _ in metric_samples(client.get("/metrics").text)}
    contract = {name for m in metric_names.METRICS for name in metric_names.series(m)}
    assert exported == contract


def test_docs_are_served_with_their_own_assets_and_health_answers(client):
    page = client.get("/docs")
    assert page.status_code == 200
    scripts = re.findall(r'src="([^"]+\.js)"', page.text)
    assert scripts and all(src.startswith("/") for src in scripts), "the docs must not load from a CDN"
    assert all(client.get(src).status_code == 200 for src in scripts)
    assert client.get("/healthz").json()["status"] == "alive"
    assert client.get("/readyz").json()["device"] == "cpu"


def test_once_ready_the_loaded_objects_are_out_of_the_garbage_collectors_reach(client):
    import gc

    from romebert.service.runtime import GC_YOUNG_THRESHOLD

    assert client.get("/readyz").status_code == 200
    assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == GC_YOUNG_THRESHOLD


def test_the_openapi_schema_states_every_limit_the_server_enforces(client):
    spec = client.get("/openapi.json").json()
    request = spec["components"]["schemas"]["ClassifyRequest"]["properties"]
    threshold = next(b for b in request["entropy_threshold"]["anyOf"] if b.get("type") == "number")
    assert threshold["maximum"] == pytest.approx(LN2) and threshold["minimum"] == 0
    texts = next(b for b in request["text"]["anyOf"] if b.get("type") == "array")
    assert texts["maxItems"] == 4  # the client fixture's max_items
    classify = spec["paths"]["/classify"]["post"]["responses"]
    assert {"200", "400", "408", "413", "415", "422", "503"} <= set(classify)
    assert "Retry-After" in classify["503"]["headers"]
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


def test_a_body_not_declared_as_json_gets_415(client):
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        response = client.post("/classify", content=b'{"text": "fine"}', headers=headers)
        assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
        assert (headers.get("content-type") or "undeclared") in response.json()["error"]["message"]
    assert client.post("/classify", content=b'{"text": "fine"}', headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


# -- errors ---------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"text": ""}, 422, "invalid_request"),
    ({"text": "  \n\t"}, 422, "invalid_request"),
    ({"text": ["fine", " "]}, 422, "invalid_request"),
    ({"text": []}, 422, "invalid_request"),
    ({}, 422, "invalid_request"),
    ({"text": 42}, 422, "invalid_request"),
    ({"text": ["fine", 1]}, 422, "invalid_request"),
    ({"text": "a", "text_pair": ["b"]}, 422, "invalid_request"),
    ({"text": ["a", "b"], "text_pair": ["c"]}, 422, "invalid_request"),
    ({"text": "a", "entropy_threshold": -0.1}, 422, "invalid_request"),
    ({"text": "a", "entropy_threshold": 0.7}, 422, "invalid_request"),  # above ln 2
    ({"text": "a", "entropy_threshold": "0.1"}, 422, "invalid_request"),
    ({"text": "a", "latency_budget_ms": 0}, 422, "invalid_request"),
    ({"text": "a", "latency_budget_ms": -5}, 422, "invalid_request"),
    ({"text": "a", "latency_budget_ms": 60001}, 422, "invalid_request"),
    ({"text": "a", "threshold": 0.1}, 422, "invalid_request"),  # a misspelt option is not ignored
    (b'{"text": "a", "entropy_threshold": NaN}', 422, "invalid_request"),
    (b'{"text": "a", "latency_budget_ms": Infinity}', 422, "invalid_request"),
    (b"not json", 400, "bad_request"),
    (b'{"text": "a",}', 400, "bad_request"),  # a trailing comma
    (b"", 400, "bad_request"),
    (b'{"text": "\\ud800"}', 400, "bad_request"),  # a lone surrogate escape: no Unicode text
    (b'{"text": ["fine", "x\\udfff"]}', 400, "bad_request"),
    (b'{"text": "\xff\xfe"}', 400, "bad_request"),  # not UTF-8
    (b"[" * 1500, 400, "bad_request"),  # nested too deeply for the JSON parser
    (b'["a", "list"]', 422, "invalid_request"),
    ({"text": ["x"] * 5}, 413, "too_many_items"),  # max_items is 4
    ({"text": "x" * 3000}, 413, "body_too_large"),  # max_body_bytes is 2000
]


@pytest.mark.parametrize("body,status,code", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_input_gets_its_status_and_the_error_shape_and_the_server_goes_on(client, body, status, code):
    if isinstance(body, bytes):
        response = client.post("/classify", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/classify", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"} and error["code"] == code and error["message"]
    if status == 422:
        assert error["details"] and {"field", "message", "type"} <= set(error["details"][0])
    assert client.post("/classify", json={"text": "still serving"}).status_code == 200


def test_any_positive_budget_is_served_however_small(client):
    (result,) = client.post("/classify", json={"text": "fine", "entropy_threshold": 0.0, "latency_budget_ms": 0.01}).json()["results"]
    assert result["exit_layer"] == 1 and result["budget_exhausted"]  # exit 1 always runs


def test_a_body_of_exactly_the_limit_is_served_and_one_byte_more_is_not(client):
    def body(size: int) -> bytes:  # max_body_bytes is 2000
        frame = b'{"text": ""}'
        return frame[:-2] + b"x" * (size - len(frame)) + frame[-2:]

    for size, status in ((2000, 200), (2001, 413)):
        content = body(size)
        declared = client.post("/classify", content=content, headers={"content-type": "application/json"})
        streamed = client.post("/classify", content=iter([content[:1000], content[1000:]]), headers={"content-type": "application/json"})
        assert (declared.status_code, streamed.status_code) == (status, status), size


def test_a_body_over_the_limit_without_content_length_is_refused_too(client):
    chunks = (b'{"text": "' + b"x" * 500 for _ in range(6))  # streamed: no Content-Length header
    response = client.post("/classify", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_a_422_says_what_is_wrong_with_the_text_and_a_400_where_the_json_broke(client):
    def error(body: bytes) -> dict:
        return client.post("/classify", content=body, headers={"content-type": "application/json"}).json()["error"]

    assert error(b'{"text": "  "}')["details"][0]["message"] == "empty or whitespace only"
    assert error(b'{"text": 5}')["details"][0]["message"] != "empty or whitespace only"
    assert error(b'{"text": "a",}')["message"] == "the body is not valid JSON: trailing comma at line 1 column 14"
    assert error(b'{"text": "\\ud800"}')["message"].startswith("the body is not valid JSON: ")


def test_a_422_for_a_field_the_api_does_not_have_names_the_ones_it_does(client, pair_bundle):
    def details(client, body: dict) -> list[dict]:
        return client.post("/classify", json=body).json()["error"]["details"]

    assert details(client, {"text": "a", "threshold": 0.1}) == [{
        "field": "threshold", "type": "extra_forbidden",
        "message": "not a field of this model's requests (they take text, entropy_threshold, latency_budget_ms)"}]
    two = client.post("/classify", json={"text": "a", "threshold": 0.1, "budget_ms": 5}).json()["error"]
    assert two["message"] == ("invalid request: threshold, budget_ms: not a field of this model's requests "
                              "(they take text, entropy_threshold, latency_budget_ms)")  # said once for both
    assert [d["field"] for d in two["details"]] == ["threshold", "budget_ms"]
    with TestClient(create_app(settings(pair_bundle))) as pair_client:  # a pair model's requests take one more
        assert details(pair_client, {"text": "a", "budget_ms": 5})[0]["message"].endswith(
            "(they take text, entropy_threshold, latency_budget_ms, text_pair)")


def test_the_body_and_request_route_refuses_an_endpoint_with_anything_else_to_inject():
    """Its handler passes the endpoint the validated body and the Request, nothing else: an
    endpoint that asks for more would be called without it, so it is refused when the route is made."""
    from fastapi import APIRouter, Request

    from romebert.service.routes import BodyAndRequestRoute

    model = classify_request_model(0.69, 4, False)

    async def with_a_query_parameter(body: model, request: Request, page: int = 1) -> None:  # type: ignore[valid-type]
        pass

    async def without_the_request(body: model) -> None:  # type: ignore[valid-type]
        pass

    for endpoint in (with_a_query_parameter, without_the_request):
        with pytest.raises(TypeError, match=re.escape("/x: a BodyAndRequestRoute endpoint takes (body model, Request) and nothing else")):
            APIRouter().add_api_route("/x", endpoint, methods=["POST"], route_class_override=BodyAndRequestRoute)


def without_latency(answer: dict) -> dict:
    return {k: [without_latency(r) for r in v] if k == "results" else v for k, v in answer.items() if k != "latency_ms"}


def test_post_classify_answers_as_fastapi_would_route_it_but_never_goes_through_its_router(tiny_bundle, monkeypatch):
    """POST /classify takes a short way (middleware.DirectRoute): the route's own handler and the
    app's exception handlers, without FastAPI's router and exception layers. Every kind of answer
    is the same as the framework's way gives, and the short way is the one taken: with the
    route's framework entry broken, the app still answers."""
    from romebert.service.middleware import DirectRoute
    from romebert.service.routes import BodyAndRequestRoute

    framework_app = create_app(settings(tiny_bundle, max_items=4))
    framework_app.user_middleware = [m for m in framework_app.user_middleware if m.cls is not DirectRoute]
    bodies = [({"text": "fine"}, 200), ({"text": ["fine", "not fine at all"], "entropy_threshold": 0.0}, 200),
              ({"text": "x", "latency_budget_ms": 0.01}, 200), ({"text": "a", "text_pair": "b"}, 422),
              ({"text": ["x"] * 5}, 413), ({"text": "a", "threshold": 0.1}, 422), (b"not json", 400), (b'{"text": "\\ud800"}', 400),
              ({"text": "a", "entropy_threshold": 0.7}, 422), (b"[1]", 422)]
    with TestClient(create_app(settings(tiny_bundle, max_items=4))) as short, TestClient(framework_app) as framework:
        wait_ready(short), wait_ready(framework)
        for body, status in bodies:
            sent = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
            ours, theirs = short.post("/classify", **sent), framework.post("/classify", **sent)
            assert ours.status_code == theirs.status_code == status, body
            assert without_latency(ours.json()) == without_latency(theirs.json()), body
            assert ours.headers["content-type"] == theirs.headers["content-type"]
        assert short.get("/classify").status_code == 405  # other methods: FastAPI's way

        async def broken(*_):
            raise AssertionError("POST /classify went through FastAPI's router")

        monkeypatch.setattr(BodyAndRequestRoute, "handle", broken)
        assert short.post("/classify", json={"text": "fine"}).status_code == 200
        with pytest.raises(AssertionError, match="router"):
            framework.post("/classify", json={"text": "fine"})


def test_a_422_on_text_speaks_of_the_form_the_client_sent(client):
    """`text` is a string or a list; a complaint of the other form ("not a valid list" of a
    string) is noise beside the real one, and stays only when it is the only one."""
    def messages(body: dict) -> list[str]:
        return [d["message"] for d in client.post("/classify", json=body).json()["error"]["details"]]

    assert messages({"text": []}) == ["List should have at least 1 item after validation, not 0"]
    assert messages({"text": "  "}) == ["empty or whitespace only"]
    assert messages({"text": ["fine", 5]}) == ["Input should be a valid string"]
    assert messages({"text": 5}) == ["Input should be a valid string", "Input should be a valid array"]


@pytest.mark.parametrize("status,outcome", [(200, "ok"), (400, "invalid"), (408, "slow_client"), (413, "too_large"), (415, "invalid"),
                                            (422, "invalid"), (429, "overloaded"), (499, "cancelled"), (500, "error"), (503, "overloaded")])
def test_every_status_counts_as_its_outcome(status, outcome):
    assert outcome_of(status) == outcome


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    assert client.get("/classify").json()["error"]["code"] == "method_not_allowed"


# -- budgets --------------------------------------------------------------------------------------


def test_a_budget_too_small_for_layer_2_answers_from_exit_1_flagged(tiny_bundle):
    app = create_app(settings(tiny_bundle), cost_model=FixedCost([0.1, 1.0, 1.0]), clock=lambda: 50.0)
    with TestClient(app) as client:
        wait_ready(client)
        tight = client.post("/classify", json={"text": ["great", "awful"], "entropy_threshold": 0.0, "latency_budget_ms": 500}).json()
        ample = client.post("/classify", json={"text": "great", "entropy_threshold": 0.0, "latency_budget_ms": 60000}).json()
        samples = metric_samples(client.get("/metrics").text)
    assert [(r["exit_layer"], r["budget_exhausted"]) for r in tight["results"]] == [(1, True), (1, True)]
    assert (ample["results"][0]["exit_layer"], ample["results"][0]["budget_exhausted"]) == (3, False)
    assert samples[("romebert_budget_exhausted_total", ())] == 2


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_parse_and_the_exit_histogram_mean_is_the_mean_exit_served(tiny_bundle):
    with TestClient(create_app(settings(tiny_bundle))) as client:
        wait_ready(client)
        served = []
        for threshold in (0.0, LN2, 0.0, 0.69):
            results = client.post("/classify", json={"text": ["great", "awful", "meh"], "entropy_threshold": threshold}).json()["results"]
            served += [r["exit_layer"] for r in results]
        client.post("/classify", json={"text": ""})
        exposition = client.get("/metrics")
    assert exposition.headers["content-type"].startswith("text/plain")
    samples = metric_samples(exposition.text)
    count, total = samples[("romebert_exit_layer_count", ())], samples[("romebert_exit_layer_sum", ())]
    assert count == len(served) and total / count == pytest.approx(np.mean(served))
    buckets = {k[1][0][1]: v for k, v in samples.items() if k[0] == "romebert_exit_layer_bucket"}
    assert list(buckets) == ["1.0", "2.0", "3.0", "+Inf"]  # one bucket per layer
    assert buckets["1.0"] == served.count(1)
    assert samples[("romebert_layers_executed_total", ())] == sum(served)
    assert samples[("romebert_requests_total", (("outcome", "ok"),))] == 4
    assert samples[("romebert_requests_total", (("outcome", "invalid"),))] == 1
    assert samples[("romebert_request_duration_seconds_count", ())] == 5
    assert 0 < samples[("romebert_request_duration_seconds_sum", ())] < 60  # five requests to a tiny model
    assert samples[("romebert_queue_wait_seconds_count", ())] == len(served)
    assert samples[("romebert_batch_size_count", ())] >= 4
    assert samples[("romebert_inflight_requests", ())] == 0 and samples[("romebert_queue_depth", ())] == 0
    (info,) = [dict(k[1]) for k in samples if k[0] == "romebert_model_info"]
    assert info.pop("model") and info == {"num_layers": "3", "precision": "fp32", "labels": "negative,positive",
                                          "device": "cpu", "backend": "onnxruntime/fp32", "providers": "CPUExecutionProvider"}


def test_pad_slack_decides_whether_rows_of_different_lengths_share_a_batch_and_the_metrics_count_the_padding(tiny_bundle):
    texts = ["film " * 15, "film " * 28]  # 17 and 30 tokens: padded to 30, 60 tokens for 47 real ones (1.28x)
    counted = {}
    series = [("romebert_batch_size_count", ())] + [("romebert_layer_tokens_total", (("kind", kind),)) for kind in ("real", "padding")]
    for slack in (1.0, 1.25, 1.5):
        with TestClient(create_app(settings(tiny_bundle, pad_slack=slack))) as client:
            wait_ready(client)
            before = metric_samples(client.get("/metrics").text)
            assert all(r["exit_layer"] == 3 for r in client.post("/classify", json={"text": texts, "entropy_threshold": 0.0}).json()["results"])
            after = metric_samples(client.get("/metrics").text)
            counted[slack] = tuple(after[key] - before[key] for key in series)
    # (layer calls, real tokens, padding) through 3 layers: a batch a row, or one batch for both
    assert counted == {1.0: (2 * 3, 3 * 47, 0), 1.25: (2 * 3, 3 * 47, 0), 1.5: (3, 3 * 47, 3 * 13)}


# -- load, readiness and shutdown ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app, ready: bool = True):
    """The app with its lifespan running, and an httpx client on it."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://romebert"))
        if ready:
            await until(lambda: app.state.runtime.phase.value == "ready")
        yield client


async def until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def gated_app(tiny_bundle, **overrides):
    engines = []

    def factory(bundle, s):
        engines.append(Gated(default_engine(bundle, s)))
        return engines[0]

    return create_app(settings(tiny_bundle, **overrides), engine_factory=factory), engines


async def held_at_first_layer(client, engine, body: dict) -> asyncio.Task:
    """Send `body` and return once its rows are in the engine, out of the queue, held at layer 1."""
    engine.gate.clear()
    engine.entered = 0
    task = asyncio.create_task(client.post("/classify", json=body))
    await until(lambda: engine.entered == 1)
    return task


@pytest.mark.asyncio
async def test_a_full_queue_answers_503_with_retry_after_and_recovers(tiny_bundle):
    app, engines = gated_app(tiny_bundle, max_batch=1, max_queue=2, max_items=2)
    async with serving(app) as client:
        engine = engines[0]
        first = await held_at_first_layer(client, engine, {"text": "one"})
        second = asyncio.create_task(client.post("/classify", json={"text": ["two", "three"]}))
        await until(lambda: app.state.runtime.metrics.registry.get_sample_value("romebert_queue_depth") == 2)
        refused = await client.post("/classify", json={"text": "four"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded" and int(refused.headers["retry-after"]) >= 1
        engine.gate.set()
        assert [(await t).status_code for t in (first, second)] == [200, 200]
        assert (await client.post("/classify", json={"text": "five"})).status_code == 200
        samples = metric_samples((await client.get("/metrics")).text)
    assert samples[("romebert_requests_total", (("outcome", "overloaded"),))] == 1


@pytest.mark.asyncio
async def test_draining_keeps_the_queued_requests_that_can_start_within_most_of_the_graceful_timeout(tiny_bundle):
    app, engines = gated_app(tiny_bundle, max_batch=1, graceful_timeout_s=10.0, max_queue_wait_ms=60_000.0)
    async with serving(app) as client:
        runtime, engine = app.state.runtime, engines[0]
        runtime.admission.rate.seconds_per_row = 3.0  # set by hand: 0.8 x 10 s of drain covers 2 rows, in flight + 1 queued
        first = await held_at_first_layer(client, engine, {"text": "in flight"})
        queued = []
        for text in ("kept", "too late", "later still"):
            queued.append(asyncio.create_task(client.post("/classify", json={"text": text})))
            await until(lambda: runtime.metrics.registry.get_sample_value("romebert_queue_depth") == len(queued))
        runtime.begin_drain()
        engine.gate.set()
        statuses = [(await task).status_code for task in (first, *queued)]
    assert statuses == [200, 200, 503, 503]


@pytest.mark.asyncio
async def test_latency_ms_is_from_the_requests_arrival_to_its_answer_and_each_texts_to_its_own(tiny_bundle):
    app, engines = gated_app(tiny_bundle)
    async with serving(app) as client:
        engine = engines[0]
        started = time.perf_counter()
        held = await held_at_first_layer(client, engine, {"text": ["one", "two"], "entropy_threshold": 0.0})
        await asyncio.sleep(0.3)
        engine.gate.set()
        body = (await held).json()
        elapsed_ms = (time.perf_counter() - started) * 1000
    assert 300 <= body["latency_ms"] <= elapsed_ms
    assert all(300 <= result["latency_ms"] <= body["latency_ms"] for result in body["results"])


@pytest.mark.asyncio
async def test_not_ready_until_the_model_is_loaded_and_warmed_up(tiny_bundle):
    release = threading.Event()

    def slow_factory(bundle, s):
        assert release.wait(timeout=20)
        return default_engine(bundle, s)

    app = create_app(settings(tiny_bundle), engine_factory=slow_factory)
    async with serving(app, ready=False) as client:
        assert (await client.get("/healthz")).status_code == 200
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
        refused = await client.post("/classify", json={"text": "too early"})
        assert refused.status_code == 503 and "retry-after" in refused.headers
        release.set()
        await until(lambda: app.state.runtime.phase.value == "ready")
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/classify", json={"text": "now"})).status_code == 200


@pytest.mark.asyncio
async def test_shutting_down_while_the_model_loads_waits_for_the_loader_and_starts_no_worker(tiny_bundle):
    """A process must not end while its loader is inside onnxruntime: that aborts it (std::terminate,
    exit code 134) where a SIGTERM during start-up should exit cleanly. So the shutdown waits for
    the load, which then starts nothing."""
    release = threading.Event()
    loaded = []

    def slow_factory(bundle, s):
        assert release.wait(timeout=20)
        loaded.append(default_engine(bundle, s))
        return loaded[-1]

    app = create_app(settings(tiny_bundle), engine_factory=slow_factory)
    runtime = app.state.runtime
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    async with serving(app, ready=False):
        pass  # shut down at once, while the factory waits
    assert time.monotonic() - started >= 0.3 and loaded  # the shutdown waited for the load to finish
    assert runtime.phase.value == "draining" and runtime.scheduler is None


@pytest.mark.asyncio
async def test_a_model_that_fails_to_load_is_reported_by_health_and_readiness(tiny_bundle):
    def broken(bundle, s):
        raise RuntimeError("out of memory")

    app = create_app(settings(tiny_bundle), engine_factory=broken)
    exits = []
    app.state.runtime.request_exit = exits.append
    async with serving(app, ready=False) as client:
        await until(lambda: app.state.runtime.phase.value == "failed")
        for path in ("/healthz", "/readyz"):
            response = await client.get(path)
            assert response.status_code == 503 and "out of memory" in response.json()["error"]["message"]
            assert int(response.headers["retry-after"]) >= 1
    assert exits == [2] and app.state.runtime.exit_code == 2


@pytest.mark.asyncio
async def test_shutdown_refuses_new_work_and_drains_requests_in_flight(tiny_bundle):
    app, engines = gated_app(tiny_bundle)
    runtime = app.state.runtime
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://romebert")
    async with client, contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        await until(lambda: runtime.phase.value == "ready")
        in_flight = await held_at_first_layer(client, engines[0], {"text": ["one", "two"], "entropy_threshold": 0.0})
        shutdown = asyncio.create_task(stack.aclose())  # what uvicorn does on SIGTERM, after its own wait
        await until(lambda: runtime.phase.value == "draining")
        readiness = await client.get("/readyz")
        assert readiness.status_code == 503 and readiness.json()["error"]["code"] == "shutting_down"
        assert (await client.post("/classify", json={"text": "late"})).status_code == 503
        assert not shutdown.done()  # still waiting for the request in flight
        engines[0].gate.set()
        response = await in_flight
        await shutdown
    assert response.status_code == 200 and [r["exit_layer"] for r in response.json()["results"]] == [3, 3]
    assert runtime.scheduler.join(timeout=0)


@pytest.mark.asyncio
async def test_an_engine_failure_is_a_500_in_the_error_shape_and_the_server_goes_on(tiny_bundle):
    app, engines = gated_app(tiny_bundle)
    async with serving(app) as client:
        engines[0].error = RuntimeError("device lost")
        failed = await client.post("/classify", json={"text": "boom"})
        engines[0].error = None
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_failure"
        assert (await client.post("/classify", json={"text": "fine"})).status_code == 200
        samples = metric_samples((await client.get("/metrics")).text)
    assert samples[("romebert_requests_total", (("outcome", "error"),))] == 1


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on inf - inf
@pytest.mark.parametrize("bad", [np.nan, np.inf])
async def test_an_exit_whose_logits_are_not_finite_fails_as_the_engines_failure(tiny_bundle, bad):
    """The answer's JSON encoder would write NaN, which is not JSON: such an answer is a 500
    engine_failure naming the exit, never a 200 the client cannot parse."""
    app, engines = gated_app(tiny_bundle)
    async with serving(app) as client:
        real = engines[0].layer

        def broken(i, state):
            hidden, logits = real(i, state)
            return hidden, np.full_like(logits, bad)

        engines[0].layer = broken
        failed = await client.post("/classify", json={"text": "boom", "entropy_threshold": 0.0})
        del engines[0].layer
        assert failed.status_code == 500
        assert failed.json()["error"] == {"code": "engine_failure", "details": None,
                                          "message": f"engine failure: exit {load_bundle(tiny_bundle).num_layers} gave logits that are not finite"}
        assert (await client.post("/classify", json={"text": "fine"})).status_code == 200


@pytest.mark.asyncio
async def test_a_request_past_its_server_deadline_gets_503_and_its_rows_are_dropped(tiny_bundle):
    app, engines = gated_app(tiny_bundle, request_timeout_s=0.3)
    async with serving(app) as client:
        engines[0].gate.clear()
        engines[0].entered = 0
        late = await client.post("/classify", json={"text": "slow", "entropy_threshold": 0.0})
        assert late.status_code == 503 and late.json()["error"]["code"] == "deadline_exceeded"
        assert int(late.headers["retry-after"]) >= 1
        engines[0].gate.set()
        registry = app.state.runtime.metrics.registry
        await until(lambda: registry.get_sample_value("romebert_shed_rows_total", {"reason": "cancelled"}) == 1)
        assert engines[0].entered == 1  # its layer 1 was running; the layers after it never ran
        assert (await client.post("/classify", json={"text": "fine"})).status_code == 200


def test_large_inputs_are_tokenized_off_the_event_loop(tiny_bundle):
    with TestClient(create_app(settings(tiny_bundle, max_body_bytes=100_000))) as client:
        wait_ready(client)
        runtime = client.app.state.runtime
        tokenize, threads = runtime.encoder.tokenize, []

        def spy(*args, parallel=True):
            threads.append((threading.current_thread().name, parallel))
            return tokenize(*args, parallel=parallel)

        runtime.encoder.tokenize = spy
        loop_thread = client.portal.call(lambda: threading.current_thread().name)
        assert client.post("/classify", json={"text": "short and sweet"}).status_code == 200
        assert client.post("/classify", json={"text": "long " * 5000}).status_code == 200
    # the short one on the loop, without the tokenizer's thread pool (waiting on it stalls the loop)
    assert threads[0] == (loop_thread, False) and threads[1][0] != loop_thread


# -- nothing a client sends reaches a 500 -----------------------------------------------------------

# Strings with everything JSON can carry, lone surrogates included.
_text = st.text(st.characters(codec=None, categories=None), max_size=40) | st.sampled_from(["", " ", "\ud800", "ok", "a" * 300])
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | _text,
                     lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_text, inner, max_size=4), max_leaves=12)
_fields = st.fixed_dictionaries({}, optional={
    "text": _text | st.lists(_text, max_size=6) | _json,
    "text_pair": _text | st.lists(_text, max_size=6),
    "entropy_threshold": st.floats() | st.integers() | _json,
    "latency_budget_ms": st.floats() | st.integers() | _json,
}) | _json


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_fields)
def test_no_request_body_gets_a_500(client, body):
    import json

    raw = json.dumps(body, allow_nan=True).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes
    response = client.post("/classify", content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"code", "message", "details"}


@hypothesis_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_no_raw_body_gets_a_500(client, raw):
    response = client.post("/classify", content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (400, 413, 422), response.text
