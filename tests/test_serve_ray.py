"""aiolm replicas on Ray Serve: the radix cache's block events, the block index and the
routing policy (fast, no Ray), the session header of aiolm.OpenAI, and two tiny-model
replicas on a local Ray instance behind the real HTTP endpoint (started once per module)."""

from __future__ import annotations

import random
import time

import pytest

import aiolm
from aiolm import gen, program
from aiolm.backends.openai import SESSION_HEADER
from aiolm.backends.scripted import ScriptedBackend
from aiolm.cache.block_events import CacheEvent, CacheEventLog, block_hashes
from aiolm.cache.pool import TokenSlotAllocator
from aiolm.cache.radix import RadixCache
from aiolm.server import create_app
from tests.openai_server import running

B = 4  # block size of the cache-event tests


# ---------------------------------------------------------------- block events (no Ray)

def _cache(size: int = 64) -> tuple[RadixCache, list[CacheEvent]]:
    cache = RadixCache(TokenSlotAllocator(size))
    events: list[CacheEvent] = []
    cache.listen(events.append, block_size=B)
    return cache, events


def _insert(cache: RadixCache, key: list[int]) -> None:
    slots = cache._allocator.alloc(len(key))
    cached = cache.insert(key, slots)
    if cached:
        cache._allocator.free(slots[:cached])


def test_block_hashes_are_chained_and_stable():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2                                    # the partial third block has none
    assert a == block_hashes(list(range(8)), 4)
    assert block_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != a[1]   # the first block differs
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1], 0)


def test_insert_reports_only_the_new_whole_blocks():
    cache, events = _cache()
    _insert(cache, list(range(10)))
    assert events == [CacheEvent(kind="stored", hashes=tuple(block_hashes(list(range(10)), B)))]
    events.clear()
    _insert(cache, list(range(10)) + [50, 51, 52])        # 13 tokens: block 2 ends at 12
    assert events == [CacheEvent(kind="stored",
                                 hashes=(block_hashes(list(range(10)) + [50, 51, 52], B)[2],))]
    events.clear()
    _insert(cache, list(range(6)) + [70])                 # a branch ending inside block 1
    assert events == []
    _insert(cache, list(range(6)) + [70, 71])             # ... which it now completes
    assert events == [CacheEvent(kind="stored",
                                 hashes=(block_hashes(list(range(6)) + [70, 71], B)[1],))]
    cache.check_integrity()


def test_eviction_reports_the_blocks_it_drops_and_reset_clears():
    cache, events = _cache()
    key = list(range(12))
    _insert(cache, key)
    _insert(cache, key[:4] + [90, 91, 92, 93, 94])
    events.clear()
    cache.evict(cache.evictable_size())
    removed = {h for e in events if e.kind == "removed" for h in e.hashes}
    assert removed == set(block_hashes(key, B)) | set(block_hashes(key[:4] + [90, 91, 92, 93], B))
    cache.check_integrity()
    _insert(cache, key)
    events.clear()
    cache.reset()
    assert events == [CacheEvent(kind="cleared")]


def test_no_listener_no_events():
    cache, events = _cache()
    cache.listen(None)
    _insert(cache, list(range(12)))
    cache.evict(100)
    assert events == []


def test_event_log_overflow_starts_with_cleared():
    log = CacheEventLog(max_events=2)
    for i in range(3):
        log(CacheEvent(kind="stored", hashes=(i,)))
    assert log.drain() == [CacheEvent(kind="cleared"), CacheEvent(kind="stored", hashes=(2,))]
    assert log.drain() == []
    with pytest.raises(ValueError, match="max_events"):
        CacheEventLog(max_events=0)


# ---------------------------------------------------------------- index and policy (no Ray)

def test_index_matches_the_longest_held_prefix_per_replica():
    from aiolm.serve_ray.index import BlockIndex

    h = block_hashes(list(range(40)), B)
    index = BlockIndex()
    index.apply("r0", [CacheEvent(kind="stored", hashes=tuple(h[:6]))])
    index.apply("r1", [CacheEvent(kind="stored", hashes=tuple(h[:2]))])
    assert index.match(h) == {"r0": 6, "r1": 2}
    index.apply("r0", [CacheEvent(kind="removed", hashes=tuple(h[3:6]))])
    assert index.match(h) == {"r0": 3, "r1": 2}
    index.apply("r1", [CacheEvent(kind="cleared")])
    assert index.match(h) == {"r0": 3}
    index.drop("r0")
    assert index.match(h) == {} and index.block_counts() == {"r1": 0}
    with pytest.raises(ValueError, match="kind"):
        index.apply("r0", [CacheEvent(kind="bogus")])  # type: ignore[arg-type]


