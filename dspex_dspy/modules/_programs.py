"""The variable-aware versions of DSPy's modules, and a registry to create them by name.

Each class is the DSPy module plus :class:`~dspex_dspy.modules.VariableBindingMixin`, and takes
DSPy's own constructor arguments in DSPy's own order (``VariableAwarePredict(sig, callbacks)``,
``VariableAwareChainOfThought(sig, rationale_field)``, ``VariableAwareProgramOfThought(sig,
max_iters)``, ``VariableAwareReAct(sig, tools)``), so it drops into any DSPy call site. The
variable arguments are keyword-only: ``session_context=``, ``variable_bindings=``, ``lm_map=``,
``default_bindings=``. Its default bindings are applied only for the variables the session has:

==========================  ==============================================================
``VariableAwarePredict``    temperature, max_tokens, top_p, frequency_penalty,
                            presence_penalty ← variables of the same names
``VariableAwareChainOfThought``  temperature ← reasoning_temperature,
                            max_tokens ← reasoning_max_tokens
``VariableAwareReAct``      temperature ← react_temperature, max_tokens ← react_max_tokens,
                            max_iters ← max_react_iterations
``VariableAwareProgramOfThought``  temperature ← pot_temperature, max_tokens ← pot_max_tokens
==========================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import dspy
from dspy.primitives.python_interpreter import PythonInterpreter

from dspex_dspy.errors import ValidationError
from dspex_dspy.modules._binding import RoutedPredict, VariableBindingMixin
from dspex_dspy.reader import AnyVariableReader


def _not_a_session(cls: str, slot: str, value: Any) -> None:
    """Reject a session passed where DSPy expects ``slot`` (the old positional form)."""
    if callable(getattr(value, "get_versioned", None)):
        raise TypeError(
            f"{cls}: {slot} got a {type(value).__name__}; session_context is keyword-only, "
            f"as in {cls}(signature, session_context=ctx)"
        )


__all__ = [
    "ModuleVariableResolver",
    "VariableAwareChainOfThought",
    "VariableAwarePredict",
    "VariableAwareProgramOfThought",
    "VariableAwareReAct",
    "create_variable_aware_program",
    "default_resolver",
]


class VariableAwarePredict(VariableBindingMixin, RoutedPredict):
    """``dspy.Predict`` whose settings, model, instructions and demos can be session variables.

    Args:
        signature: the DSPy signature (string or class).
        callbacks: DSPy callbacks, as for ``dspy.Predict(signature, callbacks)``.
        session_context: a ``Context``, ``SessionContext`` or ``AsyncSessionContext`` (keyword-only).
        variable_bindings: attribute -> variable name, bound now.
        lm_map: model name -> ``dspy.LM`` for a ``model`` binding.
        default_bindings: bind the default variables the session has (see the module docstring).
        **config: ``dspy.Predict`` config (``temperature=`` ...); a binding wins over the same
            key here, a per-call ``config=`` wins over a binding.

    Example:
        >>> predictor = VariableAwarePredict("question -> answer", session_context=ctx)  # doctest: +SKIP
        >>> predictor.temperature  # bound by default because ctx has "temperature"      # doctest: +SKIP
        0.7
    """

    default_variable_bindings: ClassVar[Mapping[str, str]] = {
        "temperature": "temperature",
        "max_tokens": "max_tokens",
        "top_p": "top_p",
        "frequency_penalty": "frequency_penalty",
        "presence_penalty": "presence_penalty",
    }

    def __init__(
        self,
        signature: Any,
        callbacks: list[Any] | None = None,
        *,
        session_context: AnyVariableReader | None = None,
        variable_bindings: Mapping[str, str] | None = None,
        lm_map: Mapping[str, Any] | None = None,
        default_bindings: bool = True,
        **config: Any,
    ) -> None:
        _not_a_session(type(self).__name__, "callbacks", callbacks)
        super().__init__(
            signature,
            callbacks,
            session_context=session_context,
            variable_bindings=variable_bindings,
            lm_map=lm_map,
            default_bindings=default_bindings,
            **config,
        )


class VariableAwareChainOfThought(VariableBindingMixin, dspy.ChainOfThought):  # type: ignore[misc]
    """``dspy.ChainOfThought`` with variable bindings, applied to its inner predictor per call.

    Args:
        signature: the DSPy signature.
        rationale_field: as for ``dspy.ChainOfThought`` (positional, as there).
        rationale_field_type: as for ``dspy.ChainOfThought``.
        session_context: as for :class:`VariableAwarePredict` (keyword-only).
        variable_bindings: as for :class:`VariableAwarePredict`.
        lm_map: as for :class:`VariableAwarePredict`.
        default_bindings: as for :class:`VariableAwarePredict`.
        **config: ``dspy.ChainOfThought`` config.
    """

    default_variable_bindings: ClassVar[Mapping[str, str]] = {
        "temperature": "reasoning_temperature",
        "max_tokens": "reasoning_max_tokens",
    }

    def __init__(
        self,
        signature: Any,
        rationale_field: Any = None,
        rationale_field_type: type = str,
        *,
        session_context: AnyVariableReader | None = None,
        variable_bindings: Mapping[str, str] | None = None,
        lm_map: Mapping[str, Any] | None = None,
        default_bindings: bool = True,
        **config: Any,
    ) -> None:
        _not_a_session(type(self).__name__, "rationale_field", rationale_field)
        super().__init__(
            signature,
            rationale_field,
            rationale_field_type,
            session_context=session_context,
            variable_bindings=variable_bindings,
            lm_map=lm_map,
            default_bindings=default_bindings,
            **config,
        )


class VariableAwareReAct(VariableBindingMixin, dspy.ReAct):  # type: ignore[misc]
    """``dspy.ReAct`` with variable bindings, including ``max_iters``.

    Bound settings reach both inner predictors (the agent step and the final extraction). An
    ``instructions`` binding replaces the task instructions at the head of the agent's
    instructions and keeps the tool list DSPy adds after them.

    Args:
        signature: the DSPy signature.
        tools: the tools (functions or ``dspy.Tool``), positional or keyword as in ``dspy.ReAct``.
        max_iters: the iteration limit used while ``max_iters`` is not bound.
        session_context: as for :class:`VariableAwarePredict` (keyword-only).
        variable_bindings: as for :class:`VariableAwarePredict`.
        lm_map: as for :class:`VariableAwarePredict`.
        default_bindings: as for :class:`VariableAwarePredict`.
    """

    default_variable_bindings: ClassVar[Mapping[str, str]] = {
        "temperature": "react_temperature",
        "max_tokens": "react_max_tokens",
        "max_iters": "max_react_iterations",
    }
    variable_kwargs: ClassVar[frozenset[str]] = frozenset({"max_iters"})

    def __init__(
        self,
        signature: Any,
        tools: list[Callable[..., Any]],
        max_iters: int = 20,
        *,
        session_context: AnyVariableReader | None = None,
        variable_bindings: Mapping[str, str] | None = None,
        lm_map: Mapping[str, Any] | None = None,
        default_bindings: bool = True,
    ) -> None:
        _not_a_session(type(self).__name__, "tools", tools)
        super().__init__(
            signature,
            tools,
            max_iters,
            session_context=session_context,
            variable_bindings=variable_bindings,
            lm_map=lm_map,
            default_bindings=default_bindings,
        )
        self.react._dspex_instructions_anchor = self.signature.instructions

    @property
    def max_iters(self) -> int:
        """The bound ``max_react_iterations`` value while bound, else the constructor's value."""
        if "max_iters" in (self.__dict__.get("_dspex_bindings") or {}):
            value: int = self.get_bound_value("max_iters")
            return value
        static: int = self.__dict__.get("_dspex_static_max_iters", 20)
        return static

    @max_iters.setter
    def max_iters(self, value: int) -> None:
        self.__dict__["_dspex_static_max_iters"] = value


