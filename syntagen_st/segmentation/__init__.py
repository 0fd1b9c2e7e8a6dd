"""Segmentation: data, the network, the LightningModule and trainer, evaluation, metrics.

albumentations asks PyPI for a newer version when it is imported (up to 2 s, or a warning
offline): a run must not wait on the network, so the check is turned off here, before any module
of this package imports it, unless the user set the variable.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
