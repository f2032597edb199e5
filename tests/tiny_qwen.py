"""The tiny Qwen-VL fixtures, under the bare name the tests import (``from tiny_qwen import ...``).

They live in the package (``recipes/dig/rehearsal/tiny_models.py``), where the CPU rehearsal builds its policies
with the same code; this module only re-exports them.
"""

from recipes.dig.rehearsal.tiny_models import *  # noqa: F403
