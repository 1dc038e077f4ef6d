"""What a new user meets in the first hour (issue "the first hour of a user"): a sync
``run_sync`` for scripts, a state that shows itself in a notebook, fork mistakes that say
what to do, a constrained gen cut by ``max_tokens`` that says so, a benchmark bar that
counts programs, and ``aiolm serve`` failing on a busy port before it loads anything."""

from __future__ import annotations

import re
import socket
import time

import anyio
import pytest
from tiny_chat import tiny_chat_model

import aiolm
from aiolm import assistant, gen, program, system, user
from aiolm.backends import ScriptedBackend
from aiolm.bench import WORKLOADS
from aiolm.bench.cli import bench_main
from aiolm.bench.harness import plan, run_plan
from aiolm.bench.targets import ScriptedTarget
from aiolm.server.cli import EXIT_STARTUP_FAILED, bind_socket, serve_main


@program
async def qa(s, question: str):
    s += "Q: " + question + "\nA:" + gen("answer", max_tokens=8, stop="\n")


# ------------------------------------------------------------------ run_sync


def test_run_sync_runs_a_program_without_an_event_loop():
    state = qa.run_sync(question="Capital of France?", backend=ScriptedBackend(lambda p: " Paris\n"))
    assert state["answer"] == " Paris"
    assert state.text() == "Q: Capital of France?\nA: Paris"


def test_run_sync_takes_the_use_backend_default_and_checks_arguments_first():
    with aiolm.use_backend(ScriptedBackend(lambda p: " 4")):
        assert qa.run_sync("2+2?")["answer"] == " 4"
        with pytest.raises(TypeError, match=r"run_sync: qa\(s, \.\.\.\) .*'max_new_tokens'.*max_tokens="):
            qa.run_sync("2+2?", max_new_tokens=3)


@pytest.mark.anyio
async def test_run_sync_inside_an_event_loop_says_to_await_run():
    with pytest.raises(RuntimeError, match=r"running (asyncio|trio) event loop.*"
                                           r"`state = await qa\.run\(\.\.\.\)`"):
        qa.run_sync(question="x", backend=ScriptedBackend())


def test_run_sync_opens_an_engine_that_is_not_started_and_closes_it():
    engine = aiolm.Engine(tiny_chat_model(), max_total_tokens=2048)
    state = qa.run_sync(question="hi", backend=engine)
    assert isinstance(state["answer"], str)
    assert state.meta("answer").completion_tokens >= 1
    assert engine.statistics().finished_requests >= 1    # the last snapshot, once closed
    with pytest.raises(RuntimeError, match="this engine was closed; create a new Engine"):
        qa.run_sync(question="again", backend=engine)


# ------------------------------------------------------------------ display


@program
async def chat(s, question: str):
    s += system("You answer <briefly>.")
    s += user(question)
    s += assistant(gen("answer", max_tokens=8))


def test_repr_names_the_program_its_status_variables_and_text_length():
    state = chat.run_sync("What is <script>?", backend=ScriptedBackend(lambda p: "A tag."))
    assert repr(state) == f"<ProgramState chat done vars=['answer'] text={len(state.text())} chars>"


@pytest.mark.anyio
async def test_repr_of_a_state_still_running_says_running():
    seen = []

    @program
    async def look(s):
        s += "x" + gen("y", max_tokens=2)
        seen.append(repr(s))

    await look.run(backend=ScriptedBackend(lambda p: " z"))
    assert re.fullmatch(r"<ProgramState look running vars=\[\] pending=\['y'\] text=\d+ chars>", seen[0])


def test_html_escapes_the_text_and_highlights_each_generated_variable():
    state = chat.run_sync("What is <script>alert(1)</script>?",
                          backend=ScriptedBackend(lambda p: "<b>A</b> & more"))
    html = state._repr_html_()
    assert "<script>" not in html and "<b>A</b>" not in html
    assert "What is &lt;script&gt;alert(1)&lt;/script&gt;?" in html
    assert "You answer &lt;briefly&gt;." in html
    highlighted = re.findall(r'<span class="aiolm-var" title="([^"]+)" style="background:[^"]+">([^<]*)</span>', html)
    assert highlighted == [("answer", "&lt;b&gt;A&lt;/b&gt; &amp; more")]
    turns = re.findall(r'<div class="aiolm-turn"[^>]*><div[^>]*>(\w+)</div>', html)
    assert turns == ["system", "user", "assistant"]
    assert "chat · done" in html


def test_html_highlights_select_and_concat_joined_branch_text_and_escapes_variable_names():
    @program
    async def pick(s):
        s += "Pick:" + aiolm.select('a"b', choices=[" yes", " no"]) + "\n"
        async with s.fork(2) as forks:
            forks += lambda i: f"[{i}]" + gen("part", max_tokens=1) + "\n"
        forks.join(mode="concat")

    state = pick.run_sync(backend=ScriptedBackend(lambda p: " yes"))
    html = state._repr_html_()
    titles = re.findall(r'class="aiolm-var" title="([^"]+)"', html)
    assert titles == ["a&quot;b", "part", "part"]


