"""``python -m data_prep.render``: generate rendered (Blender) pairs; the tool is ``data_prep.render.generate``."""

import sys

from data_prep.render.generate import main

sys.exit(main())
