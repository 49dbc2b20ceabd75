"""Synthetic plant: assets with hidden machine states, three sensors, injectable faults.

Pure logic (numpy and PIL only): the caller supplies event time.
"""

from streamfuse.sim.faults import FAULT_KINDS, FaultSpec, FaultSpecError, parse_fault
from streamfuse.sim.plant import CLASSES, Plant, PlantConfig, SimulationError

__all__ = [
    "CLASSES",
    "FAULT_KINDS",
    "FaultSpec",
    "FaultSpecError",
    "Plant",
    "PlantConfig",
    "SimulationError",
    "parse_fault",
]