def test_policy_prefers_the_holder_then_spills_then_least_loaded():
    from aiolm.serve_ray.policy import RoutingPolicy

    policy = RoutingPolicy(imbalance=2)
    replicas = ["r0", "r1"]
    d = policy.decide(replicas, matched={"r1": 5}, load={"r0": 0, "r1": 2})
    assert (d.ranks[0], d.reason, d.matched_blocks) == (("r1",), "prefix", 5)
    d = policy.decide(replicas, matched={"r1": 5}, load={"r0": 0, "r1": 3})
    assert (d.ranks, d.reason) == ((("r0",), ("r1",)), "least-loaded")       # spilled
    d = policy.decide(replicas, matched={}, load={"r0": 4, "r1": 1})
    assert (d.ranks[0], d.reason) == (("r1",), "least-loaded")
    with pytest.raises(ValueError, match="candidates"):
        policy.decide([], matched={}, load={})
    with pytest.raises(ValueError, match="imbalance"):
        RoutingPolicy(imbalance=-1)


def test_policy_follows_eviction_to_the_other_holder():
    from aiolm.serve_ray.index import BlockIndex
    from aiolm.serve_ray.policy import RoutingPolicy

    h = tuple(block_hashes(list(range(40)), B))
    index, policy = BlockIndex(), RoutingPolicy()
    index.apply("r0", [CacheEvent(kind="stored", hashes=h[:8])])
    index.apply("r1", [CacheEvent(kind="stored", hashes=h[:3])])
    assert policy.decide(["r0", "r1"], matched=index.match(h), load={}).ranks[0] == ("r0",)
    index.apply("r0", [CacheEvent(kind="removed", hashes=h[1:8])])        # r0 evicted most
    d = policy.decide(["r0", "r1"], matched=index.match(h), load={})
    assert (d.ranks[0], d.matched_blocks) == (("r1",), 3)


def test_policy_keeps_a_session_home_while_it_has_room():
    from aiolm.serve_ray.policy import RoutingPolicy

    policy = RoutingPolicy(imbalance=1, max_sessions=2)
    policy.routed("s", "r1")
    assert policy.decide(["r0", "r1"], matched={"r0": 9}, load={}, session="s").reason == "session"
    d = policy.decide(["r0", "r1"], matched={"r0": 9}, load={"r1": 2}, session="s")
    assert (d.ranks[0], d.reason) == (("r0",), "prefix")                  # no room: leaves
    policy.forget_replica("r1")
    assert policy.decide(["r0", "r1"], matched={}, load={}, session="s").reason == "least-loaded"
    for s in ("a", "b", "c"):
        policy.routed(s, "r0")
    assert policy.decide(["r0", "r1"], matched={}, load={"r0": 1}, session="a").reason != "session"


def _place(policy, n: int, load: dict[str, int], candidates=("r0", "r1")) -> list[str]:
    """Where ``n`` new prefixes (no replica holds a block of them) go, decided in a row."""
    return [policy.decide(list(candidates), matched={}, load=load).ranks[0][0] for _ in range(n)]


def test_policy_splits_new_prefixes_evenly_whatever_the_instant_load():
    from aiolm.serve_ray.policy import RoutingPolicy

    policy = RoutingPolicy()
    placed = _place(policy, 8, {"r0": 1, "r1": 1})
    assert placed.count("r0") == placed.count("r1") == 4
    assert policy.placements() == {"r0": 4, "r1": 4}
    # r0 always one request less busy: least-in-flight would send all 8 there.
    placed = _place(RoutingPolicy(), 8, {"r0": 0, "r1": 1})
    assert placed.count("r0") == placed.count("r1") == 4
    d = RoutingPolicy().decide(["r0", "r1"], matched={}, load={})
    assert (d.reason, d.placed, d.matched_blocks) == ("least-loaded", True, 0)


def test_policy_places_a_new_prefix_away_from_the_replica_that_took_more():
    from aiolm.serve_ray.policy import RoutingPolicy

    policy = RoutingPolicy(imbalance=2)
    for replica in ("r0", "r0", "r1"):
        policy.place(replica)
    assert _place(policy, 1, {"r0": 0, "r1": 2}) == ["r1"]           # busier, but has room
    assert _place(policy, 1, {"r0": 0, "r1": 3}) == ["r0"]           # no room: r0 after all
    assert policy.placements() == {"r0": 3, "r1": 2}


