"""VariableTuner: a DSPy teleprompter that searches a program's bound variables with Optuna.

Each trial asks Optuna (TPE by default) for values of the searched variables, evaluates the
program with those values applied per call (:func:`~dspex_dspy.modules.trial_values`: nothing is
written to the session, so live workers keep serving the published values) through
``dspy.Evaluate``, and tells Optuna the score. While it searches, the tuner holds an optimization
lease on the searched variables (renewed by a heartbeat thread, released on every exit path), so
no one else can change them under it. Publishing writes the winner with one atomic
``update_many`` carrying the tuner's id, the score and the trial number.

Several processes can run trials of one search: give each the same Optuna ``storage`` (e.g.
``optuna.storages.JournalStorage`` on a file or Redis) and ``study_name``; the one with
``publish`` set holds the lease and publishes, the others run with ``publish=None``.
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import dspy
import optuna
from dspy.teleprompt.teleprompt import Teleprompter
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from dspex_dspy.context import Context
from dspex_dspy.errors import DSPexError, ValidationError
from dspex_dspy.leases import DEFAULT_LEASE_SECONDS, HOLDER_METADATA_KEY, OptimizationLease
from dspex_dspy.modules import trial_values
from dspex_dspy.tune._space import bound_variables, build_space, describe
from dspex_dspy.types import Variable
from dspex_dspy.variables import Variables

__all__ = ["Publication", "TrialRecord", "TuningResult", "VariableTuner"]

logger = logging.getLogger(__name__)

_PUBLISH_MODES = ("best", "improvements", None)


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search.

    Attributes:
        number: Optuna's trial number (over every process of a shared study).
        values: variable name -> the value the trial evaluated.
        score: the mean metric over the evaluation set (None when the trial failed or runs).
        duration: seconds the trial took (None while it runs).
        state: ``"COMPLETE"``, ``"FAIL"``, ``"RUNNING"`` ...
        optimizer_id: the tuner that ran it (several share a study on a shared storage).
    """

    number: int
    values: dict[str, Any]
    score: float | None
    duration: float | None
    state: str
    optimizer_id: str = ""


@dataclass(frozen=True)
class Publication:
    """One publication of a winner to the session.

    Attributes:
        trial: the trial whose values were published.
        score: its score.
        versions: variable name -> the version the write created.
    """

    trial: int
    score: float
    versions: dict[str, int]


@dataclass
class TuningResult:
    """What a search found.

    Attributes:
        optimizer_id: the id the tuner held its lease and published under.
        searched: variable name -> the distribution searched (as text).
        skipped: variable name -> why it was not searched.
        trials: every trial of the study, in order.
        best: the best completed trial (None if none completed).
        published: the publications made, in order.
        study: the Optuna study (for its visualisations and analyses).
    """

    optimizer_id: str
    searched: dict[str, str]
    skipped: dict[str, str]
    trials: list[TrialRecord] = field(default_factory=list)
    best: TrialRecord | None = None
    published: list[Publication] = field(default_factory=list)
    study: Any = None

    def trials_dataframe(self) -> Any:
        """A ``pandas.DataFrame``: one row per trial (number, score, duration, state, one column per variable).

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - pandas is part of the dev extra
            raise ImportError("trials_dataframe() needs pandas: pip install pandas") from exc
        rows = [
            {
                "number": t.number,
                "score": t.score,
                "duration_s": t.duration,
                "state": t.state,
                "optimizer_id": t.optimizer_id,
                **t.values,
            }
            for t in self.trials
        ]
        return pd.DataFrame(rows)


class _Session:
    """Leases, records and publication on the tuned program's session (a Context or a worker client)."""

    def __init__(self, target: Any) -> None:
        if not isinstance(target, Context) and (
            not callable(getattr(target, "start_optimization", None))
            or inspect.iscoroutinefunction(getattr(target, "get_variable_record", None))
        ):
            raise DSPexError(
                f"VariableTuner tunes programs bound to a Context or a SessionContext, not {type(target).__name__}"
            )
        self.target = target

    def records(self, names: Sequence[str]) -> dict[str, Variable]:
        if isinstance(self.target, Context):
            return {name: Variables.get_variable(self.target, name) for name in names}
        return {name: self.target.get_variable_record(name) for name in names}

    def start(self, names: Sequence[str], optimizer_id: str, ttl: float) -> OptimizationLease:
        if isinstance(self.target, Context):
            return Variables.start_optimization(self.target, names, optimizer_id, ttl=ttl)
        lease: OptimizationLease = self.target.start_optimization(names, optimizer_id, ttl=ttl)
        return lease

    def stop(self, lease: OptimizationLease) -> None:
        if isinstance(self.target, Context):
            Variables.stop_optimization(self.target, lease)
        else:
            self.target.stop_optimization(lease)

    def publish(self, values: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, int]:
        if isinstance(self.target, Context):
            return Variables.update_many(self.target, values, metadata=metadata)
        versions: dict[str, int] = self.target.set_variables(values, metadata=metadata)
        return versions


