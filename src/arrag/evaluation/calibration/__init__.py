"""Calibration: what a patch database tells a model, measured by held-out likelihood, and DAiD tuned by it.

The kNN-LM protocol for AR-RAG. :func:`calibrate` teacher-forces held-out images, searches the database once per
distinct context, scores the true next token under the model and under every DAiD setting of a (rule, τ, k, λ)
grid plus gated and logistic λ rules, chooses on validation images, reports on test images against content-free
controls, and says plainly when the database does not inform the model.

- :mod:`.heldout`: held-out images, their captions and their validation/test split;
- :mod:`.teacher`: the model's teacher-forced distributions, guided as generation guides them;
- :mod:`.grid`: every grid setting's p_ret(y) from one search, as pure functions;
- :mod:`.retrieval`: the search over the held-out contexts;
- :mod:`.controls`: the content-free distributions retrieval must beat;
- :mod:`.tuning`: choosing settings by validation likelihood (fixed, gated, logistic);
- :mod:`.statistics`: bootstrap intervals over images;
- :mod:`.report`: ``calibration.json`` and the plain-text summary;
- :mod:`.calibrate`: the whole protocol.
"""

from arrag.evaluation.calibration.calibrate import CalibrationConfig, calibrate
from arrag.evaluation.calibration.heldout import HeldOut, as_heldout, world_heldout
from arrag.evaluation.calibration.report import CALIBRATION_FILE, CalibrationReport, render_report, write_report
from arrag.evaluation.calibration.tuning import ControlSetting, DaidSetting

__all__ = [
    "CALIBRATION_FILE",
    "CalibrationConfig",
    "CalibrationReport",
    "ControlSetting",
    "DaidSetting",
    "HeldOut",
    "as_heldout",
    "calibrate",
    "render_report",
    "world_heldout",
    "write_report",
]
