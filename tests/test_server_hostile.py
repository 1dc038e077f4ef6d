"""The server under hostile or unlucky conditions: a dead engine, deep or huge bodies, idle and
slow sockets, requests from web pages, and errors that must not leak internals.

Each test reproduces a fault the server had; timing bounds are generous (the stalls they
guard against lasted seconds or forever).
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from openai_server import running

from aiolm.backends import GenerateRequest, ScriptedBackend
from aiolm.backends.engine import Engine, LoadedModel
from aiolm.errors import BackendUnavailable
from aiolm.server import create_app
from aiolm.server.cli import (
    EXIT_ENGINE_FAILED,
    EXIT_STARTUP_FAILED,
    build_parser,
    engine_options,
    run_server,
)

pytestmark = pytest.mark.anyio

MODEL = "scripted"
JSON = {"Content-Type": "application/json"}
SLOW = 1.0   # seconds: the most a request may keep /health waiting


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@contextlib.asynccontextmanager
async def asgi(app: Any, base_url: str = "http://127.0.0.1:8000"):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url,
                                 timeout=30) as client:
        yield client


class Dying(ScriptedBackend):
    """A scripted model whose engine loop can be made to die (``failure``, as on Engine)."""

    failure: BaseException | None = None


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serving(backend: Dying, *argv: str) -> Iterator[tuple[str, dict[str, int]]]:
    """``aiolm serve``'s server (``run_server``) over ``backend`` in a thread: (base URL, its
    exit status once stopped). Leaving stops it by failing the backend."""
    sock = _free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    args = build_parser().parse_args(["--log-level", "warning", *argv])
    result: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("status", run_server(backend, args, sockets=[sock])),
        daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code in (200, 503):
                break
        except httpx.TransportError:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.02)
    try:
        yield url, result
    finally:
        backend.failure = backend.failure or RuntimeError("test over")
        thread.join(30)
        sock.close()


# ---------------------------------------------------------- 4: a dead engine is reported


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)


async def test_health_and_metrics_report_a_dead_engine_and_requests_get_a_plain_503(tiny):
    engine = Engine(tiny, max_total_tokens=4096)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with engine:
            yield

    body = {"model": "tiny-llama", "prompt": [5, 6, 7, 8], "max_tokens": 2}
    with running(create_app(engine, lifespan=lifespan)) as url:
        async with httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=30) as http:
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            health = await http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert "aiolm_engine_up 1.0\n" in (await http.get("/metrics")).text

            def broken(batch, bitmask_fn=None):
                raise RuntimeError("device lost at 0x7f3a2c00")

            engine._core.runner.run = broken
            failed = await http.post("/v1/completions", json=body)
            assert failed.status_code == 503
            error = _error(failed)
            assert error["code"] == "unavailable"
            assert "0x7f3a2c00" not in failed.text and "RuntimeError" not in failed.text

            health = await http.get("/health")
            assert health.status_code == 503
            assert health.json()["failure"] == "RuntimeError"
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            assert "aiolm_engine_up 0.0\n" in metrics.text
            assert 'aiolm_requests_total{route="/v1/completions",status="503"} 1' in metrics.text


async def test_metrics_answer_when_the_backend_has_no_statistics_left():
    class Dead(Dying):
        def statistics(self):
            raise BackendUnavailable("the engine loop failed: RuntimeError('device lost')")

    backend = Dead()
    backend.failure = RuntimeError("device lost")
    async with asgi(create_app(backend)) as http:
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "aiolm_engine_up 0.0\n" in metrics.text and "aiolm_requests_total" in metrics.text
        health = await http.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "failed", "model": MODEL, "failure": "RuntimeError",
                                 "message": "The engine stopped on an error; restart the server."}


def test_aiolm_serve_exits_with_the_engine_failed_status_when_the_engine_dies():
    backend = Dying()
    with serving(backend) as (url, result):
        assert httpx.get(url + "/health").status_code == 200
        backend.failure = RuntimeError("device lost")
        deadline = time.monotonic() + 10
        while "status" not in result and time.monotonic() < deadline:
            time.sleep(0.05)
        assert result.get("status") == EXIT_ENGINE_FAILED   # it stopped by itself


def test_aiolm_serve_exits_with_the_startup_failed_status_when_the_model_cannot_load():
    class Missing(ScriptedBackend):
        async def __aenter__(self):
            raise FileNotFoundError("no such model")

        async def __aexit__(self, *exc_info):
            return None

    args = build_parser().parse_args(["--log-level", "critical"])
    sock = _free_socket()
    try:
        assert run_server(Missing(), args, sockets=[sock]) == EXIT_STARTUP_FAILED
    finally:
        sock.close()


def test_aiolm_serve_on_a_network_address_without_a_key_warns_at_start(capfd):
    backend = Dying()
    backend.failure = RuntimeError("stop at once")   # the watcher stops the server at start
    args = build_parser().parse_args(["--host", "0.0.0.0", "--log-level", "warning"])
    sock = _free_socket()   # bound to 127.0.0.1: nothing is exposed by the test
    try:
        assert run_server(backend, args, sockets=[sock]) == EXIT_ENGINE_FAILED
    finally:
        sock.close()
    err = capfd.readouterr().err
    assert "0.0.0.0 without --api-key" in err
    args = build_parser().parse_args(["--host", "0.0.0.0", "--api-key", "k", "--log-level", "warning"])
    sock = _free_socket()
    try:
        run_server(backend, args, sockets=[sock])
    finally:
        sock.close()
    assert "without --api-key" not in capfd.readouterr().err


# ------------------------------------------------------------- 5: deeply nested JSON


@pytest.mark.parametrize("where", ["stop", "response_format", "body"])
async def test_deeply_nested_json_is_a_400_naming_the_problem(where):
    if where == "stop":   # depth 1,000: past the JSON decoder's own recursion limit
        raw = '{"model": "scripted", "prompt": "x", "stop": ' + "[" * 1000 + "]" * 1000 + "}"
    elif where == "response_format":   # depth 100: decodes, then the depth check refuses it
        schema = "{}"
        for _ in range(100):
            schema = '{"type": "array", "items": ' + schema + "}"
        raw = ('{"model": "scripted", "prompt": "x", "response_format": {"type": "json_schema", '
               '"json_schema": {"name": "x", "schema": ' + schema + "}}}")
    else:
        raw = "[" * 100_000 + "]" * 100_000
    with running(create_app(ScriptedBackend())) as url:
        async with httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=30) as http:
            response = await http.post("/v1/completions", content=raw, headers=JSON)
            assert response.status_code == 400
            error = _error(response)
            assert error["code"] == "json_too_deep" and "nested too deeply" in error["message"]
            if where == "response_format":
                assert error["param"] == "response_format"
            ok = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200


async def test_the_json_depth_limit_is_an_option():
    async with asgi(create_app(ScriptedBackend(), max_json_depth=2)) as http:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1, "stop": ["a"]}   # depth 2
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        body["stop"] = [["a"]]                                                     # depth 3
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 400 and _error(response)["param"] == "stop"


# ------------------------------------------------ 6: one request's work is bounded


async def _max_health_latency_while(http: httpx.AsyncClient, work) -> tuple[Any, float]:
    """Run ``work()`` while timing /health round trips; (work's result, the slowest one)."""
    slowest = 0.0
    result: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            result.append(await work())
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        while True:
            start = time.monotonic()
            assert (await http.get("/health")).status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            await anyio.sleep(0.02)
    return result[0], slowest


async def test_twenty_thousand_prompts_are_refused_at_once_without_stalling_others():
    body = {"model": MODEL, "prompt": ["x"] * 20_000, "max_tokens": 1}
    with running(create_app(ScriptedBackend())) as url:
        async with httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=60) as http:
            started = time.monotonic()
            response, slowest = await _max_health_latency_while(
                http, lambda: http.post("/v1/completions", json=body))
            assert time.monotonic() - started < 5
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "prompt" and "20000 prompts" in error["message"]
    assert slowest < SLOW


