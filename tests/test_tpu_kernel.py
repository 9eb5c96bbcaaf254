"""impl="pallas_tpu" on CPU: the shared suite in TPU interpret mode, plus
checks specific to the scalar-prefetch kernels.

TPU interpret mode (`pltpu.InterpretParams`) simulates SMEM/VMEM, the block
pipeline and megacore, and detects races; it does not check speed, VMEM or
SMEM capacity, or Mosaic's vector layouts. `test_lowers_for_tpu` runs the real
Pallas -> Mosaic lowering on CPU, which enforces the (8, 128) block tiling.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.block_sparse.block_mask import broadcast_lists
from sparsejax.block_sparse.vjp import StaticConfig
from pallas_kernels.tpu import block_sparse_attention as bsa
from tests.attention_test_base import AttentionSuite
from tests.attention_test_base import assert_close


class TestPallasTpuInterpret(AttentionSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  UNSUPPORTED = {"relative_bias_s2_segments": "vector gather"}


def _qkv(b=1, length=64, heads=2, kv_heads=1, d=16, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, length, heads, d), dtype)
  k = jax.random.normal(ks[1], (b, length, kv_heads, d), dtype)
  v = jax.random.normal(ks[2], (b, length, kv_heads, d), dtype)
  return q, k, v


def _kernel_inputs(mask, q, k, interpret, soft_cap=None, tuning=None):
  """Block-padded lists and StaticConfig, as sparsejax.attention builds them."""
  cfg = StaticConfig(block_q=mask.block_q, block_kv=mask.block_kv,
                     q_len=mask.q_len, kv_len=mask.kv_len,
                     mask_fn=mask.kernel_mask_fn, scale=q.shape[-1] ** -0.5,
                     soft_cap=soft_cap, interpret=interpret, tuning=tuning)
  return broadcast_lists(mask, q.shape[0], q.shape[2]), cfg


class TestDataDependentMasks:

  def test_new_mask_reuses_compiled_kernel(self):
    """Lists are scalar-prefetch operands, not constants: no recompile."""
    q, k, v = _qkv()
    tril = np.tril(np.ones((4, 4), bool))

    # Masks passed in: same list shapes (widths 4 and 1 both ways).
    f = jax.jit(lambda q, k, v, m: sj.attention(q, k, v, m, impl="pallas_tpu",
                                                interpret=True))
    for blocks in (tril, tril.T):
      mask = sj.masks.from_block_mask(blocks, block_size=16)
      want = sj.attention(q, k, v, mask, impl="reference")
      assert_close("out", f(q, k, v, mask), want, 2e-5)
    assert f._cache_size() == 1  # pylint: disable=protected-access

    # Masks built under jit from traced block choices (SeerAttention-style).
    causal = sj.mask_fns.Causal()
    g = jax.jit(lambda q, k, v, blocks: sj.attention(
        q, k, v, sj.masks.from_block_mask(blocks, block_size=16,
                                          mask_fn=causal),
        impl="pallas_tpu", interpret=True))
    for blocks in (tril, tril & ~np.eye(4, k=-2, dtype=bool)):
      mask = sj.masks.from_block_mask(blocks, block_size=16, mask_fn=causal)
      want = sj.attention(q, k, v, mask, impl="reference")
      assert_close("out", g(q, k, v, jnp.asarray(blocks)), want, 2e-5)
    assert g._cache_size() == 1  # pylint: disable=protected-access


class TestValidation:

  def test_validate_blocks_tpu_tiling(self):
    bsa.validate_blocks(128, 128, 128, interpret=False)
    bsa.validate_blocks(8, 256, 256, interpret=False)
    with pytest.raises(ValueError, match="block_q.*multiple of 8"):
      bsa.validate_blocks(12, 128, 128, interpret=False)
    with pytest.raises(ValueError, match="block_kv.*multiple of 128"):
      bsa.validate_blocks(128, 64, 128, interpret=False)
    with pytest.raises(ValueError, match="head_dim.*multiple of 128"):
      bsa.validate_blocks(128, 128, 64, interpret=False)
    # Interpret mode has no tiling: the shared suite's small shapes pass.
    bsa.validate_blocks(16, 32, 48, interpret=True)
    with pytest.raises(ValueError, match="block_kv"):
      bsa.validate_blocks(16, 0, 48, interpret=True)

  def test_small_blocks_rejected_for_hardware(self):
    q, k, v = _qkv()
    mask = sj.masks.causal(64, block_size=16)
    lists, cfg = _kernel_inputs(mask, q, k, interpret=False)
    with pytest.raises(ValueError, match="block_kv"):
      bsa.forward(q, k, v, lists, (), cfg)

  def test_tuning_config(self):
    with pytest.raises(ValueError, match="vmem_limit_bytes"):
      bsa.TuningConfig(vmem_limit_bytes=10)
    with pytest.raises(ValueError, match="megacore"):
      bsa.TuningConfig(megacore=1)
    with pytest.raises(ValueError, match="smem_table_bytes"):
      bsa.TuningConfig(smem_table_bytes=2 << 20)
    q, k, v = _qkv()
    mask = sj.masks.causal(64, block_size=16)
    tuning = bsa.TuningConfig(megacore=False, vmem_limit_bytes=64 << 20)
    got = sj.attention(q, k, v, mask, impl="pallas_tpu", interpret=True,
                       tuning=tuning)
    assert_close("out", got, sj.attention(q, k, v, mask, impl="reference"),
                 2e-5)
    with pytest.raises(ValueError, match="TuningConfig"):
      sj.attention(q, k, v, mask, impl="pallas_tpu", interpret=True,
                   tuning=object())

  def test_step_table_in_smem_sized_chunks(self):
    """A table over the SMEM budget runs as a loop of row chunks."""
    assert bsa._chunk_rows(8192, 257, 256 * 1024) == 128  # pylint: disable=protected-access
    assert bsa._chunk_rows(7, 10, 100) == 1  # pylint: disable=protected-access
    from tests.attention_cases import CASES_BY_NAME  # pylint: disable=g-import-not-at-top
    from tests.attention_test_base import check_case  # pylint: disable=g-import-not-at-top
    # A 40-byte budget: forward/dQ run 8 one-row chunks, dK/dV 10 of two.
    check_case({"impl": "pallas_tpu", "interpret": True,
                "tuning": bsa.TuningConfig(smem_table_bytes=40)},
               CASES_BY_NAME["cross_random_per_batch_head"], jnp.float32)

  def test_needs_tpu_without_interpret(self):
    if jax.devices()[0].platform == "tpu":
      pytest.skip("runs on a TPU here")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="needs a TPU"):
      sj.attention(q, k, v, impl="pallas_tpu")


def _races():
  """The TPU interpreter's race state of the last kernel (private API)."""
  try:
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("TPU interpret race state moved in this jax version")
  return getattr(interpret_pallas_call, "races", None)


