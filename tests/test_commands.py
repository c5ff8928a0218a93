"""One `mlx-paligemma` command with subcommands; `python -m mlx_paligemma` and the old module forms agree."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_paligemma.__main__ import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_the_console_script_is_the_dispatcher():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the package supports 3.10)
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    module, function = re.search(r'^mlx-paligemma\s*=\s*"([\w.]+):(\w+)"', section, re.M).groups()
    assert getattr(importlib.import_module(module), function) is main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name}  " in out or f"  {name} " in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_has_a_main_and_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert f"mlx-paligemma {name}" in capsys.readouterr().out


def test_help_describes_every_subcommand_in_words(capsys):
    main(["--help"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    for name in COMMANDS:
        summary = lines[name].split(None, 1)[1]
        assert "`" not in summary and "python -m" not in summary and len(summary.split()) >= 3, lines[name]
    assert "Fine-tune" in lines["finetune"]


def test_an_unknown_subcommand_is_one_line_and_exit_2(capsys):
    assert main(["genrate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'genrate'" in err[0] and "generate" in err[0]


def test_python_dash_m_forms_run_the_same_commands():
    for args in (["-m", "mlx_paligemma", "quantize", "--help"], ["-m", "mlx_paligemma.quantize", "--help"]):
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "--bits" in out.stdout, out.stderr


def test_running_generate_in_process_keeps_the_library_function():
    """`mlx_paligemma.generate` is a function; a CLI module of that name, once imported, would replace it."""
    import mlx_paligemma
    from mlx_paligemma.generation import generate

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert mlx_paligemma.generate is generate
