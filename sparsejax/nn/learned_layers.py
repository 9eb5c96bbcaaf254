"""NNX layers of the learned family, registered as attention layer variants.

* `seer`: SeerAttention. The layer keeps the dense layer's weights (wq, wk,
  wv, wo: a dense checkpoint loads into it) plus an `AttnGate` under `gate`.
  mode "sparse" runs the gate's traced BlockMask through `sj.attention`;
  "distill" runs dense attention and writes the gate's KL loss against
  `block_attention_probs` (train with `config.trainable="attn/gate/"`);
  "dense" ignores the gate.
* `routing_transformer`: Routing Transformer heads (k-means clusters, the
  centroids a `StepState` the train step updates) beside local heads.
  (The issue's `attention=routing`; `routing` is BiFormer's, vision family.)
* `minference`: training-free MInference prefill patterns per head.
"""

from __future__ import annotations

import json
import jax
import jax.numpy as jnp
from flax import nnx

import sparsejax as sj
from sparsejax.learned import block_lists
from sparsejax.learned import gate as gate_lib
from sparsejax.learned import minference as minference_lib
from sparsejax.learned import routing as routing_lib
from sparsejax.learned.implementations import PROBS_REGISTRY
from sparsejax.nn import attention_registry
from sparsejax.nn import layers


def projections(layer: layers.Attention, x, positions):
  """(q, k, v, q_rope, k_rope) of an `Attention`'s weights, [B, L, H, D]."""
  c = lambda p: p[...].astype(layer.dtype)
  q = jnp.einsum("bld,dhk->blhk", x, c(layer.wq))
  k = jnp.einsum("bld,dhk->blhk", x, c(layer.wk))
  v = jnp.einsum("bld,dhk->blhk", x, c(layer.wv))
  if not layer.use_rope:
    return q, k, v, q, k
  if positions is None:
    positions = jnp.arange(x.shape[1])[None]
  return (q, k, v, layers.rope(q, positions, layer.rope_theta),
          layers.rope(k, positions, layer.rope_theta))


def output(layer: layers.Attention, out):
  return jnp.einsum("blhk,hkd->bld", out.astype(layer.dtype),
                    layer.wo[...].astype(layer.dtype))


def _no_segments(name, segment_ids, why):
  if segment_ids is not None:
    raise NotImplementedError(f"{name} does not support segment_ids: {why}")


def _attention_kwargs(spec):
  return dict(impl=spec.impl, use_rope=spec.use_rope,
              rope_theta=spec.rope_theta, soft_cap=spec.soft_cap,
              rngs=spec.rngs, dtype=spec.dtype)


# --- SeerAttention ---------------------------------------------------------