def test_policy_counts_only_the_last_window_of_placements():
    from aiolm.serve_ray.policy import RoutingPolicy

    policy = RoutingPolicy(window=3)
    for replica in ("r0", "r0", "r0", "r1", "r1"):
        policy.place(replica)
    assert policy.placements() == {"r0": 1, "r1": 2}
    assert _place(policy, 1, {}) == ["r0"]
    policy.withdraw("r0")                                            # its request went elsewhere
    assert policy.placements() == {"r1": 2}
    policy.withdraw("r0")                                            # none left: no-op
    policy.forget_replica("r1")
    assert policy.placements() == {}
    with pytest.raises(ValueError, match="window"):
        RoutingPolicy(window=0)


def test_policy_places_among_replicas_holding_the_same_longest_prefix():
    from aiolm.serve_ray.policy import RoutingPolicy

    policy = RoutingPolicy()
    policy.place("r0")
    shared = {"r0": 2, "r1": 2, "r2": 1}                              # e.g. a system prompt
    d = policy.decide(["r0", "r1", "r2"], matched=shared, load={})
    assert (d.ranks[0], d.reason, d.placed, d.matched_blocks) == (("r1",), "prefix", True, 2)
    d = policy.decide(["r0", "r1", "r2"], matched={"r0": 3, "r1": 2}, load={})
    assert (d.ranks[0], d.reason, d.placed) == (("r0",), "prefix", False)   # one holder: no placement
    assert policy.placements() == {"r0": 1, "r1": 1}


# ---------------------------------------------------------------- the session header

class _Headers:
    """ASGI wrapper recording the session header of each generation request."""

    def __init__(self, app):
        self.app, self.sessions = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("completions"):
            headers = dict(scope["headers"])
            self.sessions.append(headers.get(SESSION_HEADER.encode(), b"").decode())
        await self.app(scope, receive, send)


@program
async def _forked(s):
    s += "Q: two answers.\n"
    async with s.fork(2) as forks:
        forks += gen("a", max_tokens=4)
    s += gen("b", max_tokens=4)


@pytest.mark.anyio
async def test_openai_backend_sends_one_session_key_per_run():
    app = _Headers(create_app(ScriptedBackend(lambda p: "yes"), api_key="k"))
    with running(app) as url:
        backend = aiolm.OpenAI("scripted", base_url=url, api_key="k", chat=False, backoff=0.01)
        try:
            await _forked.run(backend=backend)
            first = list(app.sessions)
            await _forked.run(backend=backend)
        finally:
            await backend.aclose()
    assert len(first) == 3 and len(set(first)) == 1 and first[0]          # forks included
    assert len(app.sessions) == 6 and set(app.sessions[3:]) != set(first)


# ---------------------------------------------------------------- two replicas on Ray

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'aiolm[ray]')")
openai = pytest.importorskip("openai")

# Ray Serve's own modules warn on import (pydantic deprecations); not ours to fix.
_ray_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                           "ignore::PendingDeprecationWarning")

APP = "aiolm"


class _Replica:
    """What the router reads of Serve's RunningReplica."""

    def __init__(self, rid: str):
        from ray.serve._private.common import DeploymentID
        from ray.serve.request_router import ReplicaID

        self.replica_id = ReplicaID(unique_id=rid, deployment_id=DeploymentID(name="AiolmEngine"))


def _pending(request_id: str):
    from types import SimpleNamespace

    return SimpleNamespace(args=[], metadata=SimpleNamespace(internal_request_id=request_id))


@_ray_warnings
@pytest.mark.anyio
async def test_router_counts_a_burst_s_placements_before_serve_routes_them():
    from aiolm.serve_ray.router import CacheAwareRouter

    router = CacheAwareRouter.__new__(CacheAwareRouter)   # its state only: no Serve here
    router.initialize_state()
    router._replica_queue_len_cache = {}                    # what Serve reports: nothing yet
    replicas = [_Replica("r0"), _Replica("r1")]
    firsts = [(await router.choose_replicas(replicas, _pending(f"q{k}")))[0][0].replica_id.unique_id
              for k in range(4)]
    assert sorted(firsts) == ["r0", "r0", "r1", "r1"]        # decided before any was routed
    router.on_request_routed(_pending("q0"), _Replica("r1").replica_id, None)  # a later rank
    assert router._policy.placements() == {"r0": 1, "r1": 3}
    await router.choose_replicas(replicas, _pending("q1"))   # decided again: counted once
    assert sum(router._policy.placements().values()) == 4
    with pytest.raises(TypeError, match="unknown options"):
        router.initialize_state(bogus=1)


