"""Experiment loggers for :class:`mltoolkit.train.Trainer` (rank 0 only):

    CSVLogger(log_dir)          <log_dir>/metrics.csv (a column per key; the header grows when new keys appear)
                                and <log_dir>/hparams.json
    TensorBoardLogger(log_dir)  event files in <log_dir>/tensorboard (torch.utils.tensorboard.SummaryWriter)
    MLflowLogger(log_dir)       a run in the local file store <log_dir>/mlruns (or any tracking_uri)
    WandbLogger(log_dir)        a Weights & Biases run, offline by default, files under <log_dir>/wandb

``Trainer(loggers=("csv", "tensorboard"))`` builds them by name with the Trainer's ``log_dir``. Each has
``log_hparams(dict)``, ``log_metrics(dict, step)`` and ``finalize(status)``; writers are opened on first use, so
building a logger touches nothing on disk. A logger whose library is missing raises ImportError saying what to
install. Non-numeric metric values are skipped by the TensorBoard / MLflow / W&B loggers.
"""
from __future__ import annotations

import csv
import importlib
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any, Optional

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger", "MLflowLogger", "WandbLogger", "LOGGERS", "get_logger"]


def _require(module: str, package: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"install {package} to use loggers={name!r} (pip install {package})") from e


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _scalar(v: Any) -> Optional[float]:
    """A float for numbers and one-element tensors / arrays; None for anything else."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    item = getattr(v, "item", None)
    if item is not None and getattr(v, "numel", getattr(v, "size", lambda: 0))() == 1:
        try:
            return float(item())
        except (TypeError, ValueError):
            return None
    return None


def _plain(v: Any) -> Any:
    """An hparam value as int / float / str / bool (lists, types and objects become their repr)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, type):
        return v.__name__
    s = _scalar(v)
    return s if s is not None else str(v)


class Logger:
    """Base class of the Trainer's loggers."""

    name = "base"

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record the run's configuration (nested dicts are flattened to "a/b" keys)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one row of metrics at optimizer step ``step``."""

    def finalize(self, status: str = "success") -> None:
        """Flush and close; ``status`` is "success" or "failed"."""


# ---- CSV ----------------------------------------------------------------------------------------------------------
class CSVLogger(Logger):
    """Rows in ``<log_dir>/<filename>``: a "step" column then one column per metric key, in order of first
    appearance. Each row is appended and flushed; a row with a key not in the header rewrites the file once with the
    wider header (temp file + os.replace, so a kill leaves either the old or the new file, never half of one); older
    rows get empty cells. A file already there (a resumed run) is appended to. ``hparams.json`` next to it."""

    name = "csv"

    def __init__(self, log_dir: str = "runs", filename: str = "metrics.csv") -> None:
        self.log_dir = os.fspath(log_dir)
        self.path = os.path.join(self.log_dir, filename)
        self._fields: Optional[list[str]] = None

    def _read_header(self) -> list[str]:
        if self._fields is None:
            self._fields = []
            if os.path.exists(self.path):
                with open(self.path, newline="", encoding="utf-8") as f:
                    self._fields = next(csv.reader(f), [])
        return self._fields

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, "hparams.json")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({k: _plain(v) for k, v in _flatten(hparams).items()}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        row = {"step": step}
        for k, v in _flatten(metrics).items():
            if k != "step":
                s = v if isinstance(v, (int, float, str)) else _scalar(v)
                row[k] = s if s is not None else v
        fields = self._read_header()
        new = [k for k in row if k not in fields]
        if new or not fields:
            self._rewrite(fields + new)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self._fields).writerow(row)

    def _rewrite(self, fields: list[str]) -> None:
        rows = []
        if os.path.exists(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        tmp = f"{self.path}.tmp.{os.getpid()}"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._fields = fields


# ---- TensorBoard --------------------------------------------------------------------------------------------------
class TensorBoardLogger(Logger):
    """Scalars (``add_scalar(key, value, step)``) and hparams (the HPARAMS plugin's summaries plus a text table) in
    real TensorBoard event files under ``<log_dir>/<subdir>``; ``tensorboard --logdir <log_dir>`` shows them."""

    name = "tensorboard"

    def __init__(self, log_dir: str = "runs", subdir: str = "tensorboard", **writer_kwargs: Any) -> None:
        _require("tensorboard", "tensorboard", self.name)
        self.log_dir = os.path.join(os.fspath(log_dir), subdir)
        self.writer_kwargs = writer_kwargs
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=self.log_dir, **self.writer_kwargs)
        return self._writer

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hp_summary
        flat = {k: _plain(v) for k, v in _flatten(hparams).items()}
        flat = {k: ("None" if v is None else v) for k, v in flat.items()}
        fw = self.writer._get_file_writer()
        for summary in hp_summary(flat, {}):
            fw.add_summary(summary)
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(flat.items()))
        self.writer.add_text("hparams", "| name | value |\n|---|---|\n" + table)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        for k, v in _flatten(metrics).items():
            s = _scalar(v)
            if s is not None and k not in ("step",):
                self.writer.add_scalar(k, s, step)

    def finalize(self, status: str = "success") -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