def test_html_shows_tool_calls_under_their_variable_and_tool_turns():
    def get_time(city: str) -> str:
        """The time in a city."""
        return "noon"

    @program
    async def agent(s):
        s += user("Time in Rome?")
        s += assistant(gen("calls", tools=[get_time]))
        (call,) = await s.get("calls")
        s += aiolm.tool_result(call, "<noon>")

    reply = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>'
    html = agent.run_sync(backend=ScriptedBackend(lambda p: reply))._repr_html_()
    assert re.search(r'<span class="aiolm-var" title="calls" [^>]*><span class="aiolm-call"[^>]*>'
                     r'\[call get_time\(\{&quot;city&quot;: &quot;Rome&quot;\}\)\]</span></span>', html)
    assert re.search(r'<div[^>]*>tool \(call_\w+\)</div>&lt;noon&gt;</div>', html)


def test_html_of_a_failed_state_shows_its_error():
    @program
    async def broken(s):
        s += "Start:" + gen("first", max_tokens=2)
        await s.sync()
        raise ValueError("the <tool> failed")

    (state,) = anyio.run(lambda: broken.run_batch([{}], backend=ScriptedBackend(lambda p: " ok")))
    assert "failed" in repr(state) and "error=ValueError" in repr(state)
    html = state._repr_html_()
    assert '<div class="aiolm-error"' in html
    assert "<b>ValueError</b>: the &lt;tool&gt; failed" in html
    assert "broken · failed" in html


# ------------------------------------------------------------------ fork mistakes


@program
async def tips(s, read):
    s += "Tips:\n"
    async with s.fork(2) as forks:
        forks += "Tip:" + gen("tip", max_tokens=2, stop="\n")
    await read(s, forks)


def test_reading_a_fork_variable_before_join_says_to_join():
    async def read(s, forks):
        with pytest.raises(aiolm.UnknownVariable, match=r"'tip' is in the fork's branches.*"
                                                         r"call forks\.join\(\).*forks\[i\]\['tip'\]"):
            s["tip"]
        with pytest.raises(aiolm.UnknownVariable, match="call forks.join"):
            await s.get("tip")
        forks.join()
        assert s["tip"] == [" a", " a"]

    tips.run_sync(read, backend=ScriptedBackend(lambda p: " a"))


def test_a_fork_variable_read_inside_the_block_or_after_a_run_without_join_says_to_join():
    @program
    async def forgetful(s):
        async with s.fork(2) as forks:
            forks += "Tip:" + gen("tip", max_tokens=2)
            with pytest.raises(aiolm.UnknownVariable, match="'tip' is in the fork's branches"):
                s["tip"]                                   # still being generated in the branches

    state = forgetful.run_sync(backend=ScriptedBackend(lambda p: " a"))
    with pytest.raises(aiolm.UnknownVariable, match=r"'tip' is in the fork's branches.*forks\.join\(\)"):
        state["tip"]


def test_a_variable_never_appended_still_says_so():
    async def read(s, forks):
        with pytest.raises(aiolm.UnknownVariable, match="no variable 'nope' was ever appended"):
            s["nope"]

    tips.run_sync(read, backend=ScriptedBackend(lambda p: " a"))


def test_indexing_the_fork_group_by_name_says_to_index_a_branch():
    async def read(s, forks):
        with pytest.raises(TypeError, match=r"forks\['tip'\]: .*indexed by branch number.*"
                                            r"forks\[0\]\['tip'\].*forks\.join\(\)"):
            forks["tip"]
        assert forks[0]["tip"] == " a"

    tips.run_sync(read, backend=ScriptedBackend(lambda p: " a"))


def test_a_concat_join_says_it_merges_no_variables():
    async def read(s, forks):
        forks.join(mode="concat")
        with pytest.raises(aiolm.UnknownVariable, match=r"join\(mode='concat'\).*mode='gather'"):
            s["tip"]

    state = tips.run_sync(read, backend=ScriptedBackend(lambda p: " a"))
    assert state.text() == "Tips:\nTip: aTip: a"


# ------------------------------------------------------------------ a constraint cut by max_tokens


def test_a_constrained_gen_cut_by_max_tokens_says_to_raise_it():
    @program
    async def digits(s):
        s += "Digits:" + gen("n", regex=r"( \d)+ end", max_tokens=3)

    with pytest.raises(aiolm.ConstraintError, match=r"gen\('n'\): the output was cut at "
                                                    r"max_tokens=3 before it was complete.*raise max_tokens"):
        digits.run_sync(backend=ScriptedBackend(lambda p: " 1 2 3 4 end"))


def test_a_constrained_answer_complete_at_max_tokens_is_kept():
    @program
    async def words(s):
        s += "Words:" + gen("w", regex=r"( \w+){1,2}", max_tokens=2)

    state = words.run_sync(backend=ScriptedBackend(lambda p: " one two three"))
    assert state["w"] == " one two"
    assert state.meta("w").finish_reason == "length"


