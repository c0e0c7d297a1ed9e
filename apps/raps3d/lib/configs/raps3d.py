"""The Raps-3D task: one shared model service behind the infer task, the scoring method and the strategy."""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from ..activelearning.uncertain import MostUncertain
from ..infers.raps3d import Raps3DInfer
from ..model_service import ModelService
from ..options import AppOptions
from ..scoring.uncertainty import SCORE_KEY, Raps3DUncertainty

logger = logging.getLogger(__name__)

STRATEGY_NAME = "raps3d_uncertain"


class Raps3DConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        # Cheap: parses options only; the model loads on first use.
        self.options: AppOptions = kwargs.get("options") or AppOptions.from_conf(conf)
        self.labels = list(self.options.labels)
        self.path = [str(self.options.model_path), str(self.options.trained_model_path)]  # base, then fine-tuned
        self.service = ModelService(self.options)

    def infer(self) -> InferTask | dict[str, InferTask]:
        return Raps3DInfer(self.service, self.labels, self.options.result_dir)

    def trainer(self) -> TrainTask | None:
        return None  # the train task is added in main.py's init_trainers

    def strategy(self) -> Strategy | dict[str, Strategy] | None:
        return {STRATEGY_NAME: MostUncertain(self.options.reserve_seconds)}

    def scoring_method(self) -> ScoringMethod | dict[str, ScoringMethod] | None:
        return {SCORE_KEY: Raps3DUncertainty(self.service)}
