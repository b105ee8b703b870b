"""Training in the pid, pie and seq layouts, and `pidec compare`.

    from pidec.training import TrainConfig, train, resume
    train(TrainConfig(output="runs/a", train="train.jsonl", size="tiny", tokenizer="byte", steps=100))
    resume("runs/a")

Modules, one job each: `config` (TrainConfig, its checks and CLI declarations), `examples`
(reading and tokenizing the data), `batching` (sampling and token-budget batches), `build`
(tokenizer, model, optimizer, schedule), `run_folder` (config, log, checkpoints, resume),
`processes` (data parallel), `evaluation` (evaluations and the choice of best/), `progress`
(what a run shows), `loop` (the Trainer), `compare` (one run per layout, compared).
"""

from .config import TrainConfig
from .loop import Trainer, TrainingDiverged, resume, train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "resume", "train"]
