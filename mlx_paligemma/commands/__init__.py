"""Command-line front ends that would otherwise share a name with the library function they drive.

`mlx_paligemma.generate` is the library function (in `generation.py`); its command line lives here
as `commands/generate.py`. Were it the module `mlx_paligemma/generate.py`, importing it (as the
`mlx-paligemma` dispatcher does) would replace the package's `generate` function with the module.
"""