async def test_a_large_valid_body_is_parsed_without_stalling_others():
    prompts = [f"document {i}: " + "word " * 20_000 for i in range(64)]   # ~6.4 MB
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 1}
    with running(create_app(ScriptedBackend())) as url:
        async with httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=60) as http:
            response, slowest = await _max_health_latency_while(
                http, lambda: http.post("/v1/completions", json=body))
    assert response.status_code == 200 and len(response.json()["choices"]) == 64
    assert slowest < SLOW


@pytest.mark.parametrize(("extra", "param"), [
    ({"prompt": ["x"] * 65}, "prompt"),
    ({"prompt": ["x"] * 64, "n": 16}, "n"),      # 1,024 choices
    ({"prompt": ["x"] * 9, "n": 16}, "n"),       # 144 choices
    ({"prompt": "x", "n": 17}, "n"),
])
async def test_requests_over_the_per_request_limits_are_a_400_naming_the_field(extra, param):
    async with asgi(create_app(ScriptedBackend())) as http:
        response = await http.post("/v1/completions", json={"model": MODEL, "max_tokens": 1, **extra})
        assert response.status_code == 400 and _error(response)["param"] == param
        fits = await http.post("/v1/completions",
                               json={"model": MODEL, "max_tokens": 1, "prompt": ["x"] * 8, "n": 16})
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 128


