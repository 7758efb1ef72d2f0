"""VariableTuner end to end: real DSPy programs on the offline LM, real leases, real worker processes.

The task is deterministic: the offline LM states the settings it was called with, and
:func:`~dspex_dspy.offline.settings_quality` scores them with a known optimum of 1.0
(``offline/large``, temperature 0.35, 600 max tokens).
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest
from optuna.storages.journal import JournalFileBackend

from dspex_dspy import Context, Variables
from dspex_dspy.errors import VariableLockedError
from dspex_dspy.offline import offline_lm
from dspex_dspy.tune import VariableTuner

sys.path.insert(0, str(Path(__file__).with_name("workers")))
from tuning import MODELS, define_task, journal_storage, metric, program_for, trainset

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("workers") / "tuning.py"
DEADLINE_S = 120.0
OPTIMUM = 1.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Proc:
    """A subprocess of ``tuning.py`` whose stdout lines are collected by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr = ""
        threading.Thread(target=self._drain, daemon=True).start()
        threading.Thread(target=self._drain_err, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _drain_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def line(self) -> str:
        try:
            line = self.lines.get(timeout=DEADLINE_S)
        except queue.Empty:
            raise AssertionError(f"process silent for {DEADLINE_S} s") from None
        if line is None:
            self.proc.wait(timeout=DEADLINE_S)
            time.sleep(0.1)
            raise AssertionError(f"process exited ({self.proc.returncode}) early:\n{self.stderr}")
        self.seen.append(line)
        return line

    def wait_ready(self) -> None:
        while self.line() != "ready":
            pass

    def finish(self) -> list[str]:
        """Close stdin, collect the remaining lines and check the exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rest = []
        while (line := self.lines.get(timeout=DEADLINE_S)) is not None:
            rest.append(line)
        assert self.proc.wait(timeout=DEADLINE_S) == 0, self.stderr
        self.seen.extend(rest)
        return rest

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE_S)

    def close(self) -> None:
        self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.close()


@pytest.fixture
def lm() -> Iterator[Any]:
    with dspy.context(lm=offline_lm(MODELS[0])):
        yield


def _ctx() -> Context:
    ctx = Context()
    define_task(ctx)
    return ctx


def _versions(ctx: Context) -> dict[str, int]:
    return {v.name: v.version for v in Variables.list(ctx)}


@pytest.mark.usefixtures("lm")
def test_the_tuner_finds_the_known_optimum_and_publishes_it() -> None:
    ctx = _ctx()
    tuner = VariableTuner(metric, num_trials=30, seed=0, num_threads=2, progress=False)
    program = program_for(ctx)
    assert tuner.compile(program, trainset=trainset()) is program
    result = tuner.result
    assert result is not None and program.tuning_result is result
    assert set(result.searched) == {"temperature", "max_tokens", "model"}
    assert result.searched["max_tokens"] == "int [16, 4096]"
    assert len(result.trials) == 30
    assert all(t.state == "COMPLETE" and t.duration is not None and t.duration > 0 for t in result.trials)
    best = result.best
    assert best is not None and best.score is not None
    assert best.score >= 0.95 * OPTIMUM
    assert best.score == max(t.score or 0.0 for t in result.trials)
    # One atomic publication of the winner, carrying who, how good and which trial.
    assert [p.trial for p in result.published] == [best.number]
    assert result.published[0].versions == {"temperature": 2, "max_tokens": 2, "model": 2}
    for name, value in best.values.items():
        var = Variables.get_variable(ctx, name)
        assert var.value == value
        assert var.metadata["optimizer_id"] == tuner.optimizer_id
        assert float(var.metadata["score"]) == pytest.approx(best.score)
        assert var.metadata["trial"] == str(best.number)
        assert var.optimization_status is None  # the lease is released
    frame = result.trials_dataframe()
    assert list(frame["number"]) == list(range(30))
    assert {"score", "duration_s", "temperature", "max_tokens", "model"} <= set(frame.columns)
    # Seeded: the same search again finds the same winner.
    again = VariableTuner(metric, num_trials=30, seed=0, num_threads=2, progress=False)
    again.compile(program_for(_ctx()), trainset=trainset())
    assert again.result is not None and again.result.best is not None
    assert again.result.best.values == best.values


@pytest.mark.usefixtures("lm")
def test_trials_apply_values_per_call_and_never_change_the_session() -> None:
    ctx = _ctx()
    seen: list[tuple[dict[str, int], Any, str | None]] = []
    refused: list[VariableLockedError] = []

    def watching_metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
        status = Variables.get_variable(ctx, "temperature").optimization_status
        seen.append((_versions(ctx), Variables.get(ctx, "model"), status.optimizer_id if status else None))
        try:
            Variables.set(ctx, "temperature", 0.5)
        except VariableLockedError as exc:
            refused.append(exc)
        return metric(example, prediction, trace)

    tuner = VariableTuner(watching_metric, num_trials=6, seed=3, optimizer_id="tuner-a", progress=False)
    tuner.compile(program_for(ctx), trainset=trainset())
    assert tuner.result is not None
    assert len(seen) == 6 * len(trainset())
    assert all(versions == {"temperature": 1, "max_tokens": 1, "model": 1} for versions, _, _ in seen)
    assert all(model == "offline/small" and holder == "tuner-a" for _, model, holder in seen)
    assert len(refused) == len(seen)
    assert all(exc.optimizer_id == "tuner-a" and exc.name == "temperature" for exc in refused)
    # The trials ran with their own values (the answers state them), not the session's.
    models = {t.values["model"] for t in tuner.result.trials}
    assert len(models) > 1
    assert _versions(ctx) == {"temperature": 2, "max_tokens": 2, "model": 2}


@pytest.mark.usefixtures("lm")
def test_without_publishing_no_lease_is_taken_and_nothing_is_written() -> None:
    ctx = _ctx()
    holders: list[object] = []

    def probe(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
        holders.append(Variables.get_variable(ctx, "model").optimization_status)
        return metric(example, prediction, trace)

    tuner = VariableTuner(probe, num_trials=4, seed=0, publish=None, progress=False)
    tuner.compile(program_for(ctx), trainset=trainset())
    assert tuner.result is not None and tuner.result.published == []
    assert set(holders) == {None}
    assert _versions(ctx) == {"temperature": 1, "max_tokens": 1, "model": 1}


@pytest.mark.usefixtures("lm")
def test_improvements_publishes_each_new_best() -> None:
    ctx = _ctx()
    tuner = VariableTuner(metric, num_trials=12, seed=0, publish="improvements", progress=False)
    tuner.compile(program_for(ctx), trainset=trainset())
    result = tuner.result
    assert result is not None and result.best is not None
    published = result.published
    assert len(published) >= 2
    assert [p.score for p in published] == sorted({p.score for p in published})
    assert [p.versions["model"] for p in published] == list(range(2, 2 + len(published)))
    assert published[-1].trial == result.best.number
    assert Variables.get_variable(ctx, "model").version == 1 + len(published)


@pytest.mark.usefixtures("lm")
@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_the_lease_is_released_on_every_exit_path(failure: type[BaseException]) -> None:
    ctx = _ctx()
    calls = 0

    def failing(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
        nonlocal calls
        calls += 1
        assert Variables.get_variable(ctx, "model").optimization_status is not None
        if calls > len(trainset()):
            raise failure("the metric broke")
        return metric(example, prediction, trace)

    tuner = VariableTuner(failing, num_trials=5, seed=0, num_threads=1, progress=False)
    # With max_errors=1, dspy.Evaluate gives up on the first failing example and raises.
    with dspy.context(max_errors=1), pytest.raises((failure, Exception)):
        tuner.compile(program_for(ctx), trainset=trainset())
    assert tuner.result is not None
    assert [t.state for t in tuner.result.trials] == ["COMPLETE", "FAIL"]
    assert _versions(ctx) == {"temperature": 1, "max_tokens": 1, "model": 1}
    for var in Variables.list(ctx):
        assert var.optimization_status is None
    assert Variables.set(ctx, "model", "offline/medium") == 2  # free again


@pytest.mark.usefixtures("lm")
def test_a_second_tuner_on_an_overlapping_set_is_refused() -> None:
    ctx = _ctx()
    lease = Variables.start_optimization(ctx, ["model"], "tuner-first", ttl=60)
    tuner = VariableTuner(metric, num_trials=3, seed=0, optimizer_id="tuner-second", progress=False)
    with pytest.raises(VariableLockedError, match="held by optimizer tuner-first"):
        tuner.compile(program_for(ctx), trainset=trainset())
    assert tuner.result is not None and tuner.result.trials == []
    assert Variables.get_variable(ctx, "temperature").optimization_status is None
    assert _versions(ctx) == {"temperature": 1, "max_tokens": 1, "model": 1}
    Variables.stop_optimization(ctx, lease)


@pytest.mark.usefixtures("lm")
def test_the_space_narrows_and_overrides_and_the_tuner_says_what_it_searched(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ctx = _ctx()
    Variables.defvariable(ctx, "notes", "string", "free text")
    program = program_for(ctx)
    program.bind_to_variable("instructions", "notes")
    tuner = VariableTuner(metric, num_trials=4, seed=0, publish=None, optimizer_id="tuner-s")
    tuner.compile(program, trainset=trainset())
    assert tuner.result is not None
    assert tuner.result.skipped == {"notes": "a string needs an enum of candidates to be searched"}
    said = capsys.readouterr().err
    assert "tuner-s searches temperature (float [0.0, 1.5]), max_tokens (int [16, 4096]), model (one of" in said
    assert "left alone: notes (a string needs an enum of candidates to be searched)" in said
    assert "VariableTuner: 100%" in said  # the progress bar

    sampler = optuna.samplers.RandomSampler(seed=1)
    narrowed = VariableTuner(metric, num_trials=4, sampler=sampler, publish=None, progress=False)
    narrowed.compile(program, trainset=trainset(), space={"model": ["offline/large"], "temperature": None})
    assert narrowed.result is not None
    assert narrowed.result.study.sampler is sampler
    assert narrowed.result.searched == {"model": "one of ['offline/large']", "temperature": "float [0.0, 1.5]"}
    assert {t.values["model"] for t in narrowed.result.trials} == {"offline/large"}
    assert all(set(t.values) == {"model", "temperature"} for t in narrowed.result.trials)


def test_a_live_fleet_serves_old_values_during_the_search_and_the_winner_right_after(procs: list[Proc]) -> None:
    with Context() as ctx:
        define_task(ctx)
        ctx.ensure_bridged()
        assert ctx.bridge_address is not None
        for name in ("w1", "w2"):
            procs.append(Proc("serve", "--address", ctx.bridge_address, "--session", ctx.id, "--name", name))
        for proc in procs:
            proc.wait_ready()

        def calls_of(proc: Proc) -> list[dict[str, Any]]:
            """Every call the worker reported so far (its pending lines collected first)."""
            while not proc.lines.empty():
                line = proc.lines.get_nowait()
                if line is None:
                    raise AssertionError(proc.stderr)
                proc.seen.append(line)
            return [json.loads(line) for line in proc.seen if line.startswith("{")]

        # The search waits, inside its first trial, until every worker has reported a call it made
        # after that trial began: each worker then surely served calls during the search.
        gate = threading.Lock()
        in_trial: list[float] = []

        def paced(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
            with gate:
                if not in_trial:
                    in_trial.append(time.time())
                    for proc in procs:
                        wait_for(
                            lambda proc=proc: any(c["at"] >= in_trial[0] for c in calls_of(proc)),
                            f"worker {proc.proc.args} to serve a call during the search",
                        )
            return metric(example, prediction, trace)

        tuner = VariableTuner(paced, num_trials=30, seed=0, num_threads=2, progress=False)
        with dspy.context(lm=offline_lm(MODELS[0])):
            started = time.time()
            tuner.compile(program_for(ctx), trainset=trainset())
        result = tuner.result
        assert result is not None and result.best is not None and result.best.score is not None
        assert result.best.score >= 0.95 * OPTIMUM
        published_at = Variables.get_variable(ctx, "model").updated_at
        winner = result.best.values

        def switched(proc: Proc) -> bool:
            return any(c["seen"]["model"][1] == 2 for c in calls_of(proc))

        for proc in procs:
            wait_for(lambda proc=proc: switched(proc), "the worker to use the published winner")
        for proc in procs:
            proc.finish()
            calls = calls_of(proc)
            # A call that ended before the publication's timestamp read its bindings before it
            # (the store stamps a write before applying it); one that ended later may have seen either.
            during = [c for c in calls if started <= c["at"] and c["end"] < published_at]
            assert any(c["at"] >= in_trial[0] for c in during), "the worker served no call during the search"
            for call in during:  # the search never showed through: old values, version 1
                assert call["seen"] == {"temperature": [1.2, 1], "max_tokens": [64, 1], "model": ["offline/small", 1]}
            first_new = next(i for i, c in enumerate(calls) if c["seen"]["model"][1] == 2)
            new = calls[first_new]
            assert new["end"] >= published_at
            print(f"{new['worker']} served the winner {new['end'] - published_at:.3f} s after it was published")
            assert new["seen"] == {name: [winner[name], 2] for name in ("temperature", "max_tokens", "model")}
            assert f"model={winner['model']}" in new["answer"]
            assert all(c["seen"]["model"][1] == 2 for c in calls[first_new:])


def test_a_killed_tuner_holds_its_lease_until_it_expires(procs: list[Proc], monkeypatch: pytest.MonkeyPatch) -> None:
    ttl = 10.0
    with Context() as ctx:
        define_task(ctx)
        ctx.ensure_bridged()
        assert ctx.bridge_address is not None
        # The bridge is embedded in this process: note each take or renewal of tuner-proc's lease
        # (monotonic time before and after the store handled it, the lease it returned).
        store = ctx.provider.store
        takes: list[tuple[float, float, Any]] = []
        start_optimization = store.start_optimization

        def noting(session_id: str, identifiers: Any, optimizer_id: str, **kwargs: Any) -> Any:
            before = time.monotonic()
            lease = start_optimization(session_id, identifiers, optimizer_id, **kwargs)
            if session_id == ctx.id and optimizer_id == "tuner-proc":
                takes.append((before, time.monotonic(), lease))
            return lease

        monkeypatch.setattr(store, "start_optimization", noting)
        tuner = Proc(
            "tune", "--address", ctx.bridge_address, "--session", ctx.id, "--optimizer-id", "tuner-proc",
            "--lease-ttl", str(ttl), "--hang",
        )  # fmt: skip
        procs.append(tuner)
        tuner.wait_ready()  # searching: the metric of the first trial is blocked
        status = Variables.get_variable(ctx, "max_tokens").optimization_status
        assert status is not None and status.optimizer_id == "tuner-proc"
        # The first lease ends by this (monotonic) time unless the heartbeat renews it. Wait for a
        # renewal made after that time; the lease holds right after it: renewed, it outlived its ttl.
        first_deadline = takes[0][1] + ttl
        wait_for(lambda: any(before >= first_deadline for before, _, _ in takes[1:]), "a renewal after the ttl")
        with pytest.raises(VariableLockedError, match="held by optimizer tuner-proc"):
            Variables.set(ctx, "max_tokens", 128)
        renewal = next(lease for before, _, lease in takes[1:] if before >= first_deadline)
        kept = "kept" if renewal.id == takes[0][2].id else "lapsed and was taken again"
        print(f"{len(takes) - 1} renewals; the lease was {kept} across its first ttl")
        rival = VariableTuner(metric, num_trials=2, seed=0, optimizer_id="tuner-rival", progress=False)
        with dspy.context(lm=offline_lm(MODELS[0])), pytest.raises(VariableLockedError):
            rival.compile(program_for(ctx), trainset=trainset())
        assert Variables.set(ctx, "max_tokens", 128, force=True) == 2
        forced = Variables.get_variable(ctx, "max_tokens")
        assert forced.metadata["forced_over"] == "tuner-proc"
        assert [e.metadata.get("forced_over") for e in ctx.provider.store.get_history(ctx.id, "max_tokens")][:1] == [
            "tuner-proc"
        ]
        assert _versions(ctx) == {"temperature": 1, "max_tokens": 2, "model": 1}

        tuner.kill()
        # No heartbeat any more: the lease ends when its ttl runs out, and then another tuner can take it.
        taken: list[Any] = []

        def next_tuner_takes_it() -> bool:
            try:
                taken.append(Variables.start_optimization(ctx, ["max_tokens"], "tuner-next", ttl=60))
            except VariableLockedError as exc:
                assert exc.optimizer_id == "tuner-proc"
                return False
            return True

        wait_for(next_tuner_takes_it, "the lease to expire")
        status = Variables.get_variable(ctx, "max_tokens").optimization_status
        assert status is not None and status.optimizer_id == "tuner-next"
        Variables.stop_optimization(ctx, taken[0])
        assert Variables.set(ctx, "max_tokens", 256) == 3


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port, for Optuna's Redis journal."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        wait_for(answers, "redis-server to answer")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait(timeout=DEADLINE_S)


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_two_processes_run_trials_of_one_study_and_one_publishes(
    procs: list[Proc], tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    journal = str(tmp_path / "study.log") if backend == "file" else request.getfixturevalue("redis_url")
    # The helper runs two trials, then waits (inside its third) until the main tuner runs a trial:
    # however slow either start is, both processes run trials of the study.
    helper = Proc(
        "helper", "--journal", journal, "--study", "shared", "--trials", "16", "--optimizer-id", "tuner-helper",
        "--delay", "0.05", "--pause-after", "2",
    )  # fmt: skip
    procs.append(helper)
    helper.wait_ready()
    storage = journal_storage(journal)

    def helper_trials() -> int:
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
        except KeyError:
            return 0
        return len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])

    while helper.line() != "paused":
        pass
    assert helper_trials() == 2
    ctx = _ctx()
    released = threading.Lock()
    resumed = False

    def slow(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
        nonlocal resumed
        with released:
            if not resumed:  # the main tuner is running a trial: let the helper go on
                assert helper.proc.stdin is not None
                helper.proc.stdin.write("go\n")
                helper.proc.stdin.flush()
                resumed = True
        time.sleep(0.05)
        return metric(example, prediction, trace)

    tuner = VariableTuner(
        slow, num_trials=16, seed=0, storage=storage, study_name="shared", optimizer_id="tuner-main", progress=False
    )
    with dspy.context(lm=offline_lm(MODELS[0])):
        tuner.compile(program_for(ctx), trainset=trainset())
    report = json.loads(helper.finish()[-1])
    result = tuner.result
    assert result is not None and result.best is not None
    runners = {t.optimizer_id for t in result.trials}
    assert runners == {"tuner-helper", "tuner-main"}
    assert 16 <= len(result.trials) <= 17
    assert set(report["trials"]) <= {t.number for t in result.trials if t.optimizer_id == "tuner-helper"}
    # The publisher wrote the best over both processes' trials; the helper wrote nothing.
    study_best = max((t for t in result.trials if t.score is not None), key=lambda t: t.score or 0.0)
    assert result.best.score == study_best.score
    assert [p.trial for p in result.published] == [result.best.number]
    model = Variables.get_variable(ctx, "model")
    assert model.version == 2 and model.metadata["optimizer_id"] == "tuner-main"


class _WatchedJournal(optuna.storages.JournalStorage):
    """A journal storage that lists the study through a second reader of its file after each new trial.

    The second reader sees what another process sharing the study sees at that instant.
    """

    def __init__(self, path: str) -> None:
        super().__init__(JournalFileBackend(path))
        self.reader = optuna.storages.JournalStorage(JournalFileBackend(path))
        self.seen: list[dict[int, str]] = []

    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        trials = self.reader.get_all_trials(study_id, deepcopy=False)
        self.seen.append({t.number: str(t.user_attrs.get("optimizer_id", "")) for t in trials})
        return trial_id


def test_a_trial_names_its_runner_from_the_moment_another_process_can_see_it(tmp_path: Path) -> None:
    storage = _WatchedJournal(str(tmp_path / "study.log"))
    tuner = VariableTuner(
        metric, num_trials=6, seed=0, storage=storage, study_name="seen", optimizer_id="tuner-x", progress=False
    )
    with dspy.context(lm=offline_lm(MODELS[0])):
        tuner.compile(program_for(_ctx()), trainset=trainset())
    assert [len(view) for view in storage.seen] == [1, 2, 3, 4, 5, 6]
    assert all(set(view.values()) == {"tuner-x"} for view in storage.seen), storage.seen
    assert tuner.result is not None
    assert [(t.number, t.optimizer_id, t.state) for t in tuner.result.trials] == [
        (n, "tuner-x", "COMPLETE") for n in range(6)
    ]


def test_a_queued_trial_is_run_first_and_named_after_its_runner(tmp_path: Path) -> None:
    storage = journal_storage(str(tmp_path / "study.log"))
    queued = {"temperature": 0.35, "max_tokens": 600, "model": "offline/large"}
    optuna.create_study(storage=storage, study_name="queued", direction="maximize").enqueue_trial(queued)
    tuner = VariableTuner(
        metric, num_trials=3, seed=0, storage=storage, study_name="queued", optimizer_id="tuner-q", progress=False
    )
    with dspy.context(lm=offline_lm(MODELS[0])):
        tuner.compile(program_for(_ctx()), trainset=trainset())
    assert tuner.result is not None
    trials = tuner.result.trials
    assert [(t.number, t.state, t.optimizer_id) for t in trials] == [(n, "COMPLETE", "tuner-q") for n in range(3)]
    assert trials[0].values == queued and trials[0].score == pytest.approx(OPTIMUM)
    assert tuner.result.best is not None and tuner.result.best.number == 0


class _SeeingSampler(optuna.samplers.TPESampler):
    """TPE that records, for each trial, how many completed trials it samples from."""

    def __init__(self) -> None:
        super().__init__(seed=0, n_startup_trials=2)
        self.seen: list[tuple[int, int]] = []

    def sample_relative(self, study: optuna.Study, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        # The same call TPE makes for its history (the study's per-trial cache of the storage).
        done = study._get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,), use_cache=True)
        self.seen.append((trial.number, len(done)))
        return super().sample_relative(study, trial, search_space)


def test_the_sampler_samples_each_trial_from_every_trial_completed_before_it() -> None:
    sampler = _SeeingSampler()
    tuner = VariableTuner(metric, num_trials=6, sampler=sampler, progress=False)
    with dspy.context(lm=offline_lm(MODELS[0])):
        tuner.compile(program_for(_ctx()), trainset=trainset())
    assert sampler.seen == [(n, n) for n in range(6)]


def test_a_worker_process_tunes_the_session_and_publishes(procs: list[Proc]) -> None:
    with Context() as ctx:
        define_task(ctx)
        ctx.ensure_bridged()
        assert ctx.bridge_address is not None
        tuner = Proc(
            "tune", "--address", ctx.bridge_address, "--session", ctx.id, "--optimizer-id", "worker-tuner",
        )  # fmt: skip
        procs.append(tuner)
        assert json.loads(tuner.line()) == {"done": True}
        tuner.finish()
        for var in Variables.list(ctx):
            assert var.version == 2, var
            assert var.source == "worker"
            assert var.metadata["optimizer_id"] == "worker-tuner"
            assert var.optimization_status is None


@pytest.mark.usefixtures("lm")
def test_trial_values_apply_per_call_in_threads_and_async_and_nowhere_else() -> None:
    import asyncio

    from dspex_dspy.modules import get_provenance, trial_values

    ctx = _ctx()
    program = program_for(ctx)
    trial = {"temperature": 0.25, "model": "offline/large"}

    def used(prediction: dspy.Prediction) -> dict[str, tuple[Any, int]]:
        return {attr: (b.value, b.version) for attr, b in get_provenance(prediction).items()}

    expected = {"temperature": (0.25, 0), "model": ("offline/large", 0), "max_tokens": (64, 1)}
    outside: list[dict[str, tuple[Any, int]]] = []
    with trial_values(trial):
        assert used(program(question="q")) == expected
        assert program.get_bound_value("temperature") == 0.25
        parallel = dspy.Parallel(num_threads=3)([(program, {"question": f"q{i}"}) for i in range(6)])
        assert all(used(p) == expected for p in parallel)
        assert used(asyncio.run(program.acall(question="q"))) == expected

        # Another thread that did not enter the block reads the session.
        def elsewhere() -> None:
            with dspy.context(lm=offline_lm(MODELS[0])):
                outside.append(used(program(question="q")))

        other = threading.Thread(target=elsewhere)
        other.start()
        other.join()
    assert outside == [{"temperature": (1.2, 1), "model": ("offline/small", 1), "max_tokens": (64, 1)}]
    assert used(program(question="q")) == outside[0]
    assert _versions(ctx) == {"temperature": 1, "max_tokens": 1, "model": 1}
