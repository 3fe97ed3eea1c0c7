"""Repair: re-align a backdoored prompt with its reconstructed trigger (pure torch core + thin shells).

``repair_prompt`` fine-tunes only the prompt learner on the user's labelled clean images mixed with the
same images carrying the detector's reconstructed triggers under their true labels.
"""

from scanner.repair.config import MODES, RepairConfig
from scanner.repair.finetune import RepairMeasure, RepairResult, measure, repair_prompt, validate_repair_data

__all__ = ["MODES", "RepairConfig", "RepairMeasure", "RepairResult", "measure", "repair_prompt",
           "validate_repair_data"]
