"""Routing Transformer: cluster routing, attention on the core against the
float64 dense reference (outputs and gradients), one cluster equals dense,
the k-means EMA update, and the layer's StepState kept by the train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax.nn import learned_layers
from tests.block_probs_test_base import assert_close, normal, x64


def _qkv(b=2, l=64, h=4, hkv=2, d=16, seed=0):
  """q, k, v and a seed for the centroids."""
  q = normal(4 * seed, (b, l, h, d))
  k = normal(4 * seed + 1, (b, l, hkv, d))
  v = normal(4 * seed + 2, (b, l, hkv, d))
  return q, k, v, 4 * seed + 3


def _members(q, clusters, window, key):
  centroids = normal(key, (q.shape[2], clusters, q.shape[3]))
  return sj.learned.cluster_members(sj.learned.routing_norm(q), centroids,
                                    window)


def test_cluster_members_are_each_clusters_nearest_sorted():
  q, _, _, key = _qkv()
  centroids = normal(key, (4, 3, 16))
  idx = np.asarray(sj.learned.cluster_members(
      sj.learned.routing_norm(q), centroids, 16))
  x = np.asarray(sj.learned.routing_norm(q))
  scores = np.einsum("blhd,hcd->bhcl", x, np.asarray(centroids))
  want = np.sort(np.argsort(-scores, -1)[..., :16], -1)
  np.testing.assert_array_equal(idx, want)
  assert (np.diff(idx, axis=-1) > 0).all()
  with pytest.raises(ValueError, match="power of two"):
    sj.learned.cluster_members(x, centroids, 24)


@functools.lru_cache(maxsize=None)
def _routing_fn(impl, interpret):
  def f(q, k, v, idx):
    return sj.learned.routing_attention(q, k, v, idx, impl=impl,
                                        interpret=interpret)

  @jax.jit
  def go(q, k, v, idx, g):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, idx), q, k, v)
    return (out,) + vjp(g.astype(out.dtype))

  return go


def test_matches_float64_reference_with_grads():
  """Overlapping equal-size clusters (tokens in 0, 1 or several), GQA."""
  q, k, v, key = _qkv()
  idx = _members(q, 3, 32, key)
  g = normal(9, q.shape)
  got = _routing_fn("xla", False)(q, k, v, idx, g)
  with x64():
    as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    want = _routing_fn("reference", False)(as64(q), as64(k), as64(v), idx,
                                           as64(g))
    want = [np.asarray(w) for w in want]
  count = np.asarray(sj.learned.members_to_bool(idx, 64)).sum(2)
  assert (count == 0).any() and (count > 1).any()  # the case is not trivial
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(name, a, b, 2e-5)
  out = np.asarray(got[0])
  assert np.all(out[np.swapaxes(count, 1, 2) == 0] == 0)  # unrouted: 0
  # The same through the Triton kernel (interpret mode), forward.
  tri = jax.jit(lambda q, k, v: sj.learned.routing_attention(
      q, k, v, idx, impl="pallas_triton", interpret=True))(q, k, v)
  assert_close("out (pallas_triton)", tri, want[0], 2e-5)


def test_one_cluster_equals_dense_causal():
  q, k, v, _ = _qkv(l=64)
  idx = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 4, 1, 64))
  got = sj.learned.routing_attention(q, k, v, idx, impl="xla")
  want = sj.attention(q, k, v, sj.masks.causal(64, block_size=16),
                      impl="reference")
  assert_close("out", got, want, 2e-5)
  # The layer too: every head routed, one cluster of all tokens, keys from
  # wk (share_qk off) equals plain causal attention with the same weights.
  layer = learned_layers.RoutingTransformerAttention(
      32, 4, 2, 16, seq_len=64, routing_heads=4, window=64, num_clusters=1,
      share_qk=False, impl="xla", rngs=nnx.Rngs(0))
  plain = sj.nn.Attention(32, 4, 2, 16, mask=sj.masks.causal(
      64, block_size=16), impl="reference", rngs=nnx.Rngs(0))
  x = normal(1, (2, 64, 32))
  apply = lambda m: jax.jit(lambda s, x: nnx.merge(nnx.graphdef(m), s)(x))(
      nnx.state(m), x)
  assert_close("layer", apply(layer), apply(plain), 2e-5)


def test_kmeans_ema_update_matches_numpy():
  x = sj.learned.routing_norm(normal(30, (2, 40, 3, 8)))
  ema_sum = normal(31, (3, 5, 8))
  ema_count = jnp.asarray(np.random.default_rng(32).uniform(0.5, 2.0, (3, 5)),
                          jnp.float32)
  decay, eps = 0.9, 1e-5
  cent, new_sum, new_count = sj.learned.kmeans_ema_update(
      x, ema_sum, ema_count, decay=decay, eps=eps)

  def smooth(c):
    n = c.sum(-1, keepdims=True)
    return (c + eps) / (n + c.shape[-1] * eps) * n

  xs, s0, c0 = (np.asarray(a, np.float64) for a in (x, ema_sum, ema_count))
  mu = s0 / smooth(c0)[..., None]
  assign = np.einsum("blhd,hcd->blhc", xs, mu).argmax(-1)
  sums, counts = np.zeros_like(s0), np.zeros_like(c0)
  for bi in range(2):
    for t in range(40):
      for h in range(3):
        sums[h, assign[bi, t, h]] += xs[bi, t, h]
        counts[h, assign[bi, t, h]] += 1
  want_sum = decay * s0 + (1 - decay) * sums
  want_count = decay * c0 + (1 - decay) * counts
  np.testing.assert_allclose(new_sum, want_sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_count, want_count, rtol=1e-5)
  np.testing.assert_allclose(cent, want_sum / smooth(want_count)[..., None],
                             rtol=1e-4)
  # The commitment loss pulls x toward its (stop-gradient) centroid.
  loss, grad = jax.value_and_grad(sj.learned.commitment_loss)(x, cent)
  nearest = np.asarray(cent)[np.arange(3), np.einsum(
      "blhd,hcd->blhc", np.asarray(x), np.asarray(cent)).argmax(-1)]
  np.testing.assert_allclose(loss, ((np.asarray(x) - nearest) ** 2).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(grad, 2 * (np.asarray(x) - nearest) / x.size,
                             rtol=1e-4, atol=1e-9)


def test_train_step_keeps_the_step_state():
  """One train step: the centroids move (EMA), the params train, the
  commitment loss is in the step's aux_loss."""
  import optax  # pylint: disable=g-import-not-at-top
  from sparsejax.nn.layers import StepState  # pylint: disable=g-import-not-at-top
  from sparsejax.training import tasks, train  # pylint: disable=g-import-not-at-top
  model = sj.nn.TransformerLM(
      vocab_size=64, seq_len=64, d_model=32, num_layers=1, num_heads=4,
      num_kv_heads=2, mlp_dim=64, rngs=nnx.Rngs(0),
      # impl "reference": the plumbing is under test, and it compiles fast.
      attention=dict(name="routing_transformer", impl="reference",
                     options=dict(window=16, local_window=32, block_size=16,
                                  decay=0.9)))
  graphdef, params, model_state, consts = nnx.split(model, nnx.Param,
                                                    StepState, ...)
  tx = optax.adam(1e-3)
  state = train.init_state(tx, params, model_state)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 65)),
                       jnp.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:])
  step = jax.jit(functools.partial(train.train_step, graphdef, tx,
                                   tasks.get_task("lm")))
  new, metrics = step(state, consts, batch)
  before = jax.tree.leaves(state["model_state"])
  after = jax.tree.leaves(new["model_state"])
  assert len(after) == 2 and all(not np.allclose(a, b)
                                 for a, b in zip(after, before))
  assert 0 < float(metrics["aux_loss"]) < 1e-2
  assert float(metrics["update_norm"]) > 0
  # needle_long-style callers split without StepState, so consts hold the
  # initial one while the state carries the updated one: the state wins.
  graphdef3, params3, consts3 = nnx.split(model, nnx.Param, ...)
  step3 = jax.jit(functools.partial(train.train_step, graphdef3, tx,
                                    tasks.get_task("lm")))
  s3, _ = step3(train.init_state(tx, params3, new["model_state"]), consts3,
                batch)
  assert len(jax.tree.leaves(s3["model_state"])) == 2
  again, _ = step(train.init_state(tx, params, new["model_state"]), consts,
                  batch)
  for a, b in zip(jax.tree.leaves(s3["model_state"]),
                  jax.tree.leaves(again["model_state"])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
