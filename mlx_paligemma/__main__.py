"""`mlx-paligemma SUBCOMMAND ...` and `python -m mlx_paligemma SUBCOMMAND ...`: every command-line tool.

Each subcommand is a module with `main(argv: list[str] | None) -> int`, imported only when run,
so `mlx-paligemma doctor` never pays for what `generate` imports. The modules also run on their
own (`python -m mlx_paligemma.generate ...`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# subcommand -> module; a later command is one more line here.
COMMANDS = {
    "demo": "mlx_paligemma.commands.demo",
    "generate": "mlx_paligemma.commands.generate",
    "batch": "mlx_paligemma.commands.batch",
    "quantize": "mlx_paligemma.quantize",
    "doctor": "mlx_paligemma.doctor",
    "finetune": "mlx_paligemma.finetune",
    "server": "mlx_paligemma.server",
}

PROG = "mlx-paligemma"


def _summary(module: str) -> str:
    """A module's one-line description: its docstring's first line without the command's name, which
    comes first (`mlx-paligemma doctor`: what ...) or last (Fine-tune ...: `python -m ...`)."""
    doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()
    first = doc[0] if doc else ""
    head, _, tail = first.partition(": ")
    words = tail if head.startswith("`") else head
    return words.rstrip(".") or first


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} {{{','.join(COMMANDS)}}} ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {_summary(module)}" for name, module in COMMANDS.items()]
    lines += ["", f"Run `{PROG} COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"{PROG}: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
