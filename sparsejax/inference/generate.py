"""Generation with the NNX LM and a decode method chosen by name.

  gen = Generator(model, "quest", batch=8, max_len=32768, token_budget=2048)
  tokens = gen.generate(prompts, lengths, max_new_tokens=64)   # greedy

The prompt is prefilled in one forward (each layer's attention through
`sj.attention` with the method's prefill mask: causal, or MoA's spans),
which writes every layer's cache; then each new token runs the layers one
by one: project, append its K/V, `method.attend`. Prompts are right-padded
[B, L] with ragged `lengths`. Methods that learn from data (Double
Sparsity's channels, MoA's spans) need `Generator(..., calib_tokens=...)`
or an already calibrated method.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax.inference import lm_decode
from sparsejax.inference import methods as methods_lib


def _prefill(graphdef, method, state, masks, caches, tokens, lengths):
  model = nnx.merge(graphdef, state)
  new = list(caches)

  def attend(i, q, k, v):
    new[i] = new[i].prefill(k, v, lengths)
    return sj.attention(q, k, v, masks[i], impl=model.blocks[i].attn.impl)

  x = lm_decode.forward(model, tokens, attend)
  last = x[jnp.arange(tokens.shape[0]), jnp.maximum(lengths - 1, 0)]
  return lm_decode.logits(model, last), new


def _step(graphdef, method, state, caches, tokens):
  """tokens [B] at positions lengths -> (logits [B, V], caches)."""
  model = nnx.merge(graphdef, state)
  pos = caches[0].lengths
  x = model.embed(tokens[:, None]).astype(model.dtype)
  carry = method.init_state()
  new = []
  for i, block in enumerate(model.blocks):
    q, k, v = lm_decode.project(block.attn, block.attn_norm(x), pos[:, None])
    cache = caches[i].append(k[:, 0], v[:, 0])
    o, carry = method.attend(i, q[:, 0], cache, carry)
    new.append(cache)
    x = x + lm_decode.output(block.attn, o[:, None])
    x = x + block.mlp(block.mlp_norm(x))
  return lm_decode.logits(model, x[:, 0]), new


class Generator:
  """Prefill + decode steps of `model` with one decode method (jitted).

  Args:
    model: a `sparsejax.nn.TransformerLM` whose layers are softmax
      attention (`layers.Attention`); its parameters are used as they are.
    method: a registered method name (`methods.method_names()`) or a
      `methods.DecodeMethod`.
    batch, max_len: the caches' shape (max_len: prompt plus new tokens).
    calib_tokens: int [B', L'] calibration tokens, for methods that learn
      (Double Sparsity's channels, MoA's spans); ignored by the others.
    calib_loss_mask: float [B', L' - 1] over calib_tokens[:, 1:]: the
      tokens whose loss MoA profiles (the answers; None: all).
    **options: the method's options when `method` is a name.
  """

  def __init__(self, model, method: Union[str, methods_lib.DecodeMethod], *,
               batch: int, max_len: int, calib_tokens=None,
               calib_loss_mask=None, **options):
    lm_decode.check_model(model)
    if isinstance(method, str):
      method = methods_lib.get_method(method, **options)
    elif options:
      raise ValueError("options are for a method given by name")
    if calib_tokens is not None:
      method = method.calibrate(model, calib_tokens, calib_loss_mask)
    elif calib_loss_mask is not None:
      raise ValueError("calib_loss_mask needs calib_tokens")
    self.method, self.batch, self.max_len = method, int(batch), int(max_len)
    self._compiled = None
    self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = (
        lm_decode.dims(model))
    self.dtype = model.dtype
    self.graphdef, self.state = nnx.split(model)
    self._prefill = jax.jit(functools.partial(_prefill, self.graphdef,
                                              method))
    self._step = jax.jit(functools.partial(_step, self.graphdef, method),
                         donate_argnums=(1,))

  def set_model(self, model) -> None:
    """Use `model`'s parameters (same structure, e.g. after training): a
    compiled prefill and step keep working."""
    graphdef, self.state = nnx.split(model)
    if graphdef != self.graphdef:
      raise ValueError("set_model needs a model of the same structure")

  def submit_compiles(self, compiler, prompt_len: int, key) -> None:
    """Compiles prefill (prompts padded to prompt_len) and the step in
    `compiler`'s background threads (an `aot.Compiler`); this Generator
    then uses the executables."""
    spec = lambda t: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    caches = jax.eval_shape(self.empty_caches)
    state = spec(self.state)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    compiler.submit((key, "prefill"), self._prefill, state,
                    self.masks(prompt_len), caches, ints(self.batch,
                                                         prompt_len),
                    ints(self.batch))
    compiler.submit((key, "step"), self._step, state, caches,
                    ints(self.batch))
    self._compiled = (compiler, key)
  def empty_caches(self):
    return [self.method.make_cache(i, self.batch, self.max_len,
                                   self.num_kv_heads, self.head_dim,
                                   self.dtype)
            for i in range(self.num_layers)]

  @functools.lru_cache(maxsize=8)
  def masks(self, seq_len: int):
    """Prefill BlockMasks per layer for prompts padded to seq_len."""
    return [self.method.prefill_mask(i, seq_len, self.num_heads,
                                     self.num_kv_heads, self.max_len)
            for i in range(self.num_layers)]

  def prefill(self, prompts, lengths):
    """prompts int32 [B, L] (right-padded), lengths [B] -> (logits at each
    last prompt token [B, V], caches)."""
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2 or prompts.shape[0] != self.batch:
      raise ValueError(f"prompts must be [batch={self.batch}, L], got "
                       f"{prompts.shape}")
    if prompts.shape[1] > self.max_len:
      raise ValueError(f"prompt length {prompts.shape[1]} exceeds max_len "
                       f"{self.max_len}")
    lengths = jnp.asarray(lengths, jnp.int32)
    lens = np.asarray(lengths)
    if lens.shape != (self.batch,) or (lens < 1).any() or (
        lens > prompts.shape[1]).any():
      raise ValueError(f"lengths must be [batch={self.batch}] ints in [1, "
                       f"{prompts.shape[1]}], got {lens}")
    return self._fn("prefill")(self.state, self.masks(prompts.shape[1]),
                               self.empty_caches(), prompts, lengths)

  def step(self, caches, tokens):
    """One new token per sequence, int32 [B] -> (logits [B, V], caches)."""
    return self._fn("step")(self.state, caches,
                            jnp.asarray(tokens, jnp.int32))

  def _fn(self, which):
    if self._compiled is not None:
      compiler, key = self._compiled
      return compiler.get((key, which))
    return self._prefill if which == "prefill" else self._step

  def generate(self, prompts, lengths, *, max_new_tokens: int):
    """Greedy continuation: int32 [B, max_new_tokens]."""
    logits, caches = self.prefill(prompts, lengths)
    out = []
    for _ in range(max_new_tokens):
      token = logits.argmax(-1).astype(jnp.int32)
      out.append(token)
      logits, caches = self.step(caches, token)
    caches[0].raise_if_overflowed()
    return jnp.stack(out, 1)

  def decode_nll(self, inputs, targets, lengths, *, num_steps: int,
                 pad_to: Optional[int] = None):
    """Teacher-forced decode of each row's last num_steps tokens.

    inputs, targets int32 [B, L]; row b is valid up to lengths[b]. Prefills
    inputs[:, :lengths - num_steps] (padded to pad_to), then feeds
    inputs[b, lengths - num_steps + j] one at a time. Returns (nll, argmax)
    [B, num_steps] against targets at those positions: exact match of the
    argmax equals greedy decoding (a later token only counts if the
    earlier ones were right).
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    lengths = np.asarray(lengths)
    start = lengths - num_steps
    width = pad_to or int(start.max())
    prompts = np.zeros((inputs.shape[0], width), np.int32)
    for b in range(inputs.shape[0]):
      prompts[b, :start[b]] = inputs[b, :start[b]]
    _, caches = self.prefill(prompts, start)
    rows = np.arange(inputs.shape[0])
    nll, pred = [], []
    for j in range(num_steps):
      logits, caches = self.step(caches, inputs[rows, start + j])
      # numpy from here: no tracing on this thread while a background
      # compiler may be lowering (see submit_compiles).
      lg = np.asarray(logits, np.float64)
      lg = lg - lg.max(-1, keepdims=True)
      logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
      nll.append(-logp[rows, targets[rows, start + j]])
      pred.append(lg.argmax(-1))
    return np.stack(nll, 1), np.stack(pred, 1)


def generate(model, prompts, lengths, *, max_new_tokens: int,
             method: str = "dense", max_len: Optional[int] = None,
             calib_tokens=None, **options):
  """Greedy generation with `method` (a name; see `Generator`)."""
  prompts = np.asarray(prompts)
  gen = Generator(model, method, batch=prompts.shape[0],
                  max_len=max_len or prompts.shape[1] + max_new_tokens,
                  calib_tokens=calib_tokens, **options)
  return gen.generate(prompts, lengths, max_new_tokens=max_new_tokens)