async def test_score_continuations_are_bounded():
    async with asgi(create_app(ScriptedBackend(), max_score_continuations=3)) as http:
        body = {"model": MODEL, "prompt": "Pick:", "continuations": ["a", "b", "c", "d"]}
        response = await http.post("/v1/aiolm/score", json=body)
        assert response.status_code == 400 and _error(response)["param"] == "continuations"
        body["continuations"] = ["a", "b", "c"]
        assert (await http.post("/v1/aiolm/score", json=body)).status_code == 200


async def test_work_past_max_pending_gets_a_429_with_retry_after():
    slow = ScriptedBackend(lambda prompt: " tick" * 30, delay=0.02)
    app = create_app(slow, max_pending=2, max_choices=2, max_score_continuations=2)
    body = {"model": MODEL, "prompt": "Go:", "max_tokens": 30}
    async with asgi(app) as http:
        answers: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(lambda: _append(answers, http.post("/v1/completions", json=body)))
            with anyio.fail_after(10):
                while slow.statistics().active_streams < 2:
                    await anyio.sleep(0.01)
            busy = await http.post("/v1/completions", json={**body, "max_tokens": 1})
            assert busy.status_code == 429
            assert busy.headers["retry-after"] == "1"
            assert _error(busy)["code"] == "server_busy"
        assert [a.status_code for a in answers] == [200, 200]
        # The finished work is no longer counted.
        both = await http.post("/v1/completions", json={**body, "max_tokens": 1, "n": 2})
        assert both.status_code == 200
        metrics = await http.get("/metrics")
        assert "aiolm_pending_generations 0.0\n" in metrics.text


async def _append(into: list[Any], awaitable) -> None:
    into.append(await awaitable)


def test_create_app_refuses_limits_that_cannot_hold():
    with pytest.raises(ValueError, match="max_choices"):
        create_app(ScriptedBackend(), max_pending=10)         # max_choices 128 > 10
    with pytest.raises(ValueError, match="max_prompts"):
        create_app(ScriptedBackend(), max_prompts=0)
    with pytest.raises(ValueError, match="body_timeout"):
        create_app(ScriptedBackend(), body_timeout=0)
    with pytest.raises(TypeError, match="allowed_hosts"):
        create_app(ScriptedBackend(), allowed_hosts="example.com")


# --------------------------------------------- 7: idle and slow connections are closed


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (what it sent first is read past)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def test_idle_and_slow_connections_are_closed_and_health_stays_responsive():
    backend = Dying()
    with serving(backend, "--timeout-keep-alive", "1", "--timeout-headers", "1.5") as (url, _):
        idle = [_connect(url) for _ in range(3)]                  # connect, send nothing
        slow = _connect(url)                                      # a head that never ends
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        kept = _connect(url)                                      # one request, then idle
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < SLOW
        for sock in [*idle, slow, kept]:
            assert _closed_within(sock, 5)
            sock.close()
        assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_connections_beyond_the_limit_get_a_503_at_once():
    backend = Dying()
    with serving(backend, "--limit-concurrency", "3", "--timeout-headers", "1") as (url, _):
        held = [_connect(url) for _ in range(3)]
        time.sleep(0.2)   # the server has seen all three
        extra = _connect(url)
        extra.settimeout(5)
        assert extra.recv(65536).startswith(b"HTTP/1.1 503")
        assert _closed_within(extra, 5)
        for sock in held:                # the idle ones are closed after --timeout-headers
            assert _closed_within(sock, 5)
            sock.close()
        extra.close()
        assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_a_body_that_trickles_in_gets_a_408():
    with running(create_app(ScriptedBackend(), body_timeout=0.5)) as url:
        sock = _connect(url.removesuffix("/v1"))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 408")
        sock.close()