# ---- MLflow -------------------------------------------------------------------------------------------------------
class MLflowLogger(Logger):
    """One MLflow run per fit, through ``mlflow.tracking.MlflowClient`` (no global active run is touched). Default
    tracking store: the local file store ``<log_dir>/mlruns``; for a ``file:`` URI this sets
    ``MLFLOW_ALLOW_FILE_STORE=true`` (recent MLflow refuses the file store otherwise). ``run_id`` is set once the
    run exists; read back with ``MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")``."""

    name = "mlflow"

    def __init__(self, log_dir: str = "runs", experiment: str = "mltoolkit", run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, tags: Optional[Mapping[str, str]] = None) -> None:
        _require("mlflow", "mlflow", self.name)
        if tracking_uri is None:
            tracking_uri = "file:" + os.path.abspath(os.path.join(os.fspath(log_dir), "mlruns"))
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.tags = dict(tags or {})
        self.run_id: Optional[str] = None
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            if self.tracking_uri.startswith("file:") or "://" not in self.tracking_uri:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(self.experiment)
            run = self._client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id
        return self._client

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        params = [Param(k, str(_plain(v))[:6000]) for k, v in _flatten(hparams).items()]
        client = self.client
        for i in range(0, len(params), 100):
            client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        rows = []
        for k, v in _flatten(metrics).items():
            s = _scalar(v)
            if s is not None and k != "step" and not math.isnan(s):
                rows.append(Metric(k, s, now, int(step)))
        if rows:
            client = self.client
            for i in range(0, len(rows), 1000):
                client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def finalize(self, status: str = "success") -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, "FINISHED" if status == "success" else "FAILED")


# ---- Weights & Biases ---------------------------------------------------------------------------------------------
class WandbLogger(Logger):
    """A wandb run, ``mode="offline"`` by default (nothing leaves the machine; ``wandb sync <dir>`` uploads later),
    with its files under ``<log_dir>/wandb/offline-run-*``. Extra keyword arguments go to ``wandb.init``."""

    name = "wandb"

    def __init__(self, log_dir: str = "runs", project: str = "mltoolkit", name: Optional[str] = None,
                 mode: str = "offline", **init_kwargs: Any) -> None:
        _require("wandb", "wandb", self.name)
        self.log_dir, self.project, self.run_name, self.mode = os.fspath(log_dir), project, name, mode
        self.init_kwargs = init_kwargs
        self._run: Any = None

    @property
    def run(self) -> Any:
        if self._run is None:
            import wandb
            os.makedirs(self.log_dir, exist_ok=True)
            kwargs = dict(project=self.project, name=self.run_name, dir=self.log_dir, mode=self.mode)
            kwargs.update(self.init_kwargs)
            kwargs.setdefault("reinit", "create_new")
            kwargs.setdefault("settings", wandb.Settings(silent=True, console="off"))
            self._run = wandb.init(**kwargs)
        return self._run

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.run.config.update({k: _plain(v) for k, v in _flatten(hparams).items()}, allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        row = {k: s for k, s in ((k, _scalar(v)) for k, v in _flatten(metrics).items()) if s is not None
               and k != "step"}
        self.run.log(row, step=int(step))

    def finalize(self, status: str = "success") -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if status == "success" else 1)
            self._run = None


LOGGERS: dict[str, type] = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "mlflow": MLflowLogger,
                            "wandb": WandbLogger}


def get_logger(logger: Any, log_dir: str) -> Logger:
    """A Logger from a name in LOGGERS (built with ``log_dir``) or the object itself (anything with log_metrics)."""
    if isinstance(logger, str):
        key = logger.lower()
        if key not in LOGGERS:
            raise ValueError(f"loggers: unknown logger {logger!r}; known: {sorted(LOGGERS)} or Logger objects")
        return LOGGERS[key](log_dir)
    if not callable(getattr(logger, "log_metrics", None)):
        raise TypeError(f"loggers: each logger must be a name {sorted(LOGGERS)} or an object with log_metrics(), "
                        f"got {type(logger).__name__}")
    return logger
