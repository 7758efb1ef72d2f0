"""A pipeline whose first stage is local and whose second stage needs Python workers.

Stage 1 preprocesses text on the sub-microsecond local state; registering the Python component
moves the context to the bridge with every value; stage 3 stores results next to the earlier
stages' variables.

Run: ``python examples/multi_stage_pipeline.py``
"""

from __future__ import annotations

from dspex_dspy import Context, Variables


def main() -> list[str]:
    """Run the three stages and return the names of all variables, in creation order."""
    with Context() as ctx:
        Variables.defvariable(ctx, "input_text", "string", "Process this text")
        Variables.defvariable(ctx, "preprocessing_done", "boolean", False)

        text = Variables.get(ctx, "input_text")
        Variables.set(ctx, "input_text", text.upper())
        Variables.set(ctx, "preprocessing_done", True)
        print(f"stage 1 on {ctx.get_backend().type}: {Variables.get(ctx, 'input_text')!r}")

        ctx.register_program("nlp_analyzer", {"type": "python", "requires_python": True, "module": "TextAnalyzer"})
        backend = ctx.get_backend()
        print(f"stage 2 registered a Python component: backend {backend.type}, switches {backend.switches}")

        Variables.defvariable(ctx, "analysis_complete", "boolean", True)
        Variables.defvariable(ctx, "results", "string", f"{len(Variables.get(ctx, 'input_text').split())} words")
        names = [v.name for v in Variables.list(ctx)]
        print(f"stage 3: all variables coexist: {names}")
        return names


if __name__ == "__main__":
    main()
