"""``python -m cka_scale``: the ``cka-scale`` command (also what ``torchrun -m cka_scale`` runs)."""

import sys

from cka_scale.cli import main

sys.exit(main())
