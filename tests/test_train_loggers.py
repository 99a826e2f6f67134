"""mltoolkit.train loggers and progress bars: CSV (header that grows, appends across runs), TensorBoard (real event
files read back with tensorboard's EventAccumulator), MLflow (local file store read back with MlflowClient), W&B
(offline run files), a clear error when a library is missing, rank-0-only output, tqdm / rich bars."""
import csv
import glob
import json
import os
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mltoolkit.train import CSVLogger, Logger, MLflowLogger, Trainer
from mltoolkit.train.loggers import TensorBoardLogger, WandbLogger


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(log_dir, loggers, steps=8, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    ds = TensorDataset(x, (x[:, 0] > 0).long())
    kw.setdefault("progress_bar", None)
    if "strategy" not in kw:
        kw.setdefault("device", "cpu")
    tr = Trainer(nn.Linear(6, 2), lambda p: torch.optim.SGD(p, lr=0.1), DataLoader(ds, batch_size=16),
                 eval_loader=DataLoader(ds, batch_size=32), max_steps=steps, log_every=2, loggers=loggers,
                 log_dir=log_dir, hparams={"note": "test", "nested": {"a": 1}}, **kw)
    return tr, tr.fit()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_header_grows_and_appends(tmp_path):
    lg = CSVLogger(tmp_path)
    lg.log_metrics({"a": 1.5}, step=1)
    lg.log_metrics({"a": 2.0, "b": torch.tensor(3.0)}, step=2)
    lg.log_metrics({"b": 4}, step=3)
    rows = read_csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["step", "a", "b"]
    assert rows == [{"step": "1", "a": "1.5", "b": ""}, {"step": "2", "a": "2.0", "b": "3.0"},
                    {"step": "3", "a": "", "b": "4"}]
    again = CSVLogger(tmp_path)  # a resumed run appends, and widens the header once more
    again.log_metrics({"a": 5.0}, step=4)
    again.log_metrics({"c": 6.0}, step=5)
    rows = read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 5 and list(rows[0]) == ["step", "a", "b", "c"] and rows[4]["c"] == "6.0"
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]
    lg.log_hparams({"lr": 0.1, "opt": {"name": "sgd"}, "cls": nn.Linear})
    assert json.load(open(tmp_path / "hparams.json")) == {"lr": 0.1, "opt/name": "sgd", "cls": "Linear"}


def test_csv_through_trainer(tmp_path):
    tr, history = fit(tmp_path, ("csv",))
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [r["step"] for r in history]
    assert float(rows[-1]["eval/loss"]) == pytest.approx(history[-1]["eval/loss"])
    hp = json.load(open(tmp_path / "hparams.json"))
    assert hp["max_steps"] == 8 and hp["optimizer"] == "SGD" and hp["note"] == "test" and hp["nested/a"] == 1


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, history = fit(tmp_path, ("tensorboard",))
    files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "eval/loss", "lr"} <= set(tags["scalars"]) and "hparams/text_summary" in tags["tensors"]
    want = [(r["step"], r["train/loss"]) for r in history if "train/loss" in r]
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6, 8]
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(got, want))


def test_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # recorded: restored after the test
    from mlflow.tracking import MlflowClient
    lg = MLflowLogger(tmp_path, experiment="unit")
    _, history = fit(tmp_path, (lg,))
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert lg.tracking_uri == "file:" + str(tmp_path / "mlruns")
    client = MlflowClient(tracking_uri=lg.tracking_uri)
    run = client.get_run(lg.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["max_steps"] == "8" and run.data.params["nested/a"] == "1"
    hist = client.get_metric_history(lg.run_id, "train/loss")
    want = [(r["step"], r["train/loss"]) for r in history if "train/loss" in r]
    got = sorted((m.step, m.value) for m in hist)
    assert [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want])
    assert [m.step for m in client.get_metric_history(lg.run_id, "eval/loss")] == [4, 8]  # each epoch


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    fit(tmp_path, ("wandb",), steps=4)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "run-*.wandb"))  # the offline run's data file
    assert WandbLogger(tmp_path).mode == "offline"


@pytest.mark.parametrize("name,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_library_clear_error(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ImportError, match=f"install {module} to use loggers='{name}'"):
        Trainer(nn.Linear(2, 2), lambda p: torch.optim.SGD(p, lr=0.1), [(torch.zeros(1, 2), torch.zeros(1).long())],
                max_steps=1, loggers=(name,))


def test_custom_logger_and_rank0_only(tmp_path):
    class Collect(Logger):
        def __init__(self):
            self.rows, self.hp, self.status = [], None, None

        def log_hparams(self, hparams):
            self.hp = dict(hparams)

        def log_metrics(self, metrics, step):
            self.rows.append((step, dict(metrics)))

        def finalize(self, status="success"):
            self.status = status

    lg = Collect()
    _, history = fit(tmp_path, [lg, "csv"])
    assert [s for s, _ in lg.rows] == [r["step"] for r in history] and lg.status == "success"
    assert lg.hp["model"] == "Linear" and lg.hp["precision"] == "fp32"

    from mltoolkit.distributed import SingleProcess

    class Rank1(SingleProcess):
        @property
        def rank(self):
            return 1

    lg2 = Collect()
    fit(tmp_path / "r1", [lg2, "csv", "tensorboard"], strategy=Rank1("cpu"))
    assert lg2.rows == [] and lg2.hp is None and not os.path.exists(tmp_path / "r1")


def test_failed_fit_finalizes_loggers_as_failed(tmp_path):
    from mltoolkit.train import LambdaCallback

    class Collect(Logger):
        status = None

        def finalize(self, status="success"):
            Collect.status = status

    def boom(trainer, step, loss):
        if step == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, [Collect()], callbacks=[LambdaCallback(on_train_batch_end=boom)])
    assert Collect.status == "failed"


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_progress_bars(kind, tmp_path, capsys):
    pytest.importorskip(kind)
    tr, history = fit(tmp_path, (), progress_bar=kind)
    assert tr._bar is None and history  # closed after each epoch
    if kind == "tqdm":
        assert "epoch 0" in capsys.readouterr().err
    auto = Trainer(nn.Linear(2, 2), lambda p: torch.optim.SGD(p, lr=0.1), [(torch.zeros(1, 2),)], max_steps=1)
    assert auto._bar_kind is None  # "auto": stderr is not a terminal under pytest
    tb = TensorBoardLogger(tmp_path / "lazy")
    assert not os.path.exists(tmp_path / "lazy")  # writers open on first use
    tb.finalize()
