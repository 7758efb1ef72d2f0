"""Binding attributes of DSPy modules to session variables, resolved per call.

A module that mixes in :class:`VariableBindingMixin` keeps a map *attribute -> variable name*.
On every call it reads each bound variable once (value and version, from its
:class:`~dspex_dspy.modules._source.VariableSource`), checks the values, and opens a
:class:`CallScope` for the duration of the call. The scope rides in DSPy's own context
overrides (what ``dspy.context`` writes), so it follows the call into ``dspy.Parallel`` worker
threads and ``dspy.asyncify`` and is private to one thread or task (a variable-aware
``Predict``, which runs no other module, keeps its scope in a context variable of its own). Every predictor of the
module is a :class:`RoutedPredict`; when it runs it hands the scope's values to DSPy through
the per-call channels of ``Predict.forward`` — ``config`` for generation knobs, ``lm`` for a
``model`` binding, ``signature`` for ``instructions``, ``demos`` — and never writes them into
a shared LM, signature, predictor or class. Two threads calling one module therefore cannot see
each other's values, and nothing bound ever lands in an optimizer's traces.

Precedence for one LM request, highest first:

1. what the caller passes for this call: ``config={...}`` keys, ``lm=``, ``signature=``,
   ``demos=`` and, for ``variable_kwargs`` such as ReAct's ``max_iters``, the keyword itself;
2. the bindings of the module being called (an inner variable-aware module's own bindings win
   over those of a module that contains it);
3. the bindings of enclosing variable-aware modules;
4. what the predictor holds: ``Predict(sig, temperature=...)`` config, ``set_lm``, the demos and
   instructions an optimizer wrote;
5. ``dspy.context(lm=...)`` / ``dspy.configure(lm=...)`` and the LM's own kwargs.

So a binding is an explicit decision that wins over what an optimizer wrote while it is bound;
``unbind_variable`` lets the optimizer's demos or instructions apply again.

Saving: DSPy's ``dump_state`` of a plain parent module only visits its *predictors*, so a
variable-aware module nested anywhere (in a ``dspy.Module``, ``dspy.BestOfN``, ``dspy.Refine`` ...)
would lose its bindings. Each routed predictor therefore knows the variable-aware modules it
belongs to and saves their bindings with its own state, keyed by its path inside each of them
(``OWNER_STATE_KEY``); loading gives them back to the same modules of the loaded program.

A search over bound variables (:class:`~dspex_dspy.tune.VariableTuner`) runs its trials inside
:func:`trial_values`: for those calls, the named variables read the trial's values instead of the
session's (provenance version 0), in the calling thread and in the ``dspy.Parallel`` /
``dspy.Evaluate`` threads it starts, while every other caller keeps reading the session.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from typing import Any, ClassVar, NamedTuple

import dspy
from dspy.dsp.utils.settings import thread_local_overrides
from dspy.dsp.utils.utils import dotdict
from dspy.primitives.base_module import BaseModule

from dspex_dspy.display import Provenance, bindings_html, bindings_text
from dspex_dspy.errors import DSPexError, ValidationError, VariableNotFoundError
from dspex_dspy.modules._source import VariableSource
from dspex_dspy.reader import AnyVariableReader
from dspex_dspy.telemetry import active_tracer, atraced, traced

__all__ = [
    "BINDABLE_ATTRIBUTES",
    "OWNER_STATE_KEY",
    "STATE_KEY",
    "BoundValue",
    "CallScope",
    "RoutedPredict",
    "VariableBindingMixin",
    "get_provenance",
    "route_predictors",
    "trial_values",
]

#: The key under which a call's scope rides in DSPy's context overrides.
SCOPE_KEY = "dspex_variable_scope"
#: The key under which a trial's values (variable name -> value) ride in DSPy's context overrides.
TRIAL_KEY = "dspex_trial_values"
#: The key under which ``dump_state`` stores the bindings.
STATE_KEY = "dspex_variable_bindings"
#: The key under which a predictor's state carries the bindings of the modules that own it.
OWNER_STATE_KEY = "dspex_owner_bindings"
_PROVENANCE_ATTR = "_dspex_provenance"


# ---------------------------------------------------------------------------------------------
# Values: what each bindable attribute accepts
# ---------------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reject(attr: str, variable: str, value: Any, expected: str) -> ValidationError:
    return ValidationError(variable, "binding", value, f"{attr} needs {expected}, got {_short(value)}")


def _number(attr: str, variable: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _reject(attr, variable, value, "a number")
    return float(value)


def _integer(attr: str, variable: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _reject(attr, variable, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _reject(attr, variable, value, "an integer")


def _positive_integer(attr: str, variable: str, value: Any) -> int:
    number = _integer(attr, variable, value)
    if number < 1:
        raise _reject(attr, variable, value, "an integer of at least 1")
    return number


def _stop(attr: str, variable: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return list(value)
    raise _reject(attr, variable, value, "a string or a list of strings")


def _model(attr: str, variable: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _reject(attr, variable, value, 'a model name such as "openai/gpt-4o-mini"')
    return value


def _text(attr: str, variable: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _reject(attr, variable, value, "a string")
    return value


def _example(attr: str, variable: str, item: Any) -> Any:
    if isinstance(item, dspy.Example):
        return item
    if isinstance(item, Mapping) and all(isinstance(k, str) for k in item):
        return dspy.Example(**item)
    raise _reject(attr, variable, item, "demos that are objects (field -> value) or dspy.Example")


@functools.lru_cache(maxsize=256)
def _parsed_demos(variable: str, text: str) -> tuple[Any, ...]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _reject("demos", variable, text, f"a JSON list of objects ({exc.msg})") from None
    if not isinstance(items, list):
        raise _reject("demos", variable, text, "a JSON list of objects")
    return tuple(_example("demos", variable, item) for item in items)


def _demos(attr: str, variable: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        # A session variable holds demos as a JSON string; parse each distinct text once.
        return list(_parsed_demos(variable, value))
    if isinstance(value, (list, tuple)):
        return [_example(attr, variable, item) for item in value]
    raise _reject(attr, variable, value, "a list of demos or a JSON string of one")


def _as_is(attr: str, variable: str, value: Any) -> Any:
    return value


_Coerce = Callable[[str, str, Any], Any]

# attribute -> (where the value goes, how it is checked)
_STANDARD: dict[str, tuple[str, _Coerce]] = {
    "temperature": ("config", _number),
    "top_p": ("config", _number),
    "frequency_penalty": ("config", _number),
    "presence_penalty": ("config", _number),
    "max_tokens": ("config", _positive_integer),
    "n": ("config", _positive_integer),
    "seed": ("config", _integer),
    "stop": ("config", _stop),
    "model": ("model", _model),
    "instructions": ("instructions", _text),
    "demos": ("demos", _demos),
}
_KWARG_CHECKS: dict[str, _Coerce] = {"max_iters": _positive_integer}

#: Attributes every variable-aware module can bind (modules add their ``variable_kwargs``).
BINDABLE_ATTRIBUTES: frozenset[str] = frozenset(_STANDARD)


def _target(attr: str) -> tuple[str, _Coerce]:
    found = _STANDARD.get(attr)
    if found is not None:
        return found
    return "kwarg", _KWARG_CHECKS.get(attr, _as_is)


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


class BoundValue(NamedTuple):
    """The value one bound variable had for one call (an immutable record).

    Attributes:
        attribute: the bound attribute (``"temperature"``).
        variable: the session variable it is bound to.
        value: the value read for this call (after checking, e.g. an int for ``max_tokens``).
        version: the variable's version at that read (0 for a trial's value, see :func:`trial_values`).
        applied: False when the caller's own per-call value took precedence (``config=`` key,
            ``lm=``, ``signature=``, ``demos=`` or the keyword itself).
    """

    attribute: str
    variable: str
    value: Any
    version: int
    applied: bool = True


def trial_values(values: Mapping[str, Any]) -> Any:
    """A context manager: variable-aware calls inside it read ``values`` (name -> value) for those variables.

    Nothing is written to the session: other threads and processes keep reading its values. The
    values follow the block into ``dspy.Parallel`` and ``dspy.Evaluate`` threads (they ride in
    DSPy's context overrides, as ``dspy.context`` settings do) and are checked per call like
    session values.

    Example:
        >>> with trial_values({"temperature": 0.2}):                # doctest: +SKIP
        ...     dspy.Evaluate(devset=dev, metric=metric)(program)
    """
    return dspy.context(**{TRIAL_KEY: dict(values)})


def _trial() -> Mapping[str, Any] | None:
    found: Mapping[str, Any] | None = thread_local_overrides.get().get(TRIAL_KEY)
    return found


def get_provenance(prediction: Any) -> dict[str, BoundValue]:
    """Which variable values produced a prediction: attribute -> :class:`BoundValue`.

    Example:
        >>> pred = predictor(question="2 + 2?")                         # doctest: +SKIP
        >>> get_provenance(pred)["temperature"].value                   # doctest: +SKIP
        0.7

    Raises:
        DSPexError: the prediction did not come from a variable-aware module.
    """
    found = getattr(prediction, _PROVENANCE_ATTR, None)
    if found is None:
        raise DSPexError("this prediction was not returned by a variable-aware module, so it carries no provenance")
    return Provenance(found)


class _ProvenanceSlot:
    """Per-module call memory that copies never share.

    ``var`` holds ``last_provenance``, private to each thread and task. ``last`` remembers the
    previous top-level call's readings with the scope built from them: while no bound variable
    changes, the next call reuses that scope (both are immutable once built).
    """

    __slots__ = ("last", "var")

    def __init__(self) -> None:
        self.var: ContextVar[dict[str, BoundValue] | None] = ContextVar("dspex_last_provenance", default=None)
        self.last: tuple[Any, ...] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _ProvenanceSlot:
        return _ProvenanceSlot()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_ProvenanceSlot, ())


# ---------------------------------------------------------------------------------------------
# Choosing the LM for a model binding
# ---------------------------------------------------------------------------------------------


class _LMChoice:
    """An explicit ``lm_map`` (model name -> LM), shared by every copy of a module."""

    __slots__ = ("lm_map",)

    def __init__(self, lm_map: Mapping[str, Any] | None) -> None:
        self.lm_map = dict(lm_map) if lm_map is not None else None

    def __deepcopy__(self, memo: dict[int, Any]) -> _LMChoice:
        return self


_VARIANTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_VARIANTS_LOCK = threading.Lock()


def _lm_variant(base: Any, model: str) -> Any:
    """``base.copy(model=model)``, made once per base LM and model; ``base`` is never changed."""
    if getattr(base, "model", None) == model:
        return base
    try:
        variants = _VARIANTS.get(base)
    except TypeError:  # an unhashable or non-weakrefable LM: no memo, still correct
        return base.copy(model=model)
    if variants is None or model not in variants:
        with _VARIANTS_LOCK:
            variants = _VARIANTS.setdefault(base, {})
            if model not in variants:
                variants[model] = base.copy(model=model)
    return variants[model]


@functools.lru_cache(maxsize=1024)
def _instructed(signature: Any, text: str, anchor: str | None) -> Any:
    """``signature`` with the bound instructions (memoised: ``with_instructions`` costs ~0.2 ms).

    ``anchor`` is the module's task instructions when the predictor's instructions are built
    around them (ReAct's tool list, ProgramOfThought's code steps): the anchor is replaced where
    the instructions start with it, otherwise the bound text is put in front.
    """
    current = signature.instructions
    if not anchor:
        new = text
    elif current.startswith(anchor):
        new = text + current[len(anchor) :]
    else:
        new = f"{text}\n\n{current}"
    return signature if new == current else signature.with_instructions(new)


# ---------------------------------------------------------------------------------------------
# The per-call scope and the predictors that read it
# ---------------------------------------------------------------------------------------------


def _enter(scope: CallScope) -> Any:
    """Open ``scope`` for the current thread or task; returns the token to reset.

    The same as ``dspy.context(dspex_variable_scope=scope)`` without copying every global
    setting into the override (that copy is most of ``dspy.context``'s cost).
    """
    overrides = dotdict(thread_local_overrides.get())
    overrides[SCOPE_KEY] = scope
    return thread_local_overrides.set(overrides)


#: The scope of a leaf variable-aware predictor's own call. A ``Predict`` runs no other module,
#: so its scope needs no trip through DSPy's overrides (that copy is most of the cost of a scope).
_OWN_SCOPE: ContextVar[CallScope | None] = ContextVar("dspex_own_scope", default=None)


def _scope_for(predictor: Any) -> CallScope | None:
    """The scope a predictor runs in: its own call's, else the enclosing module's (if any)."""
    own = _OWN_SCOPE.get()
    if own is not None and own.owner is predictor:
        return own
    return _active_scope()


def _active_scope() -> CallScope | None:
    # DSPy's context overrides (what dspy.context writes); Parallel and asyncify carry them over.
    scope: CallScope | None = thread_local_overrides.get().get(SCOPE_KEY)
    return scope


class CallScope:
    """The values bound for one call of one variable-aware module, merged over enclosing scopes.

    Read-only once built; every predictor that runs inside the call applies it with
    :meth:`route`.
    """

    __slots__ = ("config", "demos", "instructions", "lm_map", "model", "owner", "parent", "values")

    owner: Any
    parent: CallScope | None
    values: dict[str, Any]
    config: dict[str, Any]
    model: str | None
    lm_map: dict[str, Any] | None
    instructions: str | None
    demos: list[Any] | None

    def __init__(
        self,
        owner: Any,
        parent: CallScope | None,
        values: dict[str, Any],
        config: dict[str, Any],
        model: str | None,
        lm_map: dict[str, Any] | None,
        instructions: str | None,
        demos: list[Any] | None,
    ) -> None:
        self.owner = owner
        self.parent = parent
        self.values = values
        if parent is not None:
            config = {**parent.config, **config} if config else parent.config
            if model is None:
                model, lm_map = parent.model, parent.lm_map
            if instructions is None:
                instructions = parent.instructions
            if demos is None:
                demos = parent.demos
        self.config = config
        self.model = model
        self.lm_map = lm_map
        self.instructions = instructions
        self.demos = demos

    def value_for(self, owner: Any, attr: str) -> tuple[bool, Any]:
        """``(True, value)`` when ``owner`` has a scope open in this chain that bound ``attr``."""
        scope: CallScope | None = self
        while scope is not None:
            if scope.owner is owner and attr in scope.values:
                return True, scope.values[attr]
            scope = scope.parent
        return False, None

    def route(self, predictor: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Put the bound values into a predictor call's per-call kwargs; the caller's own win."""
        if self.config:
            given = kwargs.get("config")
            kwargs["config"] = {**self.config, **given} if given else self.config
        if self.model is not None and kwargs.get("lm") is None:
            kwargs["lm"] = self._lm_for(predictor)
        if self.instructions is not None and kwargs.get("signature") is None:
            anchor = getattr(predictor, "_dspex_instructions_anchor", None)
            kwargs["signature"] = _instructed(predictor.signature, self.instructions, anchor)
        if self.demos is not None and "demos" not in kwargs:
            kwargs["demos"] = self.demos
        return kwargs

    def _lm_for(self, predictor: Any) -> Any:
        model = self.model
        assert model is not None
        if self.lm_map is not None:
            return self.lm_map[model]
        base = predictor.lm or dspy.settings.lm
        # Without any LM, DSPy raises its own "No LM is loaded" error.
        return None if base is None else _lm_variant(base, model)


class _Owners:
    """The variable-aware modules a predictor belongs to (innermost first).

    A deep copy keeps only the owners copied along with it (those in ``memo``): copying a whole
    program maps every owner to its copy, copying one predictor alone detaches it.
    """

    __slots__ = ("modules",)

    def __init__(self, modules: Any = ()) -> None:
        self.modules: list[Any] = list(modules)

    def add(self, module: Any) -> None:
        if not any(m is module for m in self.modules):
            self.modules.append(module)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Owners:
        return _Owners(memo[id(m)] for m in self.modules if id(m) in memo)

    def __reduce__(self) -> tuple[Any, tuple[list[Any]]]:
        return (_Owners, (list(self.modules),))


def _path_in(owner: Any, predictor: Any) -> str | None:
    """The name of ``predictor`` among ``owner``'s parameters (None when it is not one of them)."""
    for name, param in owner.named_parameters():
        if param is predictor:
            return str(name)
    return None


def _adopt(module: Any) -> None:
    """Route ``module``'s predictors and record ``module`` as an owner of each (for save/load)."""
    route_predictors(module)
    for _, predictor in module.named_predictors():
        if predictor is not module and isinstance(predictor, RoutedPredict):
            owners: _Owners | None = predictor.__dict__.get("_dspex_owners")
            if owners is None:
                owners = predictor.__dict__["_dspex_owners"] = _Owners()
            owners.add(module)


class RoutedPredict(dspy.Predict):  # type: ignore[misc]
    """A ``dspy.Predict`` that applies the open :class:`CallScope` (if any) to each call.

    Outside a variable-aware call it behaves exactly like ``dspy.Predict``. The predictors inside
    variable-aware modules are made routed (see :func:`route_predictors`).
    """

    #: Task instructions the predictor's own instructions are built around (None: replace all).
    _dspex_instructions_anchor: str | None = None

    def forward(self, **kwargs: Any) -> Any:
        scope = _scope_for(self)
        if scope is not None:
            kwargs = scope.route(self, kwargs)
        return super().forward(**kwargs)

    async def aforward(self, **kwargs: Any) -> Any:
        scope = _scope_for(self)
        if scope is not None:
            kwargs = scope.route(self, kwargs)
        return await super().aforward(**kwargs)

    def __repr__(self) -> str:
        if type(self) is RoutedPredict:
            return f"Predict({self.signature})"
        return str(super().__repr__())

    def dump_state(self, json_mode: bool = True) -> Any:
        """DSPy's state plus the bindings of the variable-aware modules this predictor belongs to."""
        state = super().dump_state(json_mode=json_mode)
        owners: _Owners | None = self.__dict__.get("_dspex_owners")
        if owners is not None:
            owned = {}
            for owner in owners.modules:
                path = _path_in(owner, self)
                if path is not None:
                    owned[path] = owner.get_bindings()
            if owned:
                state[OWNER_STATE_KEY] = owned
        return state

    def load_state(self, state: Mapping[str, Any], **kwargs: Any) -> Any:
        """Load DSPy's state and give the saved bindings back to the modules this predictor belongs to."""
        state = dict(state)
        owned = state.pop(OWNER_STATE_KEY, None)
        result = super().load_state(state, **kwargs)
        if owned is not None:
            if not isinstance(owned, Mapping):
                raise ValidationError("", OWNER_STATE_KEY, owned, "saved owner bindings must be an object")
            owners: _Owners | None = self.__dict__.get("_dspex_owners")
            for owner in owners.modules if owners is not None else ():
                path = _path_in(owner, self)
                if path is not None and path in owned:
                    owner._dspex_restore_bindings(owned[path])
        return result


def route_predictors(module: Any) -> None:
    """Make every plain ``dspy.Predict`` of ``module`` a :class:`RoutedPredict`, in place.

    Only the class changes (signature, demos, config, lm and identity stay); a routed predictor
    outside a variable-aware call behaves like ``dspy.Predict``. Subclasses of ``Predict`` other
    than ``dspy.Predict`` itself are left alone.
    """
    for _, predictor in module.named_predictors():
        if type(predictor) is dspy.Predict:
            predictor.__class__ = RoutedPredict


# ---------------------------------------------------------------------------------------------
# The mixin
# ---------------------------------------------------------------------------------------------


class VariableBindingMixin:
    """Makes a ``dspy.Module`` subclass variable-aware: attributes bound to session variables.

    Put it first among the bases and pass its keywords through ``super().__init__``::

        class Answer(VariableBindingMixin, dspy.Module):
            def __init__(self, session_context=None):
                super().__init__(session_context=session_context)
                self.generate = dspy.ChainOfThought("question -> answer")

            def forward(self, question):
                return self.generate(question=question)

        program = Answer(ctx)
        program.bind_to_variable("temperature", "temperature")
        program.temperature          # the variable's current value

    Bindable attributes: the generation knobs ``temperature``, ``max_tokens``, ``top_p``,
    ``frequency_penalty``, ``presence_penalty``, ``n``, ``stop``, ``seed``; ``model`` (picks
    the LM per call: ``lm_map[name]`` when a map is given, else a memoised
    ``base_lm.copy(model=name)``); ``instructions`` (a string); ``demos`` (a list of objects or
    ``dspy.Example``, or a JSON string of such a list); and the keywords named in the class's
    ``variable_kwargs`` (ReAct's ``max_iters``), passed to ``forward`` unless the caller gives
    them. Values are read once per call and applied to every predictor of the module through
    DSPy's per-call channels; see the module docstring for the precedence rules.

    Class attributes:
        default_variable_bindings: attribute -> variable bound at construction when the session
            has that variable.
        variable_kwargs: extra attributes that are ``forward`` keywords.

    Args (keyword-only, consumed by the mixin):
        session_context: a ``Context``, ``SessionContext`` or ``AsyncSessionContext``; shared by
            copies of the module and never saved. None: set it later with
            :meth:`set_session_context`.
        variable_bindings: attribute -> variable name, bound now (they must exist).
        lm_map: model name -> ``dspy.LM`` used by a ``model`` binding.
        default_bindings: apply ``default_variable_bindings`` (default True).
    """

    default_variable_bindings: ClassVar[Mapping[str, str]] = {}
    variable_kwargs: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        *args: Any,
        session_context: AnyVariableReader | None = None,
        variable_bindings: Mapping[str, str] | None = None,
        lm_map: Mapping[str, Any] | None = None,
        default_bindings: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._dspex_setup(session_context, variable_bindings, lm_map, default_bindings)

    # ------------------------------------------------------------------ setup and state

    def _dspex_setup(
        self,
        session_context: AnyVariableReader | None,
        variable_bindings: Mapping[str, str] | None,
        lm_map: Mapping[str, Any] | None,
        default_bindings: bool,
    ) -> None:
        if isinstance(self, dspy.Predict) and not isinstance(self, RoutedPredict):
            raise TypeError(
                f"{type(self).__name__} mixes VariableBindingMixin into a dspy.Predict that does not read bound "
                "values: derive from dspex_dspy.modules.RoutedPredict (or VariableAwarePredict) instead"
            )
        if lm_map is not None and not all(isinstance(k, str) for k in lm_map):
            raise ValidationError("", "lm_map", lm_map, "lm_map keys must be model names (strings)")
        if variable_bindings is not None and not isinstance(variable_bindings, Mapping):
            raise ValidationError(
                "", "variable_bindings", variable_bindings, "variable_bindings must map attribute -> variable name"
            )
        d = self.__dict__
        d["_dspex_source"] = VariableSource(session_context) if session_context is not None else None
        d["_dspex_bindings"] = {}
        d["_dspex_pending"] = ()
        d["_dspex_use_defaults"] = default_bindings
        d["_dspex_lms"] = _LMChoice(lm_map)
        d["_dspex_slot"] = _ProvenanceSlot()
        d["_dspex_routed"] = False
        explicit = dict(variable_bindings or {})
        if default_bindings:
            self._dspex_apply_defaults(skip=explicit)
        source = d["_dspex_source"]
        for attr, variable in explicit.items():
            if source is not None and source.is_async and source.has(variable) is None:
                # Not checkable without awaiting: bound now, the first read reports a missing variable.
                self._dspex_check_names(attr, variable)
                self._dspex_store(attr, variable)
            else:
                self.bind_to_variable(attr, variable)
        _adopt(self)
        d["_dspex_routed"] = True

    def _dspex_apply_defaults(self, skip: Mapping[str, str]) -> None:
        source: VariableSource | None = self.__dict__.get("_dspex_source")
        if source is None:
            return
        bindings = self.__dict__.get("_dspex_bindings") or {}
        pending = []
        for attr, variable in type(self).default_variable_bindings.items():
            if attr in skip or attr in bindings:
                continue
            known = source.has(variable)
            if known is None:
                pending.append((attr, variable))
            elif known:
                self.bind_to_variable(attr, variable)
        self.__dict__["_dspex_pending"] = tuple(pending)

    async def _dspex_aresolve_pending(self) -> None:
        source: VariableSource | None = self.__dict__.get("_dspex_source")
        pending = self.__dict__.get("_dspex_pending") or ()
        if source is None or not pending:
            return
        for attr, variable in pending:
            if attr not in self.__dict__["_dspex_bindings"] and await source.ahas(variable):
                value, _ = await source.aread(variable)
                _target(attr)[1](attr, variable, value)
                self._dspex_store(attr, variable)
        self.__dict__["_dspex_pending"] = ()

    def _dspex_store(self, attr: str, variable: str | None) -> None:
        # Copy-on-write: a call iterating the old map in another thread never sees it change.
        d = self.__dict__
        bindings = dict(d.get("_dspex_bindings") or {})
        if variable is None:
            bindings.pop(attr, None)
        else:
            bindings[attr] = variable
        d["_dspex_bindings"] = bindings
        d["_dspex_pending"] = tuple(p for p in d.get("_dspex_pending") or () if p[0] != attr)

    def _dspex_check_names(self, attr: str, variable: str) -> None:
        if not isinstance(attr, str) or attr not in self.bindable_attributes():
            allowed = ", ".join(sorted(self.bindable_attributes()))
            raise ValidationError(
                variable if isinstance(variable, str) else "",
                "bindable",
                attr,
                f"{type(self).__name__} cannot bind {attr!r}; bindable attributes: {allowed}",
            )
        if not isinstance(variable, str) or not variable:
            raise ValidationError("", "variable", variable, f"{attr} must be bound to a variable name (a string)")

    def _dspex_require_source(self, what: Any) -> VariableSource:
        source: VariableSource | None = self.__dict__.get("_dspex_source")
        if source is None:
            names = what if isinstance(what, str) else ", ".join(sorted(what))
            raise DSPexError(
                f"{type(self).__name__} has no session context to read {names}: pass session_context= when "
                "creating it, or call set_session_context(ctx) (a loaded or unpickled module has none)"
            )
        return source

    def _dspex_not_found(
        self, attr: str, variable: str, source: VariableSource, *, bound: bool = False
    ) -> VariableNotFoundError:
        error = VariableNotFoundError(variable, source.session_id)
        name = f"{type(self).__name__}.{attr}"
        what = f"{name} is bound to {variable!r}, which no longer exists" if bound else f"cannot bind {name}"
        error.message = f"{what}: {error.message}"
        error.args = (error.message,)
        return error

    # ------------------------------------------------------------------ public API

    @classmethod
    def bindable_attributes(cls) -> frozenset[str]:
        """The attributes this module can bind."""
        return BINDABLE_ATTRIBUTES | cls.variable_kwargs

    def bind_to_variable(self, attr: str, variable: str) -> None:
        """Bind ``attr`` to the session variable ``variable`` (replacing any earlier binding).

        The variable's current value is checked against what ``attr`` needs.

        Raises:
            VariableNotFoundError: the session has no such variable.
            ValidationError: ``attr`` is not bindable, or the value does not fit it.
            AwaitRequiredError: an ``AsyncSessionContext`` must be awaited: use :meth:`abind_to_variable`.
            DSPexError: the module has no session context.
        """
        self._dspex_check_names(attr, variable)
        source = self._dspex_require_source(attr)
        try:
            value, _ = source.read(variable)
        except VariableNotFoundError:
            raise self._dspex_not_found(attr, variable, source) from None
        _target(attr)[1](attr, variable, value)
        self._dspex_store(attr, variable)

    async def abind_to_variable(self, attr: str, variable: str) -> None:
        """Async twin of :meth:`bind_to_variable` (needed with an ``AsyncSessionContext``)."""
        self._dspex_check_names(attr, variable)
        source = self._dspex_require_source(attr)
        try:
            value, _ = await source.aread(variable)
        except VariableNotFoundError:
            raise self._dspex_not_found(attr, variable, source) from None
        _target(attr)[1](attr, variable, value)
        self._dspex_store(attr, variable)
        await self._dspex_aresolve_pending()

    def unbind_variable(self, attr: str) -> None:
        """Remove the binding of ``attr``; does nothing when it is not bound."""
        self._dspex_store(attr, None)

    def get_bindings(self) -> dict[str, str]:
        """A copy of the bindings: attribute -> variable name."""
        return dict(self.__dict__.get("_dspex_bindings") or {})

    # ------------------------------------------------------------------ display

    def bindings_records(self) -> list[dict[str, Any]]:
        """One plain dict per binding: attribute, variable, its current value and version.

        A value that cannot be read now (no session context, an asyncio-only client, a missing
        variable) is reported in ``error`` instead.
        """
        records: list[dict[str, Any]] = []
        source: VariableSource | None = self.__dict__.get("_dspex_source")
        for attr, variable in self.get_bindings().items():
            record: dict[str, Any] = {"attribute": attr, "variable": variable, "value": None, "version": None}
            try:
                if source is None:
                    raise DSPexError("no session context")
                record["value"], record["version"] = source.read(variable)
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            records.append(record)
        return records

    def to_records(self) -> list[dict[str, Any]]:
        """The bindings with their current values (see :meth:`bindings_records`)."""
        return self.bindings_records()

    def __repr__(self) -> str:
        return bindings_text(super().__repr__(), self.bindings_records())

    def _repr_html_(self) -> str:
        return bindings_html(f"{type(self).__name__}: bound variables", self.bindings_records())

    @property
    def session_context(self) -> AnyVariableReader | None:
        """The Context or session client bound values are read from (None when detached)."""
        source: VariableSource | None = self.__dict__.get("_dspex_source")
        if source is None:
            return None
        target: AnyVariableReader = source.target
        return target

    def set_session_context(self, session_context: AnyVariableReader | None) -> None:
        """Read bound variables from ``session_context`` from now on (None detaches).

        Bindings are kept (e.g. those restored by ``load``); default bindings are applied for
        attributes not bound yet when the module was created with ``default_bindings=True``.
        """
        d = self.__dict__
        if "_dspex_bindings" not in d:
            self._dspex_setup(session_context, None, None, True)
            return
        d["_dspex_source"] = VariableSource(session_context) if session_context is not None else None
        if d.get("_dspex_use_defaults", True):
            self._dspex_apply_defaults(skip={})

    def get_bound_value(self, attr: str) -> Any:
        """The current value of the variable ``attr`` is bound to (checked as for a call).

        Inside a call of this module it is the value that call uses.

        Raises:
            KeyError: ``attr`` is not bound.
        """
        bindings = self.__dict__.get("_dspex_bindings") or {}
        if attr not in bindings:
            raise KeyError(f"{type(self).__name__}.{attr} is not bound to a variable")
        scope = _scope_for(self)
        if scope is not None:
            found, value = scope.value_for(self, attr)
            if found:
                return value
        variable = bindings[attr]
        trial = _trial()
        if trial is not None and variable in trial:
            return _target(attr)[1](attr, variable, trial[variable])
        value, _ = self._dspex_require_source(attr).read(variable)
        return _target(attr)[1](attr, variable, value)

    async def aget_bound_value(self, attr: str) -> Any:
        """Async twin of :meth:`get_bound_value`."""
        bindings = self.__dict__.get("_dspex_bindings") or {}
        if attr not in bindings:
            raise KeyError(f"{type(self).__name__}.{attr} is not bound to a variable")
        variable = bindings[attr]
        value, _ = await self._dspex_require_source(attr).aread(variable)
        return _target(attr)[1](attr, variable, value)

    @property
    def last_provenance(self) -> dict[str, BoundValue] | None:
        """What this thread's or task's last call of this module read: attribute -> BoundValue.

        None before the first call. The same mapping rides on the returned prediction
        (:func:`get_provenance`).
        """
        found = self._dspex_provenance_slot().var.get()
        return None if found is None else Provenance(found)

    def _dspex_provenance_slot(self) -> _ProvenanceSlot:
        slot: _ProvenanceSlot | None = self.__dict__.get("_dspex_slot")
        if slot is None:
            slot = self.__dict__.setdefault("_dspex_slot", _ProvenanceSlot())
        return slot

    # ------------------------------------------------------------------ attribute access

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails, so DSPy's own attributes are untouched.
        bindings = self.__dict__.get("_dspex_bindings")
        if bindings and name in bindings:
            return self.get_bound_value(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        bindings = d.get("_dspex_bindings")
        if bindings and name in bindings and name not in d:
            raise AttributeError(
                f"{type(self).__name__}.{name} is bound to the variable {bindings[name]!r}: write the variable, "
                f"or unbind_variable({name!r}) first"
            )
        super().__setattr__(name, value)
        if isinstance(value, (BaseModule, list, tuple, dict)):
            # A new sub-module may hold plain predictors: route and adopt them now (so a save
            # before the first call keeps the bindings), and again before the next call.
            d["_dspex_routed"] = False
            if "_dspex_slot" in d:
                _adopt(self)

    # ------------------------------------------------------------------ calls
    # The call path touches ``self`` as little as possible: every attribute lookup on a DSPy
    # module runs DSPy's Python-level ``__getattribute__``, and this path runs on every call.

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracer = active_tracer()
        if tracer is not None:
            return traced(tracer, self, lambda: self._dspex_call(*args, **kwargs), lambda: self.last_provenance)
        return self._dspex_call(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        tracer = active_tracer()
        if tracer is not None:
            return await atraced(tracer, self, lambda: self._dspex_acall(*args, **kwargs), lambda: self.last_provenance)
        return await self._dspex_acall(*args, **kwargs)

    def _dspex_call(self, *args: Any, **kwargs: Any) -> Any:
        d = self.__dict__
        if d.get("_dspex_pending"):
            self._dspex_apply_defaults(skip={})
        if not d.get("_dspex_routed"):
            _route_once(self, d)
        bindings = d.get("_dspex_bindings")
        if not bindings:
            return _finish(d, super().__call__(*args, **kwargs), {})  # type: ignore[misc]
        scope, provenance = _open_scope(self, d, bindings, _read_all(self, d, bindings), kwargs)
        if isinstance(self, RoutedPredict):
            own = _OWN_SCOPE.set(scope)
            try:
                result = super().__call__(*args, **kwargs)  # type: ignore[misc]
            finally:
                _OWN_SCOPE.reset(own)
        else:
            token = _enter(scope)
            try:
                result = super().__call__(*args, **kwargs)  # type: ignore[misc]
            finally:
                thread_local_overrides.reset(token)
        report = _reporter(d, scope)
        if report is not None:
            _report_call(report, self, provenance)
        return _finish(d, result, provenance)

    async def _dspex_acall(self, *args: Any, **kwargs: Any) -> Any:
        d = self.__dict__
        if d.get("_dspex_pending"):
            await self._dspex_aresolve_pending()
        if not d.get("_dspex_routed"):
            _route_once(self, d)
        bindings = d.get("_dspex_bindings")
        if not bindings:
            return _finish(d, await super().acall(*args, **kwargs), {})  # type: ignore[misc]
        scope, provenance = _open_scope(self, d, bindings, await _aread_all(self, d, bindings), kwargs)
        if isinstance(self, RoutedPredict):
            own = _OWN_SCOPE.set(scope)
            try:
                result = await super().acall(*args, **kwargs)  # type: ignore[misc]
            finally:
                _OWN_SCOPE.reset(own)
        else:
            token = _enter(scope)
            try:
                result = await super().acall(*args, **kwargs)  # type: ignore[misc]
            finally:
                thread_local_overrides.reset(token)
        report = _reporter(d, scope)
        if report is not None:
            _report_call(report, self, provenance)
        return _finish(d, result, provenance)

    # ------------------------------------------------------------------ save / load

    def dump_state(self, json_mode: bool = True) -> Any:
        """DSPy's state plus the bindings (attribute -> variable name); the session is not saved."""
        state = super().dump_state(json_mode=json_mode)  # type: ignore[misc]
        state[STATE_KEY] = self.get_bindings()
        return state

    def load_state(self, state: Mapping[str, Any], **kwargs: Any) -> Any:
        """Load DSPy's state and restore the saved bindings (unchecked until the next call).

        The session is not part of the state: pass one with :meth:`set_session_context`.
        """
        state = dict(state)
        saved = state.pop(STATE_KEY, None)
        result = super().load_state(state, **kwargs)  # type: ignore[misc]
        if saved is not None:
            self._dspex_restore_bindings(saved)
        return result

    def _dspex_restore_bindings(self, saved: Any) -> None:
        """Replace the bindings with saved ones (checked for names; values are read at the next call)."""
        if not isinstance(saved, Mapping):
            raise ValidationError("", STATE_KEY, saved, "saved bindings must be an object")
        if "_dspex_bindings" not in self.__dict__:
            self._dspex_setup(None, None, None, True)
        for attr, variable in saved.items():
            self._dspex_check_names(attr, variable)
        self.__dict__["_dspex_bindings"] = dict(saved)
        self.__dict__["_dspex_pending"] = ()


# ---------------------------------------------------------------------------------------------
# The call path of VariableBindingMixin (module-level: no attribute lookups on the module)
# ---------------------------------------------------------------------------------------------


def _source_of(module: Any, d: dict[str, Any], bindings: dict[str, str]) -> VariableSource:
    source: VariableSource | None = d.get("_dspex_source")
    if source is None:
        source = module._dspex_require_source(bindings)
    return source


def _read_all(module: Any, d: dict[str, Any], bindings: dict[str, str]) -> list[tuple[Any, int]]:
    """``(value, version)`` of every bound variable, in the order of ``bindings``, from one snapshot.

    One snapshot means no write falls between two bindings of one call: an atomic
    ``update_many`` is seen whole or not at all (and an uncached worker makes one round trip).
    """
    source = _source_of(module, d, bindings)
    trial, wanted = _unread(bindings)
    snapshot: dict[str, tuple[Any, int]] = {}
    if wanted:
        try:
            snapshot = source.many_reader(wanted)
        except VariableNotFoundError as exc:
            for attr, variable in bindings.items():
                if variable in wanted and not source.has(variable):
                    raise module._dspex_not_found(attr, variable, source, bound=True) from None
            raise exc from None
    return _readings(bindings, trial, snapshot)


async def _aread_all(module: Any, d: dict[str, Any], bindings: dict[str, str]) -> list[tuple[Any, int]]:
    source = _source_of(module, d, bindings)
    trial, wanted = _unread(bindings)
    snapshot: dict[str, tuple[Any, int]] = {}
    if wanted:
        try:
            snapshot = await source.aread_many(wanted)
        except VariableNotFoundError as exc:
            for attr, variable in bindings.items():
                if variable in wanted and not await source.ahas(variable):
                    raise module._dspex_not_found(attr, variable, source, bound=True) from None
            raise exc from None
    return _readings(bindings, trial, snapshot)


def _unread(bindings: dict[str, str]) -> tuple[Mapping[str, Any] | None, Collection[str]]:
    """The open trial's values (if any) and the bound variables still to read from the session."""
    trial = _trial()
    if trial is None:
        return None, bindings.values()
    return trial, [variable for variable in bindings.values() if variable not in trial]


def _readings(
    bindings: dict[str, str], trial: Mapping[str, Any] | None, snapshot: Mapping[str, tuple[Any, int]]
) -> list[tuple[Any, int]]:
    """``(value, version)`` per binding: the trial's value (version 0) or the session's."""
    if trial is None:
        return [snapshot[variable] for variable in bindings.values()]
    return [(trial[v], 0) if v in trial else snapshot[v] for v in bindings.values()]


def _route_once(module: Any, d: dict[str, Any]) -> None:
    _adopt(module)
    d["_dspex_routed"] = True


def _open_scope(
    module: Any, d: dict[str, Any], bindings: dict[str, str], readings: list[tuple[Any, int]], kwargs: dict[str, Any]
) -> tuple[CallScope, dict[str, BoundValue]]:
    """Check the values read for one call, record their provenance and build the call's scope.

    Values of ``variable_kwargs`` attributes go straight into ``kwargs`` unless the caller gave
    them.
    """
    slot: _ProvenanceSlot = d["_dspex_slot"]
    parent = _active_scope()
    # A top-level call that overrides no per-call channel and reads what the previous one read
    # gets the same scope: no re-checking, no new records.
    reusable = (
        parent is None
        and "config" not in kwargs
        and "lm" not in kwargs
        and "signature" not in kwargs
        and "demos" not in kwargs
    )
    last = slot.last
    if reusable and last is not None and last[0] is bindings and last[1] == readings:
        injected: dict[str, Any] = last[4]
        if not injected or injected.keys().isdisjoint(kwargs):
            kwargs.update(injected)
            if slot.var.get() is not last[3]:
                slot.var.set(last[3])
            return last[2], last[3]
    call_config = kwargs.get("config") or {}
    values: dict[str, Any] = {}
    provenance: dict[str, BoundValue] = {}
    config: dict[str, Any] = {}
    injected = {}
    model = instructions = demos = None
    for (attr, variable), (raw, version) in zip(bindings.items(), readings, strict=True):
        where, check = _STANDARD.get(attr) or _target(attr)
        value = check(attr, variable, raw)
        values[attr] = value
        if where == "config":
            config[attr] = value
            applied = attr not in call_config
        elif where == "model":
            model = value
            applied = kwargs.get("lm") is None
        elif where == "instructions":
            instructions = value
            applied = kwargs.get("signature") is None
        elif where == "demos":
            demos = value
            applied = "demos" not in kwargs
        else:
            applied = attr not in kwargs
            if applied:
                injected[attr] = value
        provenance[attr] = BoundValue(attr, variable, value, version, applied)
    lm_map = d["_dspex_lms"].lm_map
    if model is not None and lm_map is not None and model not in lm_map:
        known = ", ".join(sorted(lm_map)) or "none"
        raise ValidationError(
            provenance["model"].variable, "lm_map", model, f"model {model!r} is not in lm_map (known: {known})"
        )
    kwargs.update(injected)
    scope = CallScope(module, parent, values, config, model, lm_map, instructions, demos)
    if reusable:
        slot.last = (bindings, readings, scope, provenance, injected)
    slot.var.set(provenance)
    return scope, provenance


_MAX_REPORTED_VALUE = 1024  # characters of JSON; a longer value is reported shortened


def _reporter(d: dict[str, Any], scope: CallScope) -> Callable[[Mapping[str, Any]], None] | None:
    """Where a finished call's provenance goes: its client's ``report_call`` for a top-level call."""
    source: VariableSource | None = d.get("_dspex_source")
    if source is None or scope.parent is not None:
        return None
    return source.report


def _json_value(value: Any) -> Any:
    """``value`` if it is short JSON, else a short text of it (a call record travels as JSON)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return _short(value)
    return value if len(text) <= _MAX_REPORTED_VALUE else _short(value)


def _report_call(report: Callable[[Mapping[str, Any]], None], module: Any, provenance: dict[str, BoundValue]) -> None:
    """Hand a finished top-level call's provenance to the worker client that reports calls.

    The client checks, off this thread, which variables are secret (their values are reported
    as ``"<secret>"``, or left out when it cannot tell).
    """
    try:
        report(
            {
                "module": type(module).__name__,
                "at": time.time(),
                "bindings": {
                    attr: {"variable": b.variable, "version": b.version, "value": _json_value(b.value)}
                    for attr, b in provenance.items()
                },
            }
        )
    except Exception:  # reporting never fails a call
        return


def _finish(d: dict[str, Any], result: Any, provenance: dict[str, BoundValue]) -> Any:
    slot = d.get("_dspex_slot")
    if slot is not None and not provenance:
        slot.var.set(provenance)
    if isinstance(result, dspy.Prediction):
        # An underscore attribute is not a field: it never reaches demos, traces or metrics.
        object.__setattr__(result, _PROVENANCE_ATTR, provenance)
    return result
