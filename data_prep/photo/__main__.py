"""``python -m data_prep.photo``: generate photo (COCO-format) pairs; the tool is ``data_prep.photo.pairs``."""

import sys

from data_prep.photo.pairs import main

sys.exit(main())
