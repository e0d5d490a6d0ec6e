"""Metric loggers: TensorBoard always (event files in output_dir), Weights & Biases when configured."""

from __future__ import annotations

from typing import Any

from lmforge.config.sections import LoggingSection
from lmforge.errors import LmforgeError


class MetricLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger(MetricLogger):
    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricLogger):
    def __init__(self, settings: LoggingSection, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise LmforgeError("wandb_project is set but wandb is not installed", where="wandb_project", fix="pip install wandb") from exc
        self.run = wandb.init(
            project=settings.wandb_project,
            entity=settings.wandb_entity,
            name=settings.wandb_name,
            id=settings.wandb_run_id,
            mode=settings.wandb_mode,
            config=config,
            resume="allow" if settings.wandb_run_id else None,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def build_loggers(settings: LoggingSection, output_dir: str, config: dict[str, Any]) -> list[MetricLogger]:
    loggers: list[MetricLogger] = [TensorBoardLogger(output_dir)]
    if settings.wandb_project and settings.wandb_mode != "disabled":
        loggers.append(WandbLogger(settings, config))
    return loggers
