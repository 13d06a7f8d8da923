"""Training (the core of the `trained_model` asset), one module per concern:

- data.py: TrainingData (the split's arrays and targets), load_training_data, the input checks;
- network.py: the timm backbone + task head (build_net), the losses;
- features.py: the linear probe's feature cache and input standardization;
- setup.py: setup_training, what a run and a PBT trial (core/tuned_hyperparams.py) build before epoch 1;
- loop.py: one epoch, validation, optimizer and schedule factories, resumable random state;
- run.py: train_model (resumable, deterministic on the CPU) and TrainResult;
- checkpoint.py: checkpoints named by their sha256, the `models` row, loading and prediction;
- curves.py: the learning curve; distributed.py: DistributedDataParallel ranks.
"""

from emopipe.core.trained_model.checkpoint import (CHECKPOINT_FORMAT, checkpoint_info, experiment_from_dict,
                                                   load_checkpoint, predict, record_model, spec_dict)
from emopipe.core.trained_model.data import Log, TrainingData, TrainingError, check_data, load_training_data
from emopipe.core.trained_model.features import cached_features, extract_features
from emopipe.core.trained_model.loop import evaluate, make_optimizer, train_epoch
from emopipe.core.trained_model.network import build_net, make_head, make_loss
from emopipe.core.trained_model.run import (TrainResult, adopt_tuned_weights, finished_result, run_directory, train_model,
                                           training_hyperparameters)
from emopipe.core.trained_model.setup import Setup, setup_training

__all__ = [
    "CHECKPOINT_FORMAT", "Log", "Setup", "TrainResult", "TrainingData", "TrainingError", "adopt_tuned_weights", "build_net", "cached_features",
    "check_data", "checkpoint_info", "evaluate", "experiment_from_dict", "extract_features", "finished_result",
    "load_checkpoint", "load_training_data", "make_head", "make_loss", "make_optimizer", "predict", "record_model",
    "run_directory", "setup_training", "spec_dict", "train_epoch", "train_model", "training_hyperparameters",
]