@pytest.mark.anyio
async def test_a_json_gen_cut_by_max_tokens_on_the_engine_names_the_variable():
    schema = {"type": "object", "properties": {"bio": {"type": "string", "minLength": 200}},
              "required": ["bio"]}

    @program
    async def person(s):
        s += user("Invent a person.") + assistant(gen("person", json_schema=schema, max_tokens=5))

    async with aiolm.Engine(tiny_chat_model(), max_total_tokens=2048) as engine:
        with pytest.raises(aiolm.ConstraintError, match=r"gen\('person'\): the output was cut at "
                                                        r"max_tokens=5 before it was complete"):
            await person.run(backend=engine)
        states = await person.run_batch([{}], backend=engine)
    assert isinstance(states[0].error, aiolm.ConstraintError)
    assert "max_tokens=5" in states[0]._repr_html_()


# ------------------------------------------------------------------ the bench's bar


class Recorder:
    def __init__(self):
        self.total = None
        self.done = 0
        self.stages = []

    def planned(self, programs):
        self.total = programs

    def stage(self, text):
        self.stages.append(text)

    def advance(self, programs):
        self.done += programs


@pytest.mark.anyio
async def test_run_plan_counts_every_measured_program_and_names_each_stage():
    names = ["few-shot", "multi-turn", "react"]   # multi-turn runs its own runner
    steps = plan([WORKLOADS[n] for n in names], ScriptedTarget(), size="tiny", by_workload=True)
    progress = Recorder()
    await run_plan(steps, size="tiny", progress=progress)
    assert progress.total == sum(len(WORKLOADS[n].make_inputs("tiny", 0)) for n in names)
    assert progress.done == progress.total
    assert progress.stages[:3] == ["few-shot/aiolm: opening scripted", "few-shot/aiolm: warm-up",
                                   "few-shot/aiolm"]
    assert "multi-turn/aiolm" in progress.stages and "react/aiolm" in progress.stages


@pytest.mark.anyio
async def test_a_failed_step_still_brings_the_count_to_the_total():
    import attrs

    def no_runs(size, seed):
        return [{"nonexistent_argument": 1}] * 3

    broken = attrs.evolve(WORKLOADS["select"], make_inputs=no_runs)
    steps = plan([WORKLOADS["few-shot"], broken], ScriptedTarget(), size="tiny", by_workload=True)
    progress = Recorder()
    few_shot, select = await run_plan(steps, size="tiny", progress=progress)
    assert select["errors"]
    assert progress.total == len(WORKLOADS["few-shot"].make_inputs("tiny", 0)) + 3
    assert progress.done == progress.total


def test_the_bench_bar_counts_programs_not_runs(tmp_path, capsys):
    names = ["few-shot", "react"]
    code = bench_main([*names, "--backend", "scripted", "--size", "tiny", "--out", str(tmp_path / "r.json")])
    assert code == 0
    bar = capsys.readouterr().err
    total = sum(len(WORKLOADS[n].make_inputs("tiny", 0)) for n in names)
    assert total > len(names)                      # more programs than runs
    assert re.search(rf"react/aiolm: 100%\|[^|]*\| {total}/{total} ", bar)
    assert "few-shot/aiolm: warm-up" in bar


def test_no_progress_shows_no_bar(tmp_path, capsys):
    code = bench_main(["few-shot", "--backend", "scripted", "--size", "tiny", "--no-progress",
                       "--out", str(tmp_path / "r.json")])
    assert code == 0
    assert "prog" not in capsys.readouterr().err


def test_run_batch_reports_each_program_as_it_finishes():
    seen = []

    @program
    async def maybe(s, x: int):
        if x < 0:
            raise ValueError("negative")
        s += str(x) + gen("y", max_tokens=1)

    states = anyio.run(lambda: maybe.run_batch(
        [{"x": 1}, {"x": -1}, {"x": 2}], backend=ScriptedBackend(lambda p: " ok"),
        on_done=lambda i, st: seen.append((i, st.error is None))))
    assert sorted(seen) == [(0, True), (1, False), (2, True)]
    assert [s.error is None for s in states] == [True, False, True]


# ------------------------------------------------------------------ aiolm serve on a busy port


def test_serve_on_a_busy_port_fails_at_once_before_loading_the_model(capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        start = time.monotonic()
        # The model does not exist: had it been loaded first, this would fail on the model.
        code = serve_main(["--model", "/no/such/model.gguf", "--port", str(port)])
        elapsed = time.monotonic() - start
    finally:
        busy.close()
    assert code == EXIT_STARTUP_FAILED
    assert elapsed < 5
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in err
    assert "choose another --port" in err


def test_bind_socket_binds_without_listening():
    sock = bind_socket("127.0.0.1", 0)
    with sock:
        port = sock.getsockname()[1]
        assert port > 0
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))     # refused while the model would load
