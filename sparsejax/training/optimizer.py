"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import optax


def _is_matrix(params):
  # Decay weight matrices only; norm scales and biases stay undecayed.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_schedule(cfg) -> optax.Schedule:
  """Warmup to `learning_rate`, cosine down to `learning_rate*end_lr_factor`."""
  warmup = max(int(cfg.warmup_steps), 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(int(cfg.decay_steps), warmup + 1),
      end_value=cfg.learning_rate * cfg.end_lr_factor)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Builds the optimizer from `config.optimizer`.

  Fields: learning_rate, warmup_steps, decay_steps, end_lr_factor,
  weight_decay, b1, b2, eps, clip_norm (0 or None: no clipping).
  """
  adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=_is_matrix)
  if not cfg.clip_norm:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