class VariableAwareProgramOfThought(VariableBindingMixin, dspy.ProgramOfThought):  # type: ignore[misc]
    """``dspy.ProgramOfThought`` with variable bindings, applied to its three code steps.

    DSPy 3.4 deprecates ``ProgramOfThought`` (it warns on construction) and runs it with a code
    interpreter (Deno by default; ``interpreter_factory=dspy.LocalInterpreter`` runs CPython). An
    ``instructions`` binding is put in front of each step's generated instructions, which DSPy
    builds from the field names. ``ProgramOfThought`` has no ``aforward``, so no ``acall``.

    Args:
        signature: the DSPy signature.
        max_iters: as for ``dspy.ProgramOfThought`` (positional, as there).
        interpreter_factory: as for ``dspy.ProgramOfThought``.
        session_context: as for :class:`VariableAwarePredict` (keyword-only).
        variable_bindings: as for :class:`VariableAwarePredict`.
        lm_map: as for :class:`VariableAwarePredict`.
        default_bindings: as for :class:`VariableAwarePredict`.
    """

    default_variable_bindings: ClassVar[Mapping[str, str]] = {
        "temperature": "pot_temperature",
        "max_tokens": "pot_max_tokens",
    }

    def __init__(
        self,
        signature: Any,
        max_iters: int = 3,
        interpreter_factory: Callable[[], Any] = PythonInterpreter,
        *,
        session_context: AnyVariableReader | None = None,
        variable_bindings: Mapping[str, str] | None = None,
        lm_map: Mapping[str, Any] | None = None,
        default_bindings: bool = True,
    ) -> None:
        _not_a_session(type(self).__name__, "max_iters", max_iters)
        super().__init__(
            signature,
            max_iters,
            interpreter_factory,
            session_context=session_context,
            variable_bindings=variable_bindings,
            lm_map=lm_map,
            default_bindings=default_bindings,
        )
        for step in (self.code_generate, self.code_regenerate, self.generate_output):
            step.predict._dspex_instructions_anchor = self.signature.instructions


