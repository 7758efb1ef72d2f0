"""Optional OpenTelemetry spans around calls of variable-aware modules, carrying their provenance.

When ``opentelemetry-api`` is importable **and** an OpenTelemetry SDK has installed a real tracer
provider (``trace.set_tracer_provider(TracerProvider(...))``), each top-level call of a
variable-aware module runs inside a span ``dspex.module <Class>`` whose attributes say which
variable versions the call used: ``dspex.variable.<attribute>.name``, ``...version`` and
``...applied`` (values are not recorded: they may be secret). Nested variable-aware modules make nested spans. Otherwise
nothing is traced and a call pays one provider lookup. No hard dependency: without the package this module is inert.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

try:  # optional dependency
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - the dev extra installs it
    _trace = None  # type: ignore[assignment]

__all__ = ["active_tracer", "atraced", "provenance_attributes", "traced"]

_T = TypeVar("_T")
_cache: tuple[Any, Any] | None = None


def active_tracer() -> Any:
    """The package's tracer when an OpenTelemetry SDK is configured, else None."""
    global _cache
    if _trace is None:
        return None
    provider = _trace.get_tracer_provider()
    if isinstance(provider, (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)):
        return None
    cached = _cache
    if cached is not None and cached[0] is provider:
        return cached[1]
    tracer = provider.get_tracer("dspex_dspy")
    _cache = (provider, tracer)
    return tracer


def provenance_attributes(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    """Span attributes for one call's provenance (attribute -> BoundValue)."""
    attributes: dict[str, Any] = {}
    for attr, bound in (provenance or {}).items():
        attributes[f"dspex.variable.{attr}.name"] = str(bound.variable)
        attributes[f"dspex.variable.{attr}.version"] = int(bound.version)
        attributes[f"dspex.variable.{attr}.applied"] = bool(bound.applied)
    return attributes


def traced(tracer: Any, module: Any, call: Callable[[], _T], provenance: Callable[[], Any]) -> _T:
    """Run ``call()`` in a span for ``module``; ``provenance()`` gives the call's provenance after it."""
    with tracer.start_as_current_span(f"dspex.module {type(module).__name__}") as span:
        span.set_attribute("dspex.module", type(module).__name__)
        result = call()
        span.set_attributes(provenance_attributes(provenance()))
        return result


async def atraced(tracer: Any, module: Any, call: Callable[[], Any], provenance: Callable[[], Any]) -> Any:
    """The asyncio twin of :func:`traced` (``call()`` returns an awaitable)."""
    with tracer.start_as_current_span(f"dspex.module {type(module).__name__}") as span:
        span.set_attribute("dspex.module", type(module).__name__)
        result = await call()
        span.set_attributes(provenance_attributes(provenance()))
        return result
