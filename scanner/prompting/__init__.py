"""Prompt learning on a frozen CLIP: learners (CoOp, CoOp-CSC, CoCoOp), the classifier, few-shot
training and checkpoint formats (CoOp/Dassl, read safely; the project's safetensors)."""

from scanner.prompting.checkpoints import (
    PromptCheckpoint,
    find_checkpoint,
    learner_from_state,
    load_checkpoint,
    save_dassl,
    save_safetensors,
)
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.classnames import decode_classnames
from scanner.prompting.learners import (
    LEARNER_TYPES,
    CoCoOpLearner,
    CoOpLearner,
    PromptLearner,
    learner_from_config,
)
from scanner.prompting.train import TrainConfig, TrainRecord, train_prompt

__all__ = [
    "LEARNER_TYPES",
    "CoCoOpLearner",
    "CoOpLearner",
    "PromptCheckpoint",
    "PromptLearner",
    "PromptedCLIP",
    "TrainConfig",
    "TrainRecord",
    "decode_classnames",
    "find_checkpoint",
    "learner_from_config",
    "learner_from_state",
    "load_checkpoint",
    "save_dassl",
    "save_safetensors",
    "train_prompt",
]