def test_aiolm_serve_has_connection_and_limit_options_with_defaults():
    args = build_parser().parse_args([])
    assert (args.timeout_keep_alive, args.timeout_headers, args.timeout_body) == (5, 10, 30)
    assert args.limit_concurrency is None                 # from the descriptor limit
    assert args.h11_max_incomplete_event_size == 16 * 1024
    assert (args.max_body_bytes, args.max_json_depth, args.max_prompts, args.max_n,
            args.max_choices, args.max_score_continuations, args.max_pending) == (
        8 * 1024 * 1024, 64, 64, 16, 128, 64, 1024)
    assert (args.allowed_host, args.allowed_origin) == ([], [])
    args = build_parser().parse_args(["--allowed-host", "a.example", "--allowed-host", "b.example",
                                      "--no-escape-special-tokens"])
    assert args.allowed_host == ["a.example", "b.example"]
    if "escape_special_tokens" in inspect.signature(Engine).parameters:
        assert engine_options(args)["escape_special_tokens"] is False
        assert engine_options(build_parser().parse_args([]))["escape_special_tokens"] is True


# ----------------------------------------- 8: web pages cannot drive a key-less server


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", None,
])
async def test_a_post_that_is_not_declared_json_is_a_415(content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    raw = b'{"model": "scripted", "prompt": "x", "max_tokens": 1}'
    async with asgi(create_app(ScriptedBackend())) as http:
        response = await http.post("/v1/completions", content=raw, headers=headers)
        assert response.status_code == 415 and _error(response)["code"] == "unsupported_media_type"
        ok = await http.post("/v1/completions", content=raw,
                             headers={"Content-Type": "application/json; charset=utf-8"})
        assert ok.status_code == 200


async def test_with_an_api_key_a_missing_content_type_is_accepted_but_text_is_not():
    raw = b'{"model": "scripted", "prompt": "x", "max_tokens": 1}'
    auth = {"Authorization": "Bearer k"}
    async with asgi(create_app(ScriptedBackend(), api_key="k")) as http:
        assert (await http.post("/v1/completions", content=raw, headers=auth)).status_code == 200
        text = await http.post("/v1/completions", content=raw, headers={**auth, "Content-Type": "text/plain"})
        assert text.status_code == 415


@pytest.mark.parametrize(("host", "allowed"), [
    ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True),
    ("api.localhost", True), ("10.1.2.3:8000", True), ("LOCALHOST", True),
    ("evil.example", False), ("evil.example:8000", False), ("localhost.evil.example", False),
])
async def test_a_keyless_server_answers_only_local_names_and_addresses(host, allowed):
    async with asgi(create_app(ScriptedBackend())) as http:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/health")):
            response = await http.request(method, path, headers={"Host": host},
                                          json={"model": MODEL, "prompt": "x", "max_tokens": 1})
            if allowed:
                assert response.status_code == 200
            else:
                assert response.status_code == 403
                assert _error(response)["code"] == "host_not_allowed"


