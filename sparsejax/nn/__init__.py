"""Flax NNX layers and models for sparse attention."""

from sparsejax.nn import attention_registry
from sparsejax.nn.build import build_model
from sparsejax.nn.build import MODELS
from sparsejax.nn.layers import Attention
from sparsejax.nn.layers import AttentionMask
from sparsejax.nn.layers import RMSNorm
from sparsejax.nn.layers import SwiGLU
from sparsejax.nn.lm import SequenceClassifier
from sparsejax.nn.lm import TransformerLM
from sparsejax.nn.vit import ViT

# The families' layer variants register themselves with attention_registry.
from sparsejax.nn import learned_layers  # noqa: F401
from sparsejax.nn import linear_layers  # noqa: F401
from sparsejax.nn import lowrank_layers  # noqa: F401
from sparsejax.nn import vision_layers  # noqa: F401