def _key(name: str) -> str:
    return name.replace("_", "").replace("-", "").replace(" ", "").lower()


class ModuleVariableResolver:
    """Names -> variable-aware module classes; new names and classes can be registered.

    Names are matched ignoring case, ``_`` and ``-``. The built-ins answer to
    ``"Predict"``, ``"ChainOfThought"``/``"CoT"``, ``"ReAct"``, ``"ProgramOfThought"``/``"PoT"``
    and to their class names (``"VariableAwarePredict"`` ...).

    Example:
        >>> resolver = ModuleVariableResolver()
        >>> resolver.resolve("chain_of_thought").__name__
        'VariableAwareChainOfThought'
    """

    _BUILTINS: ClassVar[dict[str, type]] = {
        "Predict": VariableAwarePredict,
        "ChainOfThought": VariableAwareChainOfThought,
        "CoT": VariableAwareChainOfThought,
        "ReAct": VariableAwareReAct,
        "ProgramOfThought": VariableAwareProgramOfThought,
        "PoT": VariableAwareProgramOfThought,
    }

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}
        for name, cls in self._BUILTINS.items():
            self.register(name, cls)

    def register(self, name: str, cls: type, *, replace: bool = False) -> None:
        """Register ``cls`` under ``name`` (and under its class name).

        Raises:
            TypeError: ``cls`` is not a variable-aware ``dspy.Module`` class.
            ValidationError: the name is empty or taken (pass ``replace=True`` to re-register).
        """
        if not (isinstance(cls, type) and issubclass(cls, VariableBindingMixin) and issubclass(cls, dspy.Module)):
            raise TypeError(f"{cls!r} must be a dspy.Module class that mixes in VariableBindingMixin")
        if not isinstance(name, str) or not _key(name):
            raise ValidationError("", "module_type", name, "a module type name must be a non-empty string")
        for alias in {_key(name), _key(cls.__name__)}:
            taken = self._classes.get(alias)
            if taken is not None and taken is not cls and not replace:
                raise ValidationError(
                    "", "module_type", name, f"{name!r} is already registered for {taken.__name__} (use replace=True)"
                )
        self._classes[_key(name)] = cls
        self._classes.setdefault(_key(cls.__name__), cls)

    def resolve(self, name: str | type) -> type:
        """The class registered under ``name``; a variable-aware class is returned as is.

        Raises:
            ValidationError: nothing is registered under ``name``.
        """
        if isinstance(name, type) and issubclass(name, VariableBindingMixin):
            return name
        found = self._classes.get(_key(name)) if isinstance(name, str) else None
        if found is None:
            known = ", ".join(sorted({c.__name__ for c in self._classes.values()}))
            raise ValidationError("", "module_type", name, f"unknown module type {name!r} (registered: {known})")
        return found

    def names(self) -> list[str]:
        """The registered (normalised) names."""
        return sorted(self._classes)


#: The resolver :func:`create_variable_aware_program` uses unless given another.
default_resolver = ModuleVariableResolver()


def create_variable_aware_program(
    module_type: str | type,
    signature: Any,
    session_context: AnyVariableReader,
    variable_bindings: Mapping[str, str] | None = None,
    *,
    resolver: ModuleVariableResolver | None = None,
    **kwargs: Any,
) -> Any:
    """Create a variable-aware module by type name.

    Args:
        module_type: a registered name (``"Predict"``, ``"ChainOfThought"``, ``"ReAct"``,
            ``"ProgramOfThought"`` ...) or a variable-aware class.
        signature: the DSPy signature.
        session_context: where bound variables are read.
        variable_bindings: attribute -> variable name, bound now.
        resolver: the registry to look the name up in (default: :data:`default_resolver`).
        **kwargs: the class's other arguments (``tools=`` for ReAct, ``lm_map=``, DSPy config).

    Example:
        >>> program = create_variable_aware_program(                      # doctest: +SKIP
        ...     "ChainOfThought", "question -> answer", ctx, {"temperature": "creative_temperature"})
    """
    cls = (resolver or default_resolver).resolve(module_type)
    return cls(signature, session_context=session_context, variable_bindings=variable_bindings, **kwargs)
