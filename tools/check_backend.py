"""Kept for old instructions: the doctor is `mlx-paligemma doctor` (mlx_paligemma/doctor.py)."""

from mlx_paligemma.doctor import main

if __name__ == "__main__":
    raise SystemExit(main())
