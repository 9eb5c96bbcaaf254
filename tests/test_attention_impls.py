"""The shared attention suite against each implementation."""

import dataclasses
from typing import Any

import jax.numpy as jnp
import pytest

import sparsejax as sj
from tests.attention_cases import Case
from tests.attention_test_base import AttentionSuite, check_case
from tests.conftest import has_gpu


class TestXla(AttentionSuite):
  IMPL = "xla"


class TestPallasTritonInterpret(AttentionSuite):
  IMPL = "pallas_triton"
  INTERPRET = True


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="compiles the Triton kernels: needs "
                    "a CUDA GPU (CPU coverage: the interpret-mode class above "
                    "and test_triton_lowering.py)")
class TestPallasTritonGpu(AttentionSuite):
  IMPL = "pallas_triton"


class TestPallasTritonSubTiles:
  """Sub-tiled walks (kv columns in fwd/dQ, q rows in dK/dV) still match."""

  def test_sub_tiles_match_reference(self):
    import jax.numpy as jnp
    from pallas_kernels.gpu.block_sparse_attention import TuningConfig
    from tests.attention_cases import CASES_BY_NAME
    from tests.attention_test_base import check_case
    tuning = TuningConfig(sub_kv_fwd=16, sub_kv_dq=16, sub_q_dkv=16)
    check_case({"impl": "pallas_triton", "interpret": True, "tuning": tuning},
               CASES_BY_NAME["causal_ragged_gqa_d48"], jnp.float32)

  def test_bad_sub_tile_is_rejected(self):
    import pytest as _pytest
    from pallas_kernels.gpu.block_sparse_attention import TuningConfig
    with _pytest.raises(ValueError, match="sub_q_dkv"):
      TuningConfig(sub_q_dkv=24).sub("sub_q_dkv", 64)
    with _pytest.raises(ValueError, match="num_warps_fwd"):
      TuningConfig(num_warps_fwd=3)



@dataclasses.dataclass(frozen=True)
class HeadBias(sj.score_mods.ScoreMod):
  """score + bias[h]: additive, one statistic (sum of g per head), no tile
  forms of its own."""
  bias: Any
  additive = True

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score + self.bias[h]

  @property
  def num_stats(self):
    return 1

  def tile_stats(self, g, score, b, h, q_idx, kv_idx, width):
    return sj.score_mods.bucket(width, 0, jnp.sum(g))

  def stat_weights(self, score, b, h, q_idx, kv_idx):
    return (jnp.float32(1.0),)

  def stats_to_grads(self, stats):
    return (sj.score_mods.tree_sum(stats[..., 0], 0),)


class TestPallasTritonTileForms:
  """The Triton kernels' tile forms of additive mods (score_mods: tile_bias
  folding -lse into its per-row term without soft-cap, tile_weights in dQ):
  Alibi's rank-one / |.| split with slopes of both signs, and a user mod on
  the default tile_bias / tile_weights (through stat_weights)."""

  @staticmethod
  def _check(mod, length=45, block=16):
    case = Case("tile_forms", 1, length, length, 2, 1, 16,
                lambda: sj.masks.causal(length, block_size=block),
                make_mod=lambda key: mod)
    check_case({"impl": "pallas_triton", "interpret": True}, case,
               jnp.float32)

  def test_alibi_without_soft_cap(self):
    self._check(sj.score_mods.Alibi(jnp.asarray([0.3, -0.2])))

  def test_user_additive_mod_on_the_default_tile_forms(self):
    self._check(HeadBias(jnp.asarray([0.7, -0.4])))
