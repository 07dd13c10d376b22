"""Trackers: where metrics and sample answers go while training. A tracker never blocks or crashes
a run: SwanLab uses the cloud only when the user is logged in, otherwise a local run folder its
own dashboard shows (`swanlab watch OUTPUT_DIR/swanlog`), and any tracker failure is a warning."""
from __future__ import annotations

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
    def __init__(self, cfg: Config):
        import swanlab

        self.swanlab = swanlab
        logged_in = swanlab.Settings().api_key is not None
        folder = Path(cfg.output_dir) / "swanlog"
        try:
            self.run = self._init(cfg, "online" if logged_in else "local", folder)
        except Exception as exc:  # a cloud outage must not cost the run; fall back to the local dashboard
            if not logged_in:
                raise
            log.warning("SwanLab cloud unavailable (%s); logging locally instead", exc)
            self.run = self._init(cfg, "local", folder)
        self.where = (f"SwanLab cloud, project {cfg.train.project}" if logged_in
                      else f"{folder} (view: swanlab watch {folder})")

    def _init(self, cfg: Config, mode: str, folder: Path):
        return self.swanlab.init(project=cfg.train.project, experiment_name=Path(cfg.output_dir).name, mode=mode,
                                 log_dir=str(folder), config=to_dict(cfg))

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
        self.swanlab.finish()


class TensorBoardTracker(Tracker):
    def __init__(self, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(cfg.output_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(folder))
        self.writer.add_text("config", f"```yaml\n{dump_config(cfg)}```", 0)
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


def open_tracker(cfg: Config) -> Tracker:
    """The tracker `train.report_to` names; a missing package or a failed start falls back to none."""
    kinds = {"swanlab": SwanLabTracker, "tensorboard": TensorBoardTracker, "none": lambda cfg: Tracker()}
    try:
        return kinds[cfg.train.report_to](cfg)
    except Exception as exc:  # trackers are a convenience: the run goes on without one
        log.warning("train.report_to=%s could not start (%s); continuing without a tracker",
                    cfg.train.report_to, first_line(exc))
        return Tracker()


def sample_text(row: dict) -> str:
    return f"prompt: {row['prompt']}\nanswer: {row['answer']}\nreference: {row.get('reference') or '-'}"

