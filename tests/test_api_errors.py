"""Bad input raises clear errors naming the argument."""

import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj

Q = jnp.ones((1, 64, 4, 32))
KV = jnp.ones((1, 64, 2, 32))


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((Q[0], KV, KV), {}, ValueError, "q must be a rank-4"),
    ((Q, KV[..., None], KV), {}, ValueError, "k must be a rank-4"),
    ((Q, jnp.ones((1, 64, 3, 32)), jnp.ones((1, 64, 3, 32))), {}, ValueError,
     "divisible by kv heads"),
    ((Q, KV, KV[:, :32]), {}, ValueError, "same shape"),
    ((Q, jnp.ones((1, 64, 2, 16)), jnp.ones((1, 64, 2, 16))), {}, ValueError,
     "head_dim=32"),
    ((Q, KV.astype(jnp.bfloat16), KV), {}, TypeError, "share a dtype"),
    ((Q.astype(jnp.int32), KV, KV), {}, TypeError, "q must be float32"),
    ((Q, KV, KV), {"impl": "flash"}, ValueError, "impl must be one of"),
    ((Q, KV, KV), {"impl": "pallas_triton"}, ValueError, "needs a CUDA GPU"),
    ((Q, KV, KV), {"impl": "pallas_mosaic_gpu"}, ValueError,
     r"wrap the call in sparsejax.target_platform\(...\)"),
    ((Q, KV, KV), {"impl": "xla", "interpret": True}, ValueError,
     "interpret=True needs a Pallas"),
    ((Q, KV, KV), {"mask": np.ones((64, 64), bool)}, TypeError,
     "mask must be None or a sparsejax.BlockMask"),
    ((Q, KV, KV), {"mask": sj.masks.causal(128, block_size=16)}, ValueError,
     r"built for \(q_len, kv_len\) = \(128, 128\)"),
    ((Q, KV, KV), {"mask": sj.masks.s2(64, 8, block_size=16, local_blocks=1,
                                       vert_stride=2)}, ValueError,
     "head dimension must be 1 .shared by every head. or 4"),
    ((Q, KV, KV), {"soft_cap": -1.0}, ValueError,
     "soft_cap must be a finite positive"),
    ((Q, KV, KV), {"scale": float("nan")}, ValueError,
     "scale must be a finite number, got nan"),
    ((Q, KV, KV), {"scale": float("inf")}, ValueError,
     "scale must be a finite number"),
    ((Q, KV, KV), {"scale": "big"}, TypeError, "scale must be a real number"),
    ((Q, KV, KV), {"mask": sj.masks.from_mask_fn(
        sj.mask_fns.Causal(), q_len=64, batch=3, block_size=16)}, ValueError,
     r"built for batch 3 but q has batch 1: a mask's batch dimension must be"
     r" 1 \(one mask shared by every example\) or 1"),
    ((Q, KV, KV), {"score_mod": lambda s, b, h, q, kv: s}, TypeError,
     "score_mod must be None or a frozen dataclass"),
    ((Q, KV, KV), {"q_segment_ids": jnp.zeros((1, 63), jnp.int32)},
     ValueError, r"q_segment_ids must be \[batch=1, len=64\]"),
    ((Q, KV, KV), {"q_segment_ids": jnp.zeros((1, 64))}, TypeError,
     "q_segment_ids must be an integer array"),
    ((Q, KV[:, :32], KV[:, :32]),
     {"q_segment_ids": jnp.zeros((1, 64), jnp.int32)}, ValueError,
     r"kv_segment_ids is needed when q_len \(64\) != kv_len \(32\)"),
])
def test_bad_input(args, kwargs, err, match):
  with pytest.raises(err, match=match):
    sj.attention(*args, **kwargs)


def test_mask_constructor_errors():
  with pytest.raises(ValueError, match="block_size must be a power of two"):
    sj.masks.causal(64, block_size=24)
  with pytest.raises(ValueError, match="q_len must be a positive int"):
    sj.masks.causal(0)
  with pytest.raises(TypeError, match="blocks must be a bool array"):
    sj.masks.from_block_mask(np.ones((2, 2)), block_size=16)
  with pytest.raises(ValueError, match=r"blocks has \(nq, nk\)"):
    sj.masks.from_block_mask(np.ones((2, 2), bool), block_size=16, q_len=64)
  with pytest.raises(TypeError, match="mask_fn must be callable"):
    sj.masks.from_mask_fn(3, q_len=64)


def test_auto_falls_back_to_xla_on_cpu():
  out = sj.attention(Q, KV, KV, sj.masks.causal(64, block_size=16))
  ref = sj.attention(Q, KV, KV, sj.masks.causal(64, block_size=16),
                     impl="reference")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