class SeerAttention(layers.Attention):
  """Causal attention whose kv blocks an `AttnGate` picks per (head, block).

  Args (beyond `layers.Attention`'s):
    seq_len: the model's length (for the dense-mode causal mask).
    block_size: gate and mask block (the paper: 64).
    gate_hidden: gate width per head (the paper: 128).
    mode: "sparse", "distill" or "dense" (see module doc).
    density: causal block density for top-k selection (0.1 = 90% sparse).
    threshold: if > 0, select by softmax(gate) > threshold instead.
    last_dense_blocks: last q-block rows kept dense (the paper: 2).
    gate_loss_scale: weight of the KL loss in distill mode (the paper: 10).
  """

  MODES = ("sparse", "distill", "dense")

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, seq_len: int, block_size: int = 64,
               gate_hidden: int = 128, mode: str = "sparse",
               density: float = 0.5, threshold: float = 0.0,
               last_dense_blocks: int = 2, gate_loss_scale: float = 10.0,
               **kwargs):
    if mode not in self.MODES:
      raise ValueError(f"seer mode must be one of {self.MODES}, got "
                       f"{mode!r}")
    gate_lib.density_to_topk(density, 1)  # validates density
    if threshold < 0:
      raise ValueError(f"threshold must be >= 0 (0: use density), got "
                       f"{threshold}")
    super().__init__(d_model, num_heads, num_kv_heads, head_dim,
                     mask=sj.masks.causal(seq_len, block_size=block_size),
                     **kwargs)
    self.gate = gate_lib.AttnGate(num_heads, num_kv_heads, head_dim,
                                  block_size=block_size, hidden=gate_hidden,
                                  rope_theta=self.rope_theta,
                                  rngs=kwargs["rngs"])
    # Written by the forward: the distillation loss and the kept density.
    self.gate_kl = layers.AuxLoss(jnp.zeros((), jnp.float32))
    self.density_kept = nnx.Intermediate(jnp.ones((), jnp.float32))
    self.block_size, self.mode = block_size, mode
    self.density, self.threshold = density, threshold
    self.last_dense_blocks = last_dense_blocks
    self.gate_loss_scale = gate_loss_scale

  def __call__(self, x, positions=None, segment_ids=None):
    """x [B, L, d_model]; segment_ids [B, L] (packed documents) or None.

    With segment ids the attention stays inside each segment (the core
    refines the gate's blocks); the gate itself scores across them.
    """
    if self.mode == "distill":
      _no_segments("seer (distill mode)", segment_ids, "the ground truth "
                   "(block_attention_probs) is over the whole causal row")
    q, k, v, qr, kr = projections(self, x, positions)
    run = {"sparse": self._sparse, "distill": self._distill,
           "dense": self._dense}[self.mode]
    return output(self, run(q, k, v, qr, kr, positions, segment_ids))

  def _dense(self, q, k, v, qr, kr, positions, segment_ids):
    del q, k, positions
    return sj.attention(qr, kr, v, self.mask.get_value(), impl=self.impl,
                        soft_cap=self.soft_cap, q_segment_ids=segment_ids)

  def select(self, q, k, positions=None):
    """The kept blocks bool [B, H, nq, nk] for un-roped q, k."""
    scores = self.gate(q, k, positions)
    sel = (dict(threshold=self.threshold) if self.threshold > 0 else
           dict(density=self.density))
    return gate_lib.select_blocks(scores, last_dense=self.last_dense_blocks,
                                  **sel)

  def _sparse(self, q, k, v, qr, kr, positions, segment_ids):
    # The mask straight from the top-k indices (no [nq, nk] compression).
    sel = (dict(threshold=self.threshold) if self.threshold > 0 else
           dict(density=self.density))
    mask = gate_lib.gate_mask(self.gate(q, k, positions),
                              block_size=self.block_size, q_len=q.shape[1],
                              last_dense=self.last_dense_blocks, **sel)
    self.density_kept[...] = block_lists.causal_density(mask).mean()
    return sj.attention(qr, kr, v, mask, impl=self.impl,
                        soft_cap=self.soft_cap, q_segment_ids=segment_ids)

  def _distill(self, q, k, v, qr, kr, positions, segment_ids):
    out = self._dense(q, k, v, qr, kr, positions, segment_ids)
    sg = jax.lax.stop_gradient
    scores = self.gate(sg(q), sg(k), positions)
    impl = self.impl if self.impl in PROBS_REGISTRY.names() else "auto"
    target = sj.learned.block_attention_probs(
        sg(qr), sg(kr), block_size=self.block_size, impl=impl)
    loss = self.gate_loss_scale * gate_lib.gate_kl_loss(scores, target)
    self.gate_kl[...] = loss
    return out

  def visible_per_query(self, seq_len: int) -> float:
    dense = super().visible_per_query(seq_len)
    if self.mode != "sparse" or self.threshold > 0:
      return dense
    return dense * self.density


@attention_registry.register_layer("seer")
def _seer(spec, *, block_size=64, gate_hidden=128, mode="sparse",
          density=0.5, threshold=0.0, last_dense_blocks=2,
          gate_loss_scale=10.0):
  if not spec.causal:
    raise ValueError("seer is a causal (decoder) attention variant")
  return SeerAttention(
      spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim,
      seq_len=spec.seq_len, block_size=block_size, gate_hidden=gate_hidden,
      mode=mode, density=density, threshold=threshold,
      last_dense_blocks=last_dense_blocks, gate_loss_scale=gate_loss_scale,
      **_attention_kwargs(spec))


