"""scale_common: what both packages share (errors, atomic files, devices, process groups, CLI helpers, the resize).

The layering is one way: ``scale_common`` <- ``cka_scale`` (measure) <- ``msun_builder`` (act). Nothing here imports
either package, and importing this package (or its ``errors`` and ``cli`` modules) does not import torch, so the
command lines answer ``--help`` at once.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
