"""Metric loggers: TensorBoard by default (event files in output_dir; use_tensorboard: false turns it off); Weights & Biases and MLflow when configured.

Every logger receives the same metrics: loss, lr, grad_norm, tokens_per_s, tokens_seen,
peak_memory_mb (every logging_steps) and eval_loss, eval_perplexity (every evaluation).
"""

from __future__ import annotations

from typing import Any

from lmforge.config.sections import LoggingSection
from lmforge.errors import LmforgeError


class MetricLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_model(self, folder: Any, name: str) -> None:
        """Upload a checkpoint or the final output (only trackers that store files do)."""

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
    def __init__(self, settings: LoggingSection, config: dict[str, Any], output_dir: str) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise LmforgeError("wandb_project is set but wandb is not installed", where="wandb_project", fix="pip install wandb") from exc
        try:
            self.run = wandb.init(
                project=settings.wandb_project,
                entity=settings.wandb_entity,
                name=settings.wandb_name,
                id=settings.wandb_run_id,
                mode=settings.wandb_mode,
                config=config,
                dir=output_dir,
                resume="allow" if settings.wandb_run_id else None,
            )
        except (wandb.errors.UsageError, wandb.errors.CommError, wandb.errors.AuthenticationError) as exc:
            # online mode on a machine never logged in, or without the network: W&B's own error, said once
            raise LmforgeError(f"W&B could not start an online run ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                               where="wandb_project", fix="run `wandb login` (or set WANDB_API_KEY) first, or log "
                               "locally with wandb_mode: offline") from exc
        self.wandb = wandb

    def watch(self, model: Any, log: str) -> None:
        """Histograms of gradients / parameters (wandb_watch), every logging step of W&B's own."""
        self.run.watch(model, log=log)

    def log_model(self, folder: Any, name: str) -> None:
        artifact = self.wandb.Artifact(f"{self.run.id}-{name}", type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(MetricLogger):
    def __init__(self, settings: LoggingSection, config: dict[str, Any]) -> None:
        import os

        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise LmforgeError("mlflow_tracking_uri is set but mlflow is not installed", where="mlflow_tracking_uri", fix="pip install mlflow") from exc
        uri = settings.mlflow_tracking_uri or ""
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the plain-folder store in maintenance mode behind this switch; the user asked for it by name.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = settings.mlflow_experiment_name or "lmforge"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=settings.mlflow_run_name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in config.items() if v not in (None, "", [], {})]
        for start in range(0, len(params), 100):  # MLflow's per-call limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class SwanLabLogger(MetricLogger):
    """SwanLab (swanlab_project): its own run, with files under output_dir/swanlog in local and offline modes."""

    def __init__(self, settings: LoggingSection, config: dict[str, Any], output_dir: str) -> None:
        import os

        try:
            import swanlab
        except ImportError as exc:
            raise LmforgeError("swanlab_project is set but swanlab is not installed", where="swanlab_project",
                               fix="pip install swanlab==0.6.4") from exc
        try:
            self.run = swanlab.init(project=settings.swanlab_project, experiment_name=settings.swanlab_experiment_name,
                                    description=settings.swanlab_description, workspace=settings.swanlab_workspace,
                                    mode=settings.swanlab_mode, logdir=os.path.join(output_dir, "swanlog"), config=config)
        except ImportError as exc:  # local mode's dashboard package
            raise LmforgeError(f"swanlab_mode: local needs SwanLab's dashboard ({exc})", where="swanlab_mode",
                               fix="pip install 'swanlab[dashboard]', or swanlab_mode: offline") from exc
        except (swanlab.error.KeyFileError, swanlab.error.APIKeyFormatError) as exc:  # cloud mode, not logged in
            raise LmforgeError(f"{settings.swanlab_mode or 'cloud'} mode needs a SwanLab API key, and none is "
                               "configured here", where="swanlab_mode",
                               fix="run `swanlab login` (or set SWANLAB_API_KEY) first, or log locally with "
                                   "swanlab_mode: offline") from exc
        except swanlab.error.NetworkError as exc:
            raise LmforgeError(f"{settings.swanlab_mode or 'cloud'} mode could not reach SwanLab ({exc})",
                               where="swanlab_mode", fix="check the network, or log locally with swanlab_mode: offline") from exc
        self.swanlab = swanlab

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class OtelLogger(MetricLogger):
    """use_otel_metrics: each metric an OpenTelemetry gauge (``lmforge_<name>``), served at
    http://otel_metrics_host:otel_metrics_port/metrics in Prometheus' text format, as axolotl serves its own."""

    def __init__(self, settings: LoggingSection) -> None:
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.sdk.metrics import MeterProvider
            from prometheus_client import start_http_server
        except ImportError as exc:
            raise LmforgeError("use_otel_metrics is set but OpenTelemetry's Prometheus exporter is not installed",
                               where="use_otel_metrics", fix="pip install opentelemetry-exporter-prometheus") from exc
        self.reader = PrometheusMetricReader()  # registers its collector with prometheus_client's registry
        # This run's own provider, not the process-wide one: nothing global is replaced.
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.meter = self.provider.get_meter("lmforge.training")
        self.gauges: dict[str, Any] = {}
        self.values: dict[str, float] = {}
        try:
            self.server, _ = start_http_server(settings.otel_metrics_port, addr=settings.otel_metrics_host)
        except OSError as exc:
            self.provider.shutdown()  # the reader's shutdown takes its collector out of the registry
            raise LmforgeError(f"cannot serve metrics on {settings.otel_metrics_host}:{settings.otel_metrics_port} ({exc})",
                               where="otel_metrics_port", fix="choose a free port") from exc

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in {**metrics, "step": step}.items():
            if name not in self.gauges:
                self.gauges[name] = self.meter.create_gauge(f"lmforge_{name}", description=f"lmforge training metric {name}")
            self.gauges[name].set(float(value))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.provider.shutdown()  # the reader's shutdown takes its collector out of the registry


def build_loggers(settings: LoggingSection, output_dir: str, config: dict[str, Any], model: Any = None) -> list[MetricLogger]:
    """TensorBoard (unless use_tensorboard: false), W&B and MLflow as configured; W&B watches `model` with wandb_watch."""
    loggers: list[MetricLogger] = [TensorBoardLogger(output_dir)] if settings.use_tensorboard else []
    if settings.wandb_project and settings.wandb_mode != "disabled":
        wandb_logger = WandbLogger(settings, config, output_dir)
        if settings.wandb_watch and model is not None:
            wandb_logger.watch(model, settings.wandb_watch)
        loggers.append(wandb_logger)
    if settings.mlflow_tracking_uri:
        loggers.append(MlflowLogger(settings, config))
    if settings.swanlab_project and settings.swanlab_mode != "disabled":
        loggers.append(SwanLabLogger(settings, config, output_dir))
    if settings.use_otel_metrics:
        loggers.append(OtelLogger(settings))
    return loggers