class TestRaceDetection:
  """Each kernel on two simulated TensorCores ("parallel" axes split)."""

  def test_detector_sees_a_planted_race(self):
    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] + 1.0

    racy = pl.pallas_call(  # every grid point writes the same output block
        kernel, grid=(4,),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams(detect_races=True,
                                        num_cores_or_threads=2))
    jax.block_until_ready(racy(jnp.zeros((4, 8, 128))))
    races = _races()
    if races is None:
      pytest.skip("no race state in this jax version")
    assert races.races_found

  def test_kernels_are_race_free_on_two_cores(self):
    q, k, v = _qkv(b=1, length=64, heads=4, kv_heads=2)
    mask = sj.masks.s2(64, 4, block_size=16, local_blocks=1, vert_stride=2,
                       num_kv_heads=2)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    lists, cfg = _kernel_inputs(mask, q, k, interpret=params)
    out, lse = bsa.forward(q, k, v, lists, (), cfg)
    jax.block_until_ready(out)
    races = _races()
    if races is None:
      pytest.skip("no race state in this jax version")
    assert not races.races_found, "forward"
    do = jax.random.normal(jax.random.key(1), q.shape)
    delta = jnp.einsum("bqhd,bqhd->bhq", out, do)
    jax.block_until_ready(
        bsa.backward_dq(q, k, v, do, lse, delta, lists, (), cfg))
    assert not _races().races_found, "dq"
    jax.block_until_ready(
        bsa.backward_dkv(q, k, v, do, lse, delta, lists, (), cfg))
    assert not _races().races_found, "dkv"
    want = sj.attention(q, k, v, mask, impl="reference")
    assert_close("out", out, want, 2e-5)


