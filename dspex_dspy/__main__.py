"""``python -m dspex_dspy``: the ``dspex-bridge`` command (serve, ping and the operator subcommands)."""

from __future__ import annotations

import sys

from dspex_dspy.cli import main

if __name__ == "__main__":
    sys.exit(main())
