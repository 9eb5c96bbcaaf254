"""Bad input to the low-rank ops, and the properties of the features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax import lowrank
from sparsejax.lowrank import checks


def _qkv(b=1, lq=32, lk=32, h=2, hkv=1, d=16, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(ks[0], (b, lq, h, d), dtype),
          jax.random.normal(ks[1], (b, lk, hkv, d), dtype),
          jax.random.normal(ks[2], (b, lk, hkv, d), dtype))


W16 = lowrank.orthogonal_gaussian_projection(jax.random.key(1), 16, 16)


def _sb(q, k, v, mask, w=W16, **kw):
  # The checks run before any implementation; the dense one is the cheapest.
  return lowrank.scatterbrain_attention(q, k, v, mask, w, impl="reference",
                                        **kw)


def test_projection_width_must_be_head_dim():
  q, k, v = _qkv()
  w = lowrank.orthogonal_gaussian_projection(jax.random.key(1), 16, 24)
  with pytest.raises(ValueError, match=r"projection must be \[num_features, "
                     r"head_dim=16\]"):
    _sb(q, k, v, None, w)
  with pytest.raises(ValueError, match="projection"):
    lowrank.performer_attention(q, k, v, w)
  with pytest.raises(ValueError, match="projection"):
    lowrank.performer_features(q, w)
  with pytest.raises(TypeError, match="projection must be an array"):
    _sb(q, k, v, None, [[1.0] * 16])


def test_mask_for_other_lengths():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"mask was built for \(q_len, kv_len\)"
                     r" = \(48, 48\)"):
    _sb(q, k, v, sj.masks.sliding_window(48, 8, block_size=16))
  with pytest.raises(TypeError, match="mask must be None or a sparsejax"):
    _sb(q, k, v, np.ones((32, 32), bool))


def test_causal_mask_reaching_the_future():
  q, k, v = _qkv()
  # Full blocks above the diagonal.
  with pytest.raises(ValueError, match="reaches the future.*as full"):
    _sb(q, k, v, sj.masks.full(32, block_size=16), causal=True)
  # A partial diagonal block that sees one key ahead (element check).
  ahead = sj.masks.causal(32, block_size=16, offset=1)
  with pytest.raises(ValueError, match="reaches the future.*sees keys after"):
    _sb(q, k, v, ahead, causal=True)
  # Bidirectional windows reach ahead too; causal ones and S2 do not.
  with pytest.raises(ValueError, match="reaches the future"):
    _sb(q, k, v, sj.masks.sliding_window(32, 4, causal=False, block_size=16),
        causal=True)
  for ok in (sj.masks.causal(32, block_size=16),
             sj.masks.s2(32, 2, block_size=16, local_blocks=1,
                         vert_stride=2)):
    checks.causal_support(ok)
  window = sj.masks.sliding_window(32, 5, block_size=16)
  assert np.isfinite(np.asarray(_sb(q, k, v, window, causal=True))).all()
  # Non-causal calls take any support.
  checks.mask_fits(ahead, q, k)


def test_shapes_dtypes_and_impl():
  q, k, v = _qkv(h=3, hkv=2)
  with pytest.raises(ValueError, match="divisible by kv heads"):
    _sb(q, k, v, None)
  q, k, v = _qkv()
  with pytest.raises(TypeError, match="share a dtype"):
    _sb(q, k.astype(jnp.bfloat16), v, None)
  with pytest.raises(ValueError, match="rank-4"):
    _sb(q[0], k, v, None)
  with pytest.raises(TypeError, match="causal must be a bool"):
    _sb(q, k, v, None, causal=1)
  with pytest.raises(ValueError, match="impl must be one of"):
    lowrank.scatterbrain_attention(q, k, v, None, W16, impl="cuda")
  with pytest.raises(ValueError, match="impl='pallas_tpu' cannot run"):
    lowrank.scatterbrain_attention(q, k, v, None, W16, impl="pallas_tpu")
  with pytest.raises(ValueError, match="interpret=True needs a Pallas"):
    lowrank.scatterbrain_attention(q, k, v, None, W16, impl="xla",
                                   interpret=True)
  with pytest.raises(ValueError, match="head_dim must be in"):
    q4 = jnp.zeros((1, 8, 1, 4))
    lowrank.scatterbrain_attention(q4, q4, q4, None, jnp.zeros((8, 4)))


def test_projection_helper():
  with pytest.raises(ValueError, match="even with cosh"):
    lowrank.orthogonal_gaussian_projection(jax.random.key(0), 7, 16)
  with pytest.raises(ValueError, match="scaling must be 0 or 1"):
    lowrank.orthogonal_gaussian_projection(jax.random.key(0), 8, 16,
                                           scaling=2)
  w = np.asarray(lowrank.orthogonal_gaussian_projection(
      jax.random.key(0), 48, 16, scaling=1))
  half = w[:24]
  np.testing.assert_allclose(w[24:], -half)  # cosh: [W0; -W0]
  gram = half[:16] @ half[:16].T  # one block: orthogonal rows, norm sqrt(d)
  np.testing.assert_allclose(gram, 16 * np.eye(16), atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(half, axis=1), 4.0, rtol=1e-5)
  w0 = np.asarray(lowrank.orthogonal_gaussian_projection(
      jax.random.key(3), 16, 16, cosh=False))
  assert w0.shape == (16, 16) and len(set(np.round(
      np.linalg.norm(w0, axis=1), 4))) == 16  # chi-distributed norms


def test_features_estimate_the_softmax_kernel():
  """phi(q).phi(k) is an unbiased estimate of exp(s): with many features the
  estimate converges; log scales reproduce phi exactly."""
  ks = jax.random.split(jax.random.key(0), 3)
  q = 0.5 * jax.random.normal(ks[0], (20, 16))
  k = 0.5 * jax.random.normal(ks[1], (30, 16))
  w = lowrank.orthogonal_gaussian_projection(ks[2], 8192, 16)
  phi_q, phi_k = (lowrank.performer_features(x, w) for x in (q, k))
  assert float(phi_q.min()) > 0
  exact = np.exp(np.asarray(q @ k.T) / 4.0)
  rel = np.abs(np.asarray(phi_q @ phi_k.T) / exact - 1)
  assert rel.mean() < 0.03, rel.mean()  # ~ 1/sqrt(m) per entry
  hat, log_scale = lowrank.performer_features(q, w, return_log_scale=True)
  np.testing.assert_allclose(np.asarray(hat * jnp.exp(log_scale)),
                             np.asarray(phi_q), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(hat.max(-1)), 1.0)
