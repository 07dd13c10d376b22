"""Trackers: where metrics and sample answers go while training. A tracker never blocks or crashes
a run: SwanLab uses the cloud only when the user is logged in, otherwise a local run folder its
own dashboard shows (`swanlab watch OUTPUT_DIR/swanlog`), and any tracker failure is a warning."""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from transformers import TrainerCallback

from roletune.config import Config, dump_config, to_dict
from roletune.errors import first_line

log = logging.getLogger(__name__)


class Tracker:
    """The no-op tracker (`train.report_to: none`) and the interface of the others."""
    where: str | None = None

    def callback(self) -> TrainerCallback | None:
        return None

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, rows: list[dict], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class SwanLabTracker(Tracker):
    """A resumed run continues the SwanLab run it started (its id is kept in swanlog/RUN_ID_NAME)."""

    RUN_ID_NAME = "roletune_run_id"

    def __init__(self, cfg: Config, resumed_at: int | None = None, echo=print):
        import swanlab

        self.swanlab = swanlab
        logged_in = swanlab.Settings().api_key is not None
        folder = Path(cfg.output_dir) / "swanlog"
        record = folder / self.RUN_ID_NAME
        earlier = record.read_text(encoding="utf-8").strip() if resumed_at is not None and record.is_file() else None
        try:
            self.run = self._init(cfg, "online" if logged_in else "local", folder, earlier)
        except Exception as exc:  # a cloud outage must not cost the run; fall back to the local dashboard
            if not logged_in:
                raise
            log.warning("SwanLab cloud unavailable (%s); logging locally instead", exc)
            self.run = self._init(cfg, "local", folder, earlier)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(self.run.id, encoding="utf-8")
        self.where = (f"SwanLab cloud, project {cfg.train.project}" if logged_in
                      else f"{folder} (view: swanlab watch {folder})")
        if resumed_at is not None:
            echo(f"tracker: SwanLab run {earlier} continued from step {resumed_at}" if earlier == self.run.id else
                 f"tracker: a new SwanLab run {self.run.id} (the folder kept no earlier run id to continue)")

    def _init(self, cfg: Config, mode: str, folder: Path, earlier: str | None):
        resume = {"id": earlier, "resume": "allow"} if earlier else {}
        return self.swanlab.init(project=cfg.train.project, experiment_name=Path(cfg.output_dir).name, mode=mode,
                                 log_dir=str(folder), config=to_dict(cfg), **resume)

    def callback(self):
        from swanlab.integration.transformers import SwanLabCallback

        # Finds the run started above; logs loss, eval loss, lr, grad norm and Trainer's tokens/s.
        return SwanLabCallback()

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.swanlab.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        self.swanlab.log({f"samples/{i}": self.swanlab.Text(sample_text(row), caption=row["prompt"][:60])
                          for i, row in enumerate(rows)}, step=step)

    def finish(self) -> None:
        # SwanLab repeats its start banner's `swanlab watch` line here; the run's summary names the tracker.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.swanlab.finish()


class TensorBoardTracker(Tracker):
    """A resumed run appends to the same folder, dropping what the first run logged past the checkpoint."""

    def __init__(self, cfg: Config, resumed_at: int | None = None, echo=print):
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(cfg.output_dir) / "tensorboard"
        # Steps past the checkpoint's are logged again by the resumed run: TensorBoard drops the first ones.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=None if resumed_at is None else resumed_at + 1)
        if resumed_at is None:
            self.writer.add_text("config", f"```yaml\n{dump_config(cfg)}```", 0)
        else:
            echo(f"tracker: TensorBoard continues in {folder} from step {resumed_at}")
        self.where = f"{folder} (view: tensorboard --logdir {folder})"

    def callback(self):
        from transformers.integrations import TensorBoardCallback

        return TensorBoardCallback(tb_writer=self.writer)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        self.writer.add_text("samples", "\n\n---\n\n".join(sample_text(row) for row in rows), step)

    def finish(self) -> None:
        self.writer.close()


def open_tracker(cfg: Config, resumed_at: int | None = None, echo=print) -> Tracker:
    """The tracker `train.report_to` names, continuing the run's earlier one when `resumed_at` a checkpoint's
    step; a missing package or a failed start falls back to none."""
    kinds = {"swanlab": SwanLabTracker, "tensorboard": TensorBoardTracker, "none": lambda *_: Tracker()}
    try:
        return kinds[cfg.train.report_to](cfg, resumed_at, echo)
    except Exception as exc:  # trackers are a convenience: the run goes on without one
        log.warning("train.report_to=%s could not start (%s); continuing without a tracker",
                    cfg.train.report_to, first_line(exc))
        return Tracker()


def sample_text(row: dict) -> str:
    return f"prompt: {row['prompt']}\nanswer: {row['answer']}\nreference: {row.get('reference') or '-'}"

