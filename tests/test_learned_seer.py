"""SeerAttention: the gate against a numpy transcription of the official
code, selection rules, the layer (all blocks kept equals dense, no
recompiles), the KL loss, and distillation through the train loop."""

import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax.block_sparse.block_mask import FULL, PARTIAL
from sparsejax.learned import gate as gate_lib
from sparsejax.nn import learned_layers
from tests import test_mask_lists
from tests.block_probs_test_base import normal


def _qk(b=1, l=70, h=4, hkv=2, d=16, seed=0):
  return normal(2 * seed, (b, l, h, d)), normal(2 * seed + 1, (b, l, hkv, d))


def _np_rope(x, pos, theta=10000.0):
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  ang = pos[:, :, None, None] * freq
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _np_gate_scores(q, k, wq, wk, block):
  """The official Qavg_Kmaxminavg gate, transcribed loop by loop."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, l, h, _ = q.shape
  nb = -(-l // block)
  qp, kp = [], []
  for i in range(nb):
    qs, ks = q[:, i * block:(i + 1) * block], k[:, i * block:(i + 1) * block]
    qp.append(qs.mean(1))
    kp.append(np.concatenate([ks.max(1), ks.min(1), ks.mean(1)], -1))
  qp, kp = np.stack(qp, 1), np.stack(kp, 1)  # [B, nb, H(kv), ...]
  kp = np.repeat(kp, h // k.shape[2], axis=2)
  qg = np.einsum("bnhd,hde->bnhe", qp, np.asarray(wq, np.float64))
  kg = np.einsum("bnhd,hde->bnhe", kp, np.asarray(wk, np.float64))
  pos = (np.arange(nb) * block)[None].astype(np.float64)
  qg, kg = _np_rope(qg, pos), _np_rope(kg, pos)
  s = np.einsum("bihe,bjhe->bhij", qg, kg) / math.sqrt(wq.shape[-1])
  return np.where(np.tril(np.ones((nb, nb), bool)), s, -np.inf)


class TestGate:

  def test_scores_match_official_formula(self):
    q, k = _qk()
    g = sj.learned.AttnGate(4, 2, 16, block_size=16, hidden=8,
                            rngs=nnx.Rngs(0))
    got = np.asarray(g(q, k))
    want = _np_gate_scores(q, k, g.wq[...], g.wk[...], 16)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2e-4, atol=2e-4)

  def test_density_to_topk_is_the_paper_rule(self):
    # k = int((1 - sqrt(1 - d)) * nb), at least 1.
    assert sj.learned.density_to_topk(0.5, 8) == 2
    assert sj.learned.density_to_topk(0.1, 512) == 26
    assert sj.learned.density_to_topk(1.0, 16) == 16
    assert sj.learned.density_to_topk(0.01, 4) == 1
    with pytest.raises(ValueError, match="density"):
      sj.learned.density_to_topk(0.0, 8)

  def test_select_blocks_rules(self):
    nb = 10
    scores = jnp.where(gate_lib.block_causal(nb, nb),
                       normal(10, (2, 3, nb, nb)), -jnp.inf)
    kk = sj.learned.density_to_topk(0.3, nb)
    sel = np.asarray(sj.learned.select_blocks(scores, density=0.3,
                                              last_dense=2))
    causal = np.tril(np.ones((nb, nb), bool))
    assert not (sel & ~causal).any()
    assert np.all(np.diagonal(sel, axis1=2, axis2=3))
    assert np.all(sel[:, :, -2:] == causal[-2:])
    # Rows keep the top-k causal blocks (plus the diagonal when it is not
    # among them).
    s = np.asarray(scores)
    for i in range(nb - 2):
      top = np.argsort(-s[..., i, :], axis=-1)[..., :min(kk, i + 1)]
      want = np.zeros(sel.shape[:2] + (nb,), bool)
      np.put_along_axis(want, top, True, -1)
      want[..., i] = True
      np.testing.assert_array_equal(sel[..., i, :], want)
    thr = np.asarray(sj.learned.select_blocks(scores, threshold=0.2,
                                              last_dense=0))
    p = np.asarray(jax.nn.softmax(scores, -1))
    np.testing.assert_array_equal(thr, ((p > 0.2) | np.eye(nb, dtype=bool))
                                  & causal)
    with pytest.raises(ValueError, match="exactly one"):
      sj.learned.select_blocks(scores)

  def test_gate_mask_lists_equal_the_selection(self):
    """gate_mask's lists (from the top-k indices; a threshold's from its
    kept-block array) list exactly the blocks select_blocks keeps: the
    diagonal partial (causal), the rest full. Ragged and even lengths, with
    and without dense last rows."""
    def scores(length):
      n = -(-length // 16)
      return jnp.where(gate_lib.block_causal(n, n),
                       normal(length, (2, 3, n, n)), -jnp.inf)

    @jax.jit
    def build(s100, s64):
      out = []
      for s, length, sel in ((s100, 100, dict(density=0.3, last_dense=2)),
                             (s64, 64, dict(threshold=0.1, last_dense=0))):
        out.append((gate_lib.gate_mask(s, block_size=16, q_len=length,
                                       **sel),
                    gate_lib.select_blocks(s, **sel)))
      return out

    for mask, want in build(scores(100), scores(64)):
      check_causal_lists(mask, want)

  def test_kl_loss_matches_torch_kldiv_mean(self):
    nb = 8
    causal = np.tril(np.ones((nb, nb), bool))
    scores = jnp.where(causal, normal(20, (1, 2, nb, nb)),
                       -jnp.inf)
    target = jnp.where(causal, jnp.exp(normal(21, scores.shape)),
                       0.0)
    target = target / target.sum(-1, keepdims=True)
    got = float(sj.learned.gate_kl_loss(scores, target))
    s, t = np.asarray(scores)[:, :, 2:], np.asarray(target)[:, :, 2:]
    logq = s - np.log(np.exp(s).sum(-1, keepdims=True))
    kl = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) -
                              np.where(t > 0, logq, 0)), 0)
    np.testing.assert_allclose(got, kl.mean(), rtol=1e-5)
    # Zero when the gate's softmax is the target.
    logt = jnp.where(target > 0, jnp.log(jnp.where(target > 0, target, 1.0)),
                     -jnp.inf)
    assert abs(float(sj.learned.gate_kl_loss(logt, target))) < 1e-6


def check_causal_lists(mask, want_blocks):
  """mask lists want_blocks: off-diagonal blocks full, the diagonal partial
  under Causal; the lists well formed."""
  states = np.asarray(test_mask_lists.block_states(mask))
  want = np.asarray(want_blocks)
  n = want.shape[-1]
  eye = np.eye(n, dtype=bool)
  np.testing.assert_array_equal(states == FULL, want & ~eye)
  np.testing.assert_array_equal(states == PARTIAL,
                                np.broadcast_to(eye, want.shape))
  assert mask.mask_fn == sj.mask_fns.Causal()
  test_mask_lists.assert_well_formed(mask)


def _layer(mode="sparse", density=0.5, seq_len=96, seed=0):
  return learned_layers.SeerAttention(
      32, 4, 2, 16, seq_len=seq_len, block_size=16, gate_hidden=8, mode=mode,
      density=density, impl="xla", rngs=nnx.Rngs(seed))


class TestLayer:

  def test_all_blocks_kept_equals_dense(self):
    x = normal(0, (2, 96, 32))
    sparse, dense = _layer(density=1.0), _layer(mode="dense")
    assert jax.tree.all(jax.tree.map(jnp.array_equal, nnx.state(sparse,
                                                                 nnx.Param),
                                     nnx.state(dense, nnx.Param)))
    (got, density), (want, _) = _apply(sparse, x), _apply(dense, x)
    assert float(density) == 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
    # ... and dense mode is plain causal attention with the same weights.
    plain = sj.nn.Attention(32, 4, 2, 16, mask=sj.masks.causal(
        96, block_size=16), impl="reference", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(_apply(plain, x)[0]),
                               np.asarray(want), rtol=1e-5, atol=1e-5)

  def test_new_selection_does_not_recompile(self):
    layer = _layer(density=0.3)
    graphdef, state = nnx.split(layer)

    @jax.jit
    def run(state, x):
      m = nnx.merge(graphdef, state)
      blocks = m.select(*_unroped_qk(m, x))
      return m(x), blocks

    outs = [run(state, normal(s, (1, 96, 32)))
            for s in range(3)]
    assert run._cache_size() == 1  # pylint: disable=protected-access
    blocks = [np.asarray(o[1]) for o in outs]
    assert any((blocks[0] != b).any() for b in blocks[1:])
    for (out, blk), s in zip(outs, range(3)):  # each equals its own mask
      x = normal(s, (1, 96, 32))
      _, _, v, qr, kr = learned_layers.projections(layer, x, None)
      mask = sj.learned.gate_block_mask(jnp.asarray(blk), block_size=16,
                                        q_len=96)
      want = learned_layers.output(layer, sj.attention(
          qr, kr, v, mask, impl="reference"))
      np.testing.assert_allclose(np.asarray(out), np.asarray(want),
                                 rtol=1e-5, atol=1e-5)

  def test_bad_options(self):
    with pytest.raises(ValueError, match="mode"):
      _layer(mode="fast")
    with pytest.raises(ValueError, match="density"):
      _layer(density=1.5)


def _apply(module, x):
  """Jitted module(x) and the density it kept (if it records one)."""
  graphdef, state = nnx.split(module)

  @jax.jit
  def go(state, x):
    m = nnx.merge(graphdef, state)
    out = m(x)
    return out, getattr(m, "density_kept", jnp.ones(()))[...]

  return go(state, x)


def _unroped_qk(layer, x):
  q, k, *_ = learned_layers.projections(layer, x, None)
  return q, k


def test_distillation_through_the_train_loop():
  """Dense LM -> seer(mode=distill, trainable=gate, init_from=dense): the
  base weights stay bit-identical, the gates learn (the KL drops), and the
  distilled checkpoint evaluates in sparse mode at a chosen density."""
  from configs import lm as lm_config  # pylint: disable=g-import-not-at-top
  from sparsejax import training  # pylint: disable=g-import-not-at-top
  from sparsejax.evals import compare  # pylint: disable=g-import-not-at-top
  from sparsejax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from sparsejax.training import train  # pylint: disable=g-import-not-at-top

  # impl "reference": the dense jnp attention (and probs) compile fastest;
  # the sparse paths are covered above and in the suites.
  common = {"model.d_model": 32, "model.num_layers": 1, "batch_size": 2,
            "eval_batch_size": 2, "eval_steps": 1, "log_every": 1,
            "progress_bar": False, "seq_len": 64,
            "attention.impl": "reference"}
  dense_dir, seer_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
  dense = compare.apply_overrides(
      lm_config.get_config("small,attention=dense"),
      {**common, "attention.options": dict(block_size=16)})
  # A dense run's checkpoint (its initial state stands in for a trained one).
  exp = train.Experiment(dense)
  ckpt = checkpoints.Checkpointer(f"{dense_dir}/checkpoints", every=1, keep=1)
  ckpt.save(1, exp.init_state(exp.params), force=True)
  ckpt.close()
  options = dict(block_size=16, gate_hidden=8, mode="distill", density=0.5,
                 threshold=0.0, last_dense_blocks=1, gate_loss_scale=10.0)
  seer = compare.apply_overrides(
      lm_config.get_config("small,attention=seer"),
      {**common, "num_train_steps": 12, "checkpoint.every": 12,
       "attention.options": options, "trainable": "attn/gate/",
       "init_from": dense_dir, "optimizer.learning_rate": 3e-2})
  result = training.train_and_evaluate(seer, seer_dir)
  aux = [v for _, v in compare.read_scalars(seer_dir)["train/aux_loss"]]
  assert aux[-1] < aux[0]

  flat = lambda d: checkpoints.flatten(train.restore_state(
      train.Experiment(d[0]), d[1])[0]["params"])
  before, after = flat((dense, dense_dir)), flat((seer, seer_dir))
  gates = [p for p in after if "attn/gate/" in p]
  assert gates and all(p in before for p in after if p not in gates)
  for p, v in before.items():
    np.testing.assert_array_equal(np.asarray(after[p]), np.asarray(v))

  sparse = compare.apply_overrides(seer, {"attention.options": {
      **options, "mode": "sparse"}})
  metrics = training.evaluate(sparse, seer_dir)
  assert np.isfinite(metrics["loss"]) and metrics["step"] == 12
  del result