class _Heartbeat:
    """Renews a lease every third of its ttl until stopped; remembers a failed renewal."""

    def __init__(self, session: _Session, lease: OptimizationLease) -> None:
        self.session = session
        self.lease = lease
        self.error: DSPexError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dspex-tuner-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lease = self.lease
        while not self._stop.wait(lease.ttl / 3):
            try:
                # A renewal may hand back a new lease id (after the context switched to a bridge).
                self.lease = self.session.start(list(lease.variables), lease.optimizer_id, lease.ttl)
            except DSPexError as exc:
                self.error = exc
                logger.warning("could not renew the lease of %s: %s", lease.optimizer_id, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.lease.ttl))


class VariableTuner(Teleprompter):  # type: ignore[misc]
    """Search the variables bound in a program (their declared constraints are the space) with Optuna.

    Args:
        metric: ``metric(example, prediction, trace=None) -> float | bool``; higher is better.
        num_trials: trials to run (with a shared ``storage``: trials in the whole study).
        seed: seed of the default TPE sampler (ignored when ``sampler`` is given).
        publish: ``"best"`` writes the winner once the search ends; ``"improvements"`` writes
            each new best as it is found; None never writes (and takes no lease).
        num_threads: threads ``dspy.Evaluate`` uses per trial.
        sampler: any Optuna sampler (default ``TPESampler(seed=seed)``).
        storage: an Optuna storage (object or URL) for a study shared by several processes.
        study_name: the shared study's name (needed with ``storage``).
        optimizer_id: the id the lease and publications carry (default ``tuner-<hex>``).
        lease_ttl: seconds the lease lives without a heartbeat (renewed every third of it).
        progress: show a tqdm progress bar.

    Example:
        >>> tuner = VariableTuner(metric, num_trials=30, seed=0)       # doctest: +SKIP
        >>> program = tuner.compile(program, trainset=devset)           # doctest: +SKIP
        >>> tuner.result.best.values                                    # doctest: +SKIP
        {'temperature': 0.31, 'max_tokens': 640, 'model': 'offline/large'}
    """

    def __init__(
        self,
        metric: Callable[..., Any],
        *,
        num_trials: int = 30,
        seed: int | None = None,
        publish: str | None = "best",
        num_threads: int | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        storage: Any = None,
        study_name: str | None = None,
        optimizer_id: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_SECONDS,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not callable(metric):
            raise ValidationError(
                "", "metric", metric, "metric must be callable: metric(example, prediction, trace=None)"
            )
        if isinstance(num_trials, bool) or not isinstance(num_trials, int) or num_trials < 1:
            raise ValidationError("", "num_trials", num_trials, "num_trials must be a positive integer")
        if publish not in _PUBLISH_MODES:
            raise ValidationError("", "publish", publish, "publish must be 'best', 'improvements' or None")
        if storage is not None and not study_name:
            raise ValidationError("", "study_name", study_name, "a shared storage needs a study_name")
        self.metric = metric
        self.num_trials = num_trials
        self.seed = seed
        self.publish = publish
        self.num_threads = num_threads
        self.sampler = sampler
        self.storage = storage
        self.study_name = study_name
        self.optimizer_id = optimizer_id or "tuner-" + secrets.token_hex(6)
        self.lease_ttl = float(lease_ttl)
        self.progress = progress
        self.result: TuningResult | None = None

    # ------------------------------------------------------------------ the search

    def compile(
        self,
        student: Any,
        trainset: Sequence[Any] | None = None,
        *,
        teacher: Any = None,
        valset: Sequence[Any] | None = None,
        space: Mapping[str, Any] | None = None,
    ) -> Any:
        """Search the program's bound variables; return the program (its ``tuning_result`` set).

        Args:
            student: a program whose variable-aware modules bind the variables to search.
            trainset: examples to evaluate on when no ``valset`` is given.
            teacher: unused (accepted for the teleprompter interface).
            valset: examples to evaluate each trial on.
            space: variable name -> None (use its constraints), a list of candidates,
                ``{"low": .., "high": .., "log": bool}`` or an Optuna distribution; only the
                variables named are searched.

        Raises:
            ValidationError: bad arguments, an empty evaluation set or a bad ``space``.
            VariableLockedError: another optimizer holds one of the searched variables.
        """
        devset = list(valset if valset is not None else trainset or [])
        if not devset:
            raise ValidationError("", "trainset", devset, "give a non-empty trainset or valset to evaluate trials on")
        bound, target = bound_variables(student)
        session = _Session(target)
        records = session.records(list(bound))
        searched, skipped = build_space(records, space)
        result = TuningResult(
            self.optimizer_id,
            {name: describe(dist) for name, dist in searched.items()},
            skipped,
        )
        self.result = result
        said = f"{self.optimizer_id} searches " + ", ".join(f"{n} ({d})" for n, d in result.searched.items())
        if skipped:
            said += "; left alone: " + ", ".join(f"{n} ({r})" for n, r in skipped.items())
        logger.info("%s", said)
        if self.progress:
            tqdm.write(said, file=sys.stderr)
        storage = optuna.storages.get_storage(self.storage)
        study = optuna.create_study(
            direction="maximize",
            sampler=self.sampler or optuna.samplers.TPESampler(seed=self.seed),
            storage=storage,
            study_name=self.study_name,
            load_if_exists=self.storage is not None,
        )
        result.study = study
        evaluate = dspy.Evaluate(
            devset=devset,
            metric=self.metric,
            num_threads=self.num_threads,
            display_progress=False,
            provide_traceback=False,
        )
        lease = heartbeat = None
        if self.publish is not None:
            lease = session.start(list(searched), self.optimizer_id, self.lease_ttl)
            heartbeat = _Heartbeat(session, lease)
        try:
            self._search(student, study, storage, searched, evaluate, session, result)
            if self.publish == "best" and result.best is not None:
                self._publish(session, result, result.best.number, result.best.values, result.best.score)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
                lease = heartbeat.lease
            if lease is not None:
                try:
                    session.stop(lease)
                except DSPexError as exc:
                    logger.warning("could not release the lease of %s: %s", self.optimizer_id, exc)
            result.trials = [_record(t) for t in study.get_trials(deepcopy=False)]
            best = _best(study)
            result.best = None if best is None else _record(best)
        student.tuning_result = result
        return student

    def _search(
        self,
        program: Any,
        study: optuna.Study,
        storage: optuna.storages.BaseStorage,
        searched: Mapping[str, BaseDistribution],
        evaluate: Any,
        session: _Session,
        result: TuningResult,
    ) -> None:
        done = len(study.get_trials(deepcopy=False))
        bar = tqdm(
            total=self.num_trials, initial=min(done, self.num_trials), desc="VariableTuner", disable=not self.progress
        )
        best_published = -math.inf
        try:
            study_id = storage.get_study_id_from_name(study.study_name)
            while len(study.get_trials(deepcopy=False)) < self.num_trials:
                trial = self._ask(study, storage, study_id, searched)
                values = dict(trial.params)
                try:
                    with trial_values(values):
                        outcome = evaluate(program)
                except BaseException:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                score = _mean_score(outcome)
                study.tell(trial, score)
                bar.update(1)
                best = _best(study)
                if best is not None:
                    bar.set_postfix(best=f"{best.value:.4g}", trial=best.number)
                    if self.publish == "improvements" and best.value is not None and best.value > best_published:
                        best_published = float(best.value)
                        self._publish(session, result, best.number, _values(best, searched), best_published)
        finally:
            bar.close()
        best = _best(study)
        if best is not None:
            result.best = _record(best, searched)

    def _ask(
        self,
        study: optuna.Study,
        storage: optuna.storages.BaseStorage,
        study_id: int,
        searched: Mapping[str, BaseDistribution],
    ) -> optuna.Trial:
        """A new running trial that carries this tuner's id from the moment it exists.

        ``study.ask()`` followed by ``set_user_attr`` would be two storage writes, and another
        process listing a shared study in between would see a trial with no runner; creating the
        trial from a template with the attribute set is one write. (The study's cache of trials,
        which ``ask()`` would clear for the sampler, is cleared by every ``tell()``.) A trial queued
        with ``study.enqueue_trial`` is taken first, through ``ask()``, and gets its runner then.
        """
        if storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
            queued = study.ask(fixed_distributions=dict(searched))
            queued.set_user_attr(HOLDER_METADATA_KEY, self.optimizer_id)
            return queued
        template = FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={HOLDER_METADATA_KEY: self.optimizer_id},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
        )
        trial = optuna.Trial(study, storage.create_new_trial(study_id, template_trial=template))
        for name, dist in searched.items():
            if isinstance(dist, FloatDistribution):
                trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
            elif isinstance(dist, IntDistribution):
                trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
            elif isinstance(dist, CategoricalDistribution):
                trial.suggest_categorical(name, dist.choices)
            else:  # build_space admits only the three kinds above
                raise TypeError(f"cannot search {name!r} over {dist!r}")
        return trial

    def _publish(
        self, session: _Session, result: TuningResult, trial: int, values: Mapping[str, Any], score: float | None
    ) -> None:
        metadata = {
            HOLDER_METADATA_KEY: self.optimizer_id,
            "score": repr(float(score if score is not None else math.nan)),
            "trial": str(trial),
        }
        versions = session.publish(dict(values), metadata)
        result.published.append(Publication(trial, float(score if score is not None else math.nan), versions))
        logger.info("%s published trial %d (score %s): %s", self.optimizer_id, trial, metadata["score"], dict(values))


def _mean_score(outcome: Any) -> float:
    """The mean metric over an evaluation (full precision; ``EvaluationResult.score`` is rounded)."""
    scores = [float(score) for _, _, score in outcome.results]
    return sum(scores) / len(scores) if scores else 0.0


def _best(study: optuna.Study) -> FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _values(trial: FrozenTrial, searched: Mapping[str, BaseDistribution] | None = None) -> dict[str, Any]:
    return {k: v for k, v in trial.params.items() if searched is None or k in searched}


def _record(trial: FrozenTrial, searched: Mapping[str, BaseDistribution] | None = None) -> TrialRecord:
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    runner = str(trial.user_attrs.get(HOLDER_METADATA_KEY, ""))
    return TrialRecord(trial.number, _values(trial, searched), trial.value, duration, trial.state.name, runner)