# --- Routing Transformer ---------------------------------------------------


class RoutingTransformerAttention(layers.Attention):
  """Local heads (sliding window) beside routing heads (k-means clusters).

  Heads [0, H - routing_heads) attend a causal window of `local_window`
  tokens; the last `routing_heads` heads route by k-means on their
  un-rotated queries (shared q/k: with `share_qk` the keys are the queries),
  `num_clusters` clusters of `window` tokens each (`routing.py`; either may
  be 0: derived from the other as seq_len / it). The
  centroids (as EMA sums and counts) are `StepState`: the train step keeps
  their update; the commitment loss is an `AuxLoss`.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, seq_len: int, routing_heads: int,
               window: int = 64, num_clusters: int = 0,
               local_window: int = 256, block_size: int = 64,
               decay: float = 0.999, commitment: float = 1e-4,
               share_qk: bool = True, **kwargs):
    group = num_heads // num_kv_heads
    local_heads = num_heads - routing_heads
    if not 0 < routing_heads <= num_heads or local_heads % group:
      raise ValueError(
          f"routing_heads must be in [1, num_heads={num_heads}] and leave a "
          f"multiple of the GQA group ({group}) local heads, got "
          f"{routing_heads}")
    if not 0.0 < decay < 1.0:
      raise ValueError(f"decay must be in (0, 1), got {decay}")
    if not (window or num_clusters):
      raise ValueError("set window, num_clusters or both (0: derived)")
    # One of them may be 0: derived from the other and the length (a fixed
    # num_clusters keeps the centroids' shape across lengths).
    window = window or seq_len // num_clusters
    num_clusters = num_clusters or max(1, seq_len // window)
    routing_lib.check_window(window, seq_len, num_clusters)
    local = (sj.masks.sliding_window(
        seq_len, min(local_window, seq_len),
        block_size=min(block_size, seq_len)) if local_heads else None)
    super().__init__(d_model, num_heads, num_kv_heads, head_dim, mask=local,
                     **kwargs)
    centroids = jax.random.normal(kwargs["rngs"].params(),
                                  (routing_heads, num_clusters, head_dim))
    self.ema_sum = layers.StepState(centroids)
    self.ema_count = layers.StepState(jnp.ones((routing_heads,
                                                num_clusters)))
    self.commitment_loss = layers.AuxLoss(jnp.zeros((), jnp.float32))
    self.cluster_mask = layers.AttentionMask(
        routing_lib.cluster_mask(num_clusters, window, True))
    self.local_heads, self.routing_heads = local_heads, routing_heads
    self.group, self.window, self.decay = group, window, decay
    self.commitment, self.share_qk = commitment, share_qk

  def centroids(self):
    return routing_lib.centroids_from(self.ema_sum[...], self.ema_count[...])

  def __call__(self, x, positions=None, segment_ids=None):
    _no_segments("routing_transformer", segment_ids, "each head gathers "
                 "its own token order, and the core takes one order of "
                 "segment ids per batch row")
    q, k, v, qr, kr = projections(self, x, positions)
    nl, g = self.local_heads, self.group
    outs = []
    if nl:
      outs.append(sj.attention(qr[:, :, :nl], kr[:, :, :nl // g],
                               v[:, :, :nl // g], self.mask.get_value(),
                               impl=self.impl, soft_cap=self.soft_cap))
    x_route = routing_lib.routing_norm(q[:, :, nl:])
    centroids = self.centroids()
    idx = jax.lax.stop_gradient(routing_lib.cluster_members(
        x_route, centroids, self.window))
    keys = qr[:, :, nl:] if self.share_qk else kr[:, :, nl // g:]
    outs.append(routing_lib.routing_attention(
        qr[:, :, nl:], keys, v[:, :, nl // g:], idx,
        mask=self.cluster_mask.get_value(), impl=self.impl))
    self.commitment_loss[...] = (
        self.commitment * routing_lib.commitment_loss(x_route, centroids))
    _, ema_sum, ema_count = routing_lib.kmeans_ema_update(
        x_route, self.ema_sum[...], self.ema_count[...], decay=self.decay)
    self.ema_sum[...], self.ema_count[...] = ema_sum, ema_count
    return output(self, jnp.concatenate(outs, axis=2))

  def visible_per_query(self, seq_len: int) -> float:
    local = super().visible_per_query(seq_len) if self.local_heads else 0.0
    frac = self.local_heads / self.num_heads
    # A routed token sees about half its cluster (causal) per cluster.
    return frac * local + (1 - frac) * self.window / 2


@attention_registry.register_layer("routing_transformer")
def _routing_transformer(spec, *, routing_heads=-1, window=64,
                         num_clusters=0, local_window=256, block_size=64,
                         decay=0.999, commitment=1e-4, share_qk=True):
  if not spec.causal:
    raise ValueError("routing_transformer is implemented for causal LMs")
  if routing_heads < 0:
    routing_heads = max(spec.num_heads // 2, 1)
  return RoutingTransformerAttention(
      spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim,
      seq_len=spec.seq_len, routing_heads=routing_heads, window=window,
      num_clusters=num_clusters, local_window=local_window,
      block_size=block_size, decay=decay, commitment=commitment,
      share_qk=share_qk, **_attention_kwargs(spec))


# --- MInference ------------------------------------------------------------


class MInferenceAttention(layers.Attention):
  """Causal attention through per-head MInference patterns (prefill).

  `patterns` holds one pattern per head (`minference.parse_pattern` specs);
  the BlockMask is estimated from q and k on every call, under jit.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, patterns, block_size: int = 64, **kwargs):
    super().__init__(d_model, num_heads, num_kv_heads, head_dim, **kwargs)
    if len(patterns) != num_heads:
      raise ValueError(f"minference needs one pattern per head ({num_heads}),"
                       f" got {len(patterns)}")
    self.patterns = tuple(minference_lib.parse_pattern(p) for p in patterns)
    self.block_size = block_size
    self.density_kept = nnx.Intermediate(jnp.ones((), jnp.float32))

  def __call__(self, x, positions=None, segment_ids=None):
    """x [B, L, d_model]; segment_ids [B, L] or None (attention stays
    inside each segment; the estimate looks across them)."""
    _, _, v, qr, kr = projections(self, x, positions)
    mask = minference_lib.minference_mask(qr, kr, self.patterns,
                                          block_size=self.block_size)
    self.density_kept[...] = block_lists.causal_density(mask).mean()
    return output(self, sj.attention(qr, kr, v, mask, impl=self.impl,
                                      soft_cap=self.soft_cap,
                                      q_segment_ids=segment_ids))


def _layer_patterns(spec, pattern: str, head_patterns: str):
  """This layer's per-head specs: head_patterns (JSON list per layer of
  lists per head, from `minference.search_patterns`) or `pattern` for all."""
  if not head_patterns:
    return [pattern] * spec.num_heads
  table = json.loads(head_patterns)
  if len(table) != spec.num_layers:
    raise ValueError(f"head_patterns has {len(table)} layers, the model "
                     f"{spec.num_layers}")
  return table[spec.layer_index]


@attention_registry.register_layer("minference")
def _minference(spec, *, pattern="vertical_slash:1000:6096", head_patterns="",
                block_size=64):
  if not spec.causal:
    raise ValueError("minference is a causal prefill variant")
  return MInferenceAttention(
      spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim,
      patterns=_layer_patterns(spec, pattern, head_patterns),
      block_size=block_size, **_attention_kwargs(spec))


def minference_patterns_json(per_layer) -> str:
  """The `head_patterns` option from per-layer `search_patterns` results."""
  return json.dumps([list(r["patterns"]) for r in per_layer])


__all__ = ["SeerAttention", "RoutingTransformerAttention",
           "MInferenceAttention", "minference_patterns_json", "projections",
           "output"]