_TPU = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1,
                                   platform="tpu")


@pytest.mark.parametrize("dtype,heads,kv_heads,d,soft_cap,mask,smem", [
    (jnp.bfloat16, 4, 2, 128, None,
     lambda: sj.masks.s2(512, 4, block_size=128, local_blocks=2,
                         vert_stride=2, num_kv_heads=2), 256 * 1024),
    # Ragged length (kv range mask), head_dim 64 padded to 128, soft-cap,
    # and a step table cut into chunks (fori_loop with aliased outputs).
    (jnp.float32, 2, 1, 64, 5.0,
     lambda: sj.masks.causal(300, block_size=128), 64),
], ids=["s2_gqa_bf16", "causal_ragged_softcap_f32_d64_chunked"])
def test_lowers_for_tpu(dtype, heads, kv_heads, d, soft_cap, mask, smem):
  """Forward and gradient go through the real Mosaic lowering on CPU.

  This enforces the (8, 128) block tiling and the supported primitives, which
  interpret mode does not; Mosaic's layout passes and the compile to TPU code
  run only on a TPU.
  """
  mask = mask()
  lp = mask.num_q_blocks * mask.block_q
  q = jax.ShapeDtypeStruct((1, lp, heads, d), dtype)
  k = jax.ShapeDtypeStruct((1, lp, kv_heads, d), dtype)
  lists, cfg = _kernel_inputs(
      mask, q, k, interpret=False, soft_cap=soft_cap,
      tuning=bsa.TuningConfig(smem_table_bytes=smem))

  def loss(q, k, v):
    return bsa.attention(q, k, v, lists, (), cfg)[0].astype(jnp.float32).sum()

  grad = jax.grad(loss, argnums=(0, 1, 2))
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=_TPU)
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(grad).trace(q, k, k).lower(
        lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV


def test_alibi_and_segments_lower_for_tpu():
  """Alibi (slopes read from SMEM, statistics in the dQ kernel) and segment
  ids ((block_q, 1) / (1, block_kv) id tiles, the seg section of the step
  table) through the real Mosaic lowering."""
  mask = sj.masks.s2(512, 4, block_size=128, local_blocks=2, vert_stride=2,
                     num_kv_heads=2)
  q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)

  def loss(q, k, v, slopes, ids):
    return sj.attention(q, k, v, mask, impl="pallas_tpu",
                        score_mod=sj.score_mods.Alibi(slopes),
                        q_segment_ids=ids).astype(jnp.float32).sum()

  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=_TPU)
  with sj.target_platform("tpu"), jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(grad).trace(
        q, k, k, jax.ShapeDtypeStruct((4,), jnp.float32),
        jax.ShapeDtypeStruct((1, 512), jnp.int32)).lower(
            lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3


def test_relative_bias_is_unsupported_with_the_reason():
  q, k, v = _qkv()
  mod = sj.score_mods.RelativeBias(jnp.zeros((2, 9)))
  with pytest.raises(ValueError, match="vector gather"):
    sj.attention(q, k, v, impl="pallas_tpu", interpret=True, score_mod=mod)
