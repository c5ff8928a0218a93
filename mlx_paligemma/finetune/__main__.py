"""`python -m mlx_paligemma.finetune`."""

from .cli import main

raise SystemExit(main())
