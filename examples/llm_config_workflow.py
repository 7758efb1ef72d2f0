"""LLM configuration as typed variables: constrained updates, a rejected value, then a switch.

Defines model/temperature/max_tokens/top_p with constraints, applies three batched updates, shows
that an out-of-range value is rejected without changing anything, then registers a DSPy program:
the context moves to the embedded bridge and the configuration is intact.

Run: ``python examples/llm_config_workflow.py``
"""

from __future__ import annotations

from dspex_dspy import Context, Variables
from dspex_dspy.errors import BatchUpdateError


def main() -> dict[str, object]:
    """Run the workflow and return the final configuration."""
    with Context() as ctx:
        Variables.defvariable(
            ctx,
            "model",
            "string",
            "gpt-3.5-turbo",
            constraints={"enum": ["gpt-3.5-turbo", "gpt-4", "claude-3"]},
            description="LLM model selection",
        )
        Variables.defvariable(
            ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0}, description="Generation randomness"
        )
        Variables.defvariable(
            ctx,
            "max_tokens",
            "integer",
            256,
            constraints={"min": 1, "max": 4096},
            description="Maximum response length",
        )
        Variables.defvariable(
            ctx, "top_p", "float", 1.0, constraints={"min": 0.0, "max": 1.0}, description="Nucleus sampling"
        )

        for update in (
            {"temperature": 0.5, "max_tokens": 512},
            {"model": "gpt-4", "temperature": 0.8},
            {"max_tokens": 1024, "top_p": 0.95},
        ):
            versions = Variables.update_many(ctx, update)
            print(f"applied {update} -> versions {versions}")

        try:
            Variables.update_many(ctx, {"temperature": 3.5, "top_p": 0.5})
        except BatchUpdateError as exc:
            print(f"rejected: {exc}")

        config = Variables.get_many(ctx, ["model", "temperature", "max_tokens", "top_p"])
        print(f"final configuration ({ctx.get_backend().type}): {config}")

        ctx.register_program("llm_program", {"type": "dspy", "requires_python": True})
        after = Variables.get_many(ctx, ["model", "temperature", "max_tokens", "top_p"])
        print(f"after registering a DSPy program ({ctx.get_backend().type} at {ctx.bridge_address}): {after}")
        assert after == config
        return after


if __name__ == "__main__":
    main()
