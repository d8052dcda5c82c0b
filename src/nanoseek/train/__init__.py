"""Pretraining: DeepSeek-V3's recipe (AdamW, warmup + cosine/WSD, MTP loss, auxiliary-loss-free
load balancing with a complementary sequence-wise loss) at laptop scale, resumable exactly."""

from .config import TrainConfig
from .trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
