"""The model: StereoT5 (the LightningModule), its heads, body options and model files."""

from trainer.model.errors import ModelError
from trainer.model.module import Scored, StereoT5

__all__ = ["ModelError", "Scored", "StereoT5"]
