"""Training harness: jitted NNX train step, orbax checkpoints, metrics."""

from sparsejax.training.checkpoints import CheckpointError
from sparsejax.training.metrics import NonFiniteError
from sparsejax.training.train import evaluate
from sparsejax.training.train import Experiment
from sparsejax.training.train import train_and_evaluate
