"""`python -m mlx_paligemma.generate ...`: the same as `mlx-paligemma generate ...` (commands/generate.py).

Only a launcher: the package's `generate` is the library function, and importing a module of that
name would hide it, so the command line lives in `commands/generate.py`.
"""

if __name__ == "__main__":
    from mlx_paligemma.cli import main_entry
    from mlx_paligemma.commands.generate import main

    main_entry(main)
