"""Malformed requests (paths, query values, headers, tokens, bodies) get 4xx JSON errors, never a 5xx or a
hang, and the server keeps answering valid requests."""

import http.client
import json
from urllib.parse import quote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierscope.server import BlockService, ServerThread
from tierscope.store.origin import ZarrOrigin

TOKEN = "fuzz-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# header values http.client can send: latin-1 without control characters
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
                      max_size=300)
segment = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def guarded(sample_store):
    service = BlockService([ZarrOrigin(sample_store)], l3="1MiB", l4="1MiB", prefetch="auto")
    with ServerThread(service, token=TOKEN) as running:
        yield running


def call(server, method, path, body=None, headers=None):
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


def assert_client_error(status, payload):
    assert 400 <= status < 500, (status, payload[:300])
    assert "error" in json.loads(payload)


def still_serving(server):
    status, payload = call(server, "GET", "/datasets/turb/blocks/u/0.0.0.0?tol=0.1", headers=AUTH)
    assert status == 200, payload


@FUZZ
@given(name=segment, var=segment, index=segment)
def test_fuzzed_block_paths(guarded, name, var, index):
    valid_index = all(p.isdigit() for p in index.split(".")) and len(index.split(".")) == 4
    in_range = valid_index and all(int(p) < 2 for p in index.split("."))
    if name == "turb" and var in ("u", "v", "p") and in_range:
        return  # a valid block: not this test's business
    path = f"/datasets/{quote(name, safe='')}/blocks/{quote(var, safe='')}/{quote(index, safe='')}"
    assert_client_error(*call(guarded, "GET", path, headers=AUTH))


@FUZZ
@given(query=st.dictionaries(st.sampled_from(["tol", "codec", "purpose", "x", ""]), header_text, min_size=1))
def test_fuzzed_query_values(guarded, query):
    if all(k in ("tol", "codec", "purpose") for k in query):
        try:
            tol_ok = float(query.get("tol", "0")) >= 0 and float(query.get("tol", "0")) < float("inf")
        except ValueError:
            tol_ok = False
        if tol_ok and query.get("purpose", "user") in ("user", "prefetch") and query.get(
            "codec", "zstd"
        ) in ("zstd", "raw", "lorenzo"):
            return
    status, payload = call(guarded, "GET", f"/datasets/turb/blocks/u/0.0.0.0?{urlencode(query)}",
                           headers=AUTH)
    assert_client_error(status, payload)


@FUZZ
@given(session=header_text, position=header_text)
def test_fuzzed_session_and_position_headers(guarded, session, position):
    headers = {**AUTH, "X-Tierscope-Session": session, "X-Tierscope-Position": position}
    status, payload = call(guarded, "GET", "/datasets/turb/blocks/p/1.1.1.1?tol=0.1", headers=headers)
    assert status < 500 and (status == 200 or "error" in json.loads(payload)), payload[:300]


@FUZZ
@given(auth=header_text, path=st.sampled_from(["/datasets", "/stats", "/metrics", "/config",
                                               "/datasets/turb/blocks/u/0.0.0.0"]))
def test_fuzzed_tokens_are_refused(guarded, auth, path):
    if auth.strip() in (f"Bearer {TOKEN}", f"bearer {TOKEN}"):
        return
    status, payload = call(guarded, "GET", path, headers={"Authorization": auth})
    assert status == 401 and "bearer token" in json.loads(payload)["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 300) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
batch_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"variable": st.sampled_from(["u", "zz", ""]) | json_values},
        optional={"tol": json_values, "codec": json_values, "purpose": json_values, "blocks": json_values},
    ).map(lambda v: json.dumps(v).encode()),
)


@FUZZ
@given(body=batch_bodies)
def test_fuzzed_batch_bodies(guarded, body):
    status, payload = call(guarded, "POST", "/datasets/turb/batch", body=body, headers=AUTH)
    if status == 200:  # hypothesis found a valid batch: it must be a well-formed answer
        assert payload.split(b"\n", 1)[0].startswith(b'{"blocks":')
        return
    assert_client_error(status, payload)


@FUZZ
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_config_bodies(guarded, body):
    status, payload = call(guarded, "PUT", "/config", body=body, headers=AUTH)
    if status != 200:
        assert_client_error(status, payload)


def test_server_still_answers_after_fuzzing(guarded):
    still_serving(guarded)
    status, payload = call(guarded, "PUT", "/config", body=b'{"l3": "1MiB", "l4": "1MiB"}', headers=AUTH)
    assert status == 200 and json.loads(payload)["l3"] == 1 << 20
    still_serving(guarded)
