"""Hardware profiles, the analytic cost model (latency, memory, energy of a plan), the fits that turn a
calibration's timings into a profile, and timing of a model it is given (``measure``). Nothing here builds
a model file or imports the packages that compress, export or run one: ``autocompress.calibration`` builds
the calibration's files and hands their timings to the fits."""

from autocompress.hardware.cost import Cost, CostModel, predict
from autocompress.hardware.measure import Measurement, measure
from autocompress.hardware.profile import HardwareProfile, list_profiles, load_profile, profiles_dir, resolve_name

__all__ = [
    "Cost",
    "CostModel",
    "HardwareProfile",
    "Measurement",
    "list_profiles",
    "load_profile",
    "measure",
    "predict",
    "profiles_dir",
    "resolve_name",
]
