"""A fit says where it is in the whole run: epoch k/N, seconds per epoch, elapsed and an ETA, after every epoch."""

from __future__ import annotations

import re

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from microbench.progress import FitProgress, format_seconds


def test_every_epoch_logs_its_place_and_the_eta_of_the_whole_fit(tmp_path, caplog):
    progress = FitProgress()
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[progress],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with caplog.at_level("INFO", logger="microbench"):
        trainer.fit(BoringModel())
    assert len(progress.lines) == 3
    pattern = r"epoch (\d)/3 · \d+\.\d s/epoch · elapsed \d+ s · ETA \d+ s"
    assert [int(re.fullmatch(pattern, line).group(1)) for line in progress.lines] == [1, 2, 3]
    assert progress.lines[-1].endswith("ETA 0 s") and progress.lines[0] in caplog.text


def test_durations_read_as_people_say_them():
    assert [format_seconds(s) for s in (0.4, 59, 61, 3599, 3600, 7322)] == [
        "0 s", "59 s", "1 min 01 s", "59 min 59 s", "1 h 00 min", "2 h 02 min"]
