"""Hardware profiles and the analytic cost model (latency, memory, energy of a plan)."""

from autocompress.hardware.cost import Cost, CostModel
from autocompress.hardware.profile import HardwareProfile, list_profiles, load_profile, profiles_dir

__all__ = ["Cost", "CostModel", "HardwareProfile", "list_profiles", "load_profile", "profiles_dir"]