async def test_allowed_hosts_and_origins_extend_what_a_keyless_server_answers():
    app = create_app(ScriptedBackend(), allowed_hosts=["aiolm.bench", "*.corp.example"],
                     allowed_origins=["https://ui.example.com"])
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    async with asgi(app, base_url="http://aiolm.bench") as http:
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert (await http.get("/health", headers={"Host": "gpu1.corp.example"})).status_code == 200
        assert (await http.get("/health", headers={"Host": "corp.example.evil"})).status_code == 403
        page = await http.post("/v1/completions", json=body,
                               headers={"Origin": "https://ui.example.com"})
        assert page.status_code == 200
        assert page.headers["access-control-allow-origin"] == "https://ui.example.com"
        preflight = await http.options("/v1/chat/completions", headers={
            "Origin": "https://ui.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        evil = await http.post("/v1/completions", json=body, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and _error(evil)["code"] == "origin_not_allowed"


async def test_a_keyless_server_refuses_requests_from_web_pages():
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    async with asgi(create_app(ScriptedBackend())) as http:
        for origin in ("https://evil.example", "null", "http://localhost:3000"):
            response = await http.post("/v1/completions", json=body, headers={"Origin": origin})
            assert response.status_code == 403 and _error(response)["code"] == "origin_not_allowed"


async def test_with_an_api_key_host_and_origin_are_not_checked():
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    headers = {"Authorization": "Bearer k", "Host": "evil.example", "Origin": "https://evil.example"}
    async with asgi(create_app(ScriptedBackend(), api_key="k")) as http:
        assert (await http.post("/v1/completions", json=body, headers=headers)).status_code == 200
        del headers["Authorization"]
        assert (await http.post("/v1/completions", json=body, headers=headers)).status_code == 401


# ------------------------------------------------- 10: errors say what, not internals


class Broken(ScriptedBackend):
    """Fails every request the way a dying engine does, with internals in the message."""

    def stream(self, request: GenerateRequest):
        raise BackendUnavailable("the engine loop failed: RuntimeError('CUDA error at 0x7f3a2c00')")


async def test_server_errors_say_what_happened_without_internals(caplog):
    async with asgi(create_app(Broken())) as http:
        with caplog.at_level("ERROR", logger="aiolm.server"):
            response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 503
    error = _error(response)
    assert "unavailable" in error["message"] and "retry" in error["message"]
    assert "0x7f3a2c00" not in response.text and "RuntimeError" not in response.text
    assert "0x7f3a2c00" in caplog.text   # the details are in the server's log


@pytest.mark.parametrize(("route", "extra", "param"), [
    ("chat", {"max_completion_tokens": -1}, "max_completion_tokens"),
    ("chat", {"max_tokens": -1}, "max_tokens"),
    ("chat", {"max_completion_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ("completion", {"regex": "("}, "regex"),
    ("completion", {"regex": 5}, "regex"),
    ("completion", {"grammar": ""}, "grammar"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
])
async def test_errors_name_the_field_the_client_sent(route, extra, param):
    if route == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}
    else:
        path, body = "/v1/completions", {"prompt": "Hi"}
    async with asgi(create_app(ScriptedBackend())) as http:
        response = await http.post(path, json={"model": MODEL, **body, **extra})
    assert response.status_code == 400
    assert _error(response)["param"] == param


async def test_a_constraint_the_answer_breaks_names_the_field_it_came_from():
    # The scripted model answers words; a digits-only regex is violated while generating.
    async with asgi(create_app(ScriptedBackend(lambda prompt: " no digits here"))) as http:
        response = await http.post("/v1/completions", json={
            "model": MODEL, "prompt": "Number:", "max_tokens": 4, "regex": "[0-9]+"})
    assert response.status_code == 400
    assert _error(response)["param"] == "regex"


# Found by tests/test_server_fuzz.py: each was a 500 (or seconds of CPU) before.
LONE_SURROGATE = "a\ud800b"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": LONE_SURROGATE}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "regex": "[a-z]\ud800"}, "regex"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["\udfff"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE_SURROGATE}]},
     "messages"),
    ("/v1/aiolm/score", {"prompt": "Hi", "continuations": [LONE_SURROGATE]}, "continuations"),
])
async def test_lone_surrogates_are_a_400_naming_the_field(path, body, param):
    async with asgi(create_app(ScriptedBackend())) as http:
        raw = json_dumps_keeping_surrogates({"model": MODEL, "max_tokens": 2, **body})
        response = await http.post(path, content=raw,
                                   headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == param and "lone surrogate" in error["message"]


def json_dumps_keeping_surrogates(body: dict[str, Any]) -> bytes:
    """JSON with ``\\ud800``-style escapes, as a hostile client sends them."""
    import json

    return json.dumps(body, ensure_ascii=True).encode()


async def test_a_recursive_stop_regex_is_refused_at_once():
    async with asgi(create_app(ScriptedBackend())) as http:
        start = time.perf_counter()
        response = await http.post("/v1/completions", json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 2, "stop_regex": "(?R)"})
    assert response.status_code == 400
    assert "recursion" in _error(response)["message"]
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(("route", "field", "value"), [
    ("completions", "echo", {}), ("completions", "suffix", ["x"]),
    ("completions", "logit_bias", [1]), ("chat", "logit_bias", "x"), ("chat", "tools", {}),
])
async def test_mistyped_fields_are_a_400_naming_them(route, field, value):
    if route == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}
    else:
        path, body = "/v1/completions", {"prompt": "Hi"}
    async with asgi(create_app(ScriptedBackend())) as http:
        response = await http.post(path, json={"model": MODEL, **body, field: value})
    assert response.status_code == 400
    assert _error(response)["param"] == field