@pytest.fixture(scope="module")
def endpoint():
    """Two tiny-llama replicas (mini tokenizer, 320 KV slots each) behind the ingress."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray import serve

        from aiolm.serve_ray import build_app, delete

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"AIOLM_DEBUG_CHECKS": "0"}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"device": "cpu", "num_threads": 1, "max_total_tokens": 320,
                         "cuda_graphs": False},
                        replicas=2, imbalance=2, model_factory="tests.mini_model:load_tiny")
        serve.run(app, name=APP, route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=60)
        with client:
            yield client
        delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(n: int, seed: int) -> str:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world",
             "about", "house"]
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n))


def _complete(client, prompt: str, max_tokens: int = 2):
    model = "tiny-llama"
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0)


def _holders(prompt: str) -> dict[str, int]:
    from aiolm.serve_ray.router import cache_index

    tok = __import__("tests.mini_model", fromlist=["x"]).build_mini_tokenizer()
    ids = tok.encode(prompt)
    return ray.get(cache_index(APP).match.remote(block_hashes(ids)))


@_ray_warnings
def test_requests_sharing_a_prefix_land_on_its_holder(endpoint):
    prefix = _text(60, 1)
    _complete(endpoint, prefix)
    holders = _holders(prefix)
    assert len(holders) == 1                              # one replica computed it
    for i in range(4):
        usage = _complete(endpoint, prefix + f" {_text(3, i + 10)}").usage
        assert usage.prompt_tokens_details.cached_tokens >= 16 * max(holders.values())


@_ray_warnings
def test_chat_through_the_real_openai_client(endpoint):
    messages = [{"role": "user", "content": _text(30, 4)}]
    first = endpoint.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=3)
    again = endpoint.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=3)
    assert first.choices[0].message.role == "assistant"
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(endpoint.chat.completions.create(model="tiny-llama", messages=messages,
                                                   max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


@_ray_warnings
def test_eviction_leaves_the_index(endpoint):
    prefix = _text(60, 2)
    _complete(endpoint, prefix)
    [holder] = _holders(prefix)
    for i in range(12):                                   # 12 × ~60 tokens: more than 2 × 320 slots
        _complete(endpoint, _text(60, 100 + i))
    assert holder not in _holders(prefix)


@_ray_warnings
def test_an_imbalanced_queue_spills(endpoint):
    from concurrent.futures import ThreadPoolExecutor

    from aiolm.serve_ray import replica_statistics

    prefix = _text(60, 3)
    _complete(endpoint, prefix)
    before = {r: s["finished_requests"] for r, s in replica_statistics(APP).items()}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: _complete(endpoint, prefix + f" {i}", max_tokens=48), range(8)))
    after = {r: s["finished_requests"] for r, s in replica_statistics(APP).items()}
    served = {r: after[r] - before.get(r, 0) for r in after}
    assert sum(served.values()) == 8 and all(n > 0 for n in served.values()), served


@_ray_warnings
def test_killed_replica_fails_its_stream_clearly_then_is_replaced(endpoint):
    from ray import serve

    prefix = _text(60, 5)
    _complete(endpoint, prefix)
    [holder] = _holders(prefix)
    stream = endpoint.completions.create(model="tiny-llama", prompt=prefix + " go", max_tokens=230,
                                         stream=True, extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError, match="unavailable"):
        for n, _ in enumerate(stream):
            if n == 2:
                replica = ray.get_actor(f"SERVE_REPLICA::{APP}#AiolmEngine#{holder}", namespace="serve")
                ray.kill(replica, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:               # Serve starts a replacement
        status = serve.status().applications[APP].deployments["AiolmEngine"]
        engines = {n["name"].rpartition("#")[2] for n in ray.util.list_named_actors(True)
                   if "#AiolmEngine#" in n["name"]}
        if status.replica_states.get("RUNNING", 0) == 2 and holder not in engines and len(engines) == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the killed replica was not replaced")
    results = [_complete(endpoint, _text(60, 300 + i)) for i in range(6)]
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)
    from aiolm.serve_ray import replica_statistics

    served = set(replica_statistics(APP))
    assert holder not in served and served <= engines
