"""Quest, Double Sparsity, TidalDecode and MoA against their references.

Each selection method runs over a paged cache and is compared with its jnp
reference over the dense K/V at a budget that selects a strict subset, and
with dense decode at a budget that selects everything. Data are numpy
and every call is jitted: eager ops compile one by one, seconds on CI.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.inference import double_sparsity as ds
from sparsejax.inference import methods
from sparsejax.inference import moa
from sparsejax.inference import moa_profile
from sparsejax.inference import quest
from sparsejax.inference import selection
from sparsejax.inference import tidal
from sparsejax.inference.paged_cache import PagedKVCache

B, N, HKV, H, D, PAGE = 3, 72, 2, 4, 16, 8
LENGTHS = np.array([70, 9, 41])
CHANNELS = np.array([[0, 3, 9, 12], [5, 1, 15, 2]])
TOL = dict(atol=2e-5, rtol=2e-5)


def _normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _data(seed=0):
  k, v = _normal(seed, B, N, HKV, D), _normal(seed + 1, B, N, HKV, D)
  q, q2 = _normal(seed + 2, B, H, D), _normal(seed + 3, B, H, D)
  cache = PagedKVCache.create(B, N, HKV, D, jnp.float32, page_size=PAGE,
                              page_bounds=True, channels=CHANNELS,
                              shuffle_key=jax.random.key(seed + 1))
  return q, q2, k, v, cache.prefill(k, v, LENGTHS)


DATA = _data()


@jax.jit
def _dense(q, k, v):
  vis = jnp.arange(N)[None, None] < jnp.asarray(LENGTHS)[:, None, None]
  return selection.dense_attention(q, k, v, vis, D ** -0.5)


def _run(name, impl, budget, per_head=False):
  """(method, its reference, dense) outputs, one jit for all three."""
  kw = dict(impl=impl, interpret=impl != "xla")

  def f(q, q2, k, v, cache):
    lens = jnp.asarray(LENGTHS)
    if name == "quest":
      got = quest.quest_decode(q, cache, token_budget=budget,
                               per_head=per_head, **kw)
      want = quest.quest_reference(q, k, v, lens, page_size=PAGE,
                                   token_budget=budget, per_head=per_head)
      return got, want, _dense(q, k, v)
    if name == "double_sparsity":
      got = ds.ds_decode(q, cache, token_budget=budget, per_head=per_head,
                         **kw)
      want = ds.ds_reference(q, k, v, lens, jnp.asarray(CHANNELS),
                             token_budget=budget, per_head=per_head)
      return got, want, _dense(q, k, v)
    # tidal: select with q at one layer (full attention), reuse with q2 at
    # another
    out, pos, counts = tidal.tidal_select(q, cache, token_budget=budget,
                                          per_head=per_head, **kw)
    got = tidal.tidal_reuse(q2, cache, pos, counts, **kw)
    want = tidal.tidal_reference(q, k, q2, k, v, lens, token_budget=budget,
                                 per_head=per_head)
    return got, want, _dense(q2, k, v), out, _dense(q, k, v)

  out = jax.jit(f)(*DATA)
  if name == "tidal":
    np.testing.assert_allclose(out[3], out[4], **TOL)
  return out[:3]


SELECTORS = ("quest", "double_sparsity", "tidal")


@pytest.mark.parametrize("name", SELECTORS)
def test_selection_matches_reference_and_full_budget_is_dense(name):
  got, want, dense = _run(name, "xla", 16)
  np.testing.assert_allclose(got, want, **TOL)
  assert np.abs(np.asarray(want) - np.asarray(dense)).max() > 1e-2
  got, want, dense = _run(name, "xla", N)
  np.testing.assert_allclose(got, dense, **TOL)
  np.testing.assert_allclose(want, dense, **TOL)


@pytest.mark.parametrize("name", SELECTORS)
def test_selection_through_the_triton_kernel(name):
  got, want, _ = _run(name, "pallas_triton", 24, per_head=name == "tidal")
  np.testing.assert_allclose(got, want, **TOL)


def test_quest_keeps_the_current_page_and_bounds_hold():
  q, _, k, _, cache = DATA
  logical, counts = jax.jit(functools.partial(
      quest.select_pages, page_size=PAGE, token_budget=16))(
          q, cache.page_min, cache.page_max, cache.lengths)
  last = -(-LENGTHS // PAGE) - 1
  for b in range(B):
    for g in range(HKV):
      assert last[b] in np.asarray(logical[b, g, :counts[b, g]])
  np.testing.assert_array_equal(counts[:, 0], [2, 2, 2])
  # The bound is >= every key's logit in its page.
  ub = np.asarray(jax.jit(quest.upper_bounds)(q, cache.page_min,
                                               cache.page_max))
  s = np.einsum("bhd,bnhd->bhn", q, np.repeat(k, H // HKV, 2))
  for b in range(B):
    for p in range(-(-LENGTHS[b] // PAGE)):
      hi = min((p + 1) * PAGE, LENGTHS[b])
      assert (ub[b, :, p] >= s[b, :, p * PAGE:hi].max(-1) - 1e-5).all()


def test_double_sparsity_calibration_finds_the_heavy_channels():
  q, k = (np.array(_normal(s, 64, h, 16)) for s, h in ((5, 4), (6, 2)))
  q[:, :2, 3] *= 20.0  # kv head 0: channel 3; kv head 1: 11
  q[:, 2:, 11] *= 20.0
  k[:, :, 7] *= 10.0
  ch = np.asarray(jax.jit(ds.calibrate_channels, static_argnums=2)(q, k, 2))
  assert set(ch[0]) == {3, 7} and set(ch[1]) == {11, 7}
  with pytest.raises(ValueError, match="num_channels"):
    ds.calibrate_channels(q, k, 17)


def test_ds_token_fraction_budgets_each_sequence():
  q, _, _, _, cache = DATA
  _, counts = jax.jit(functools.partial(
      ds.select_tokens, token_budget=8, token_fraction=1 / 16))(
          q, cache.labels, cache.channels, cache.lengths)
  np.testing.assert_array_equal(counts[:, 0], [5, 1, 3])


# --- MoA ---------------------------------------------------------------------

SPANS = moa.MoASpans((8.0, 0.0), (0.1, 0.3), min_span=16, round_to=8,
                     sink_size=4)


def test_spans_follow_alpha_plus_beta_n():
  # 8 + 0.1 * 100 = 18 -> 24 (multiple of 8): sink 4, window 20; 0.3 * 100
  # = 30 -> 32: sink 4, window 28; a short context keeps everything.
  assert SPANS.spans(100) == ((4, 4), (20, 28))
  assert SPANS.spans(12) == ((4, 4), (8, 8))
  d = SPANS.density(100)
  brute = np.mean([
      np.asarray(moa.MoAMaskFn((s,), (w,))(0, 0, np.arange(100)[:, None],
                                           np.arange(100)[None])).sum()
      for s, w in zip(*SPANS.spans(100))]) / (100 * 101 / 2)
  assert d == pytest.approx(brute)
  with pytest.raises(ValueError, match="equal-length"):
    moa.MoASpans((1.0,), (0.1, 0.2))


def test_moa_prefill_mask_rows_match_the_reference():
  q = _normal(2, 1, 100, H, D)
  k, v = _normal(3, 1, 100, HKV, D), _normal(4, 1, 100, HKV, D)
  out = jax.jit(lambda q, k, v, m: sj.attention(q, k, v, m, impl="reference"))(
      q, k, v, moa.moa_mask(100, H, SPANS, block_size=16))
  sinks, windows = SPANS.spans(100)
  ref = jax.jit(lambda q, n: moa.moa_reference(q, k, v, n, sinks, windows))
  for t in (0, 3, 30, 99):
    np.testing.assert_allclose(out[:, t], ref(q[:, t], jnp.array([t + 1])),
                               **TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
def test_moa_cache_decode_matches_the_reference_every_step(impl):
  k, v = _normal(7, B, 100, HKV, D), _normal(8, B, 100, HKV, D)
  qs = np.asarray(_normal(9, B, 100, H, D))
  cache = moa.MoAKVCache.create(B, 100, HKV, D, jnp.float32, SPANS, block=8)
  assert cache.capacity == 32  # max(4 + 20, 4 + 28): compacted per head
  cache = cache.prefill(k[:, :50], v[:, :50], np.array([3, 50, 30]))
  step = jax.jit(lambda c, a, b: c.append(a, b))
  decode = jax.jit(lambda q, c: moa.moa_decode(q, c, impl=impl,
                                               interpret=impl != "xla"))
  ref = jax.jit(lambda q, n: moa.moa_reference(q, k, v, n, cache.sinks,
                                               cache.windows))
  rows = np.arange(B)
  for i in range(0, 40):
    if i:
      lens = np.asarray(cache.lengths)
      cache = step(cache, k[rows, lens], v[rows, lens])
    lens = np.asarray(cache.lengths)
    if impl != "xla" and i % 13:  # interpret mode is slow: spot checks
      continue
    q = qs[rows, lens - 1]
    np.testing.assert_allclose(decode(q, cache), ref(q, lens),
                               err_msg=f"step {i}", **TOL)


def test_moa_full_spans_equal_dense_and_overflow_is_flagged():
  q, _, k, v, _ = DATA
  full = moa.MoASpans((1e6, 1e6), (0.0, 0.0), min_span=16, round_to=8,
                      sink_size=4)
  cache = moa.MoAKVCache.create(B, N, HKV, D, jnp.float32, full, block=8)
  cache = cache.prefill(k, v, LENGTHS)
  np.testing.assert_allclose(
      jax.jit(lambda q, c: moa.moa_decode(q, c, impl="xla"))(q, cache),
      _dense(q, k, v), **TOL)
  cache = cache.prefill(k, v, np.array([N, 1, 1]))
  with pytest.raises(ValueError, match="full.*\\[0\\]"):
    cache.append(k[:, 0], v[:, 0])
  over = jax.jit(lambda c: c.append(k[:, 0], v[:, 0]))(cache)
  np.testing.assert_array_equal(over.overflowed, [True, False, False])
  np.testing.assert_array_equal(over.lengths, [N, 2, 2])


def test_influence_is_the_exact_loss_change_for_a_linear_loss():
  rng = np.random.default_rng(0)
  a = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 6))), -1)
  w = jnp.asarray(rng.normal(size=(3, 6)))
  loss = lambda a: (w * a).sum()
  e = np.asarray(moa_profile.attention_influence(a, w))
  for i, j in ((0, 2), (1, 5), (2, 0)):
    masked = a.at[i, j].set(0.0)
    masked = masked.at[i].set(masked[i] / masked[i].sum())
    assert float(loss(masked) - loss(a)) == pytest.approx(e[i, j], rel=1e-4)


def test_choose_spans_meets_the_density_budget():
  cands = [(0.0, 0.25), (0.0, 0.5), (0.0, 1.0)]
  # Head 0 loses a lot with short spans, head 1 loses nothing.
  losses = np.array([[[5.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
  template = moa.MoASpans((0.0,), (1.0,), min_span=16, round_to=8,
                          sink_size=4)
  plans, info = moa_profile.choose_spans(
      losses, cands, target_len=256, density_budget=0.6, template=template,
      alpha_scale=256.0)
  assert info["density"] <= 0.6
  # The span goes where it matters: the budget admits beta 0.5 for head 0
  # (1.0 would need 0.25 density left for head 1, below its shortest span).
  assert plans[0].betas == (0.5, 0.25)
  plans, info = moa_profile.choose_spans(
      losses, cands, target_len=256, density_budget=1.0, template=template,
      alpha_scale=256.0)
  assert plans[0].betas == (1.0, 0.25) and info["multiplier"] == 0.0


def test_method_registry_names_and_errors():
  assert {"dense", "quest", "double_sparsity", "tidal", "moa"} <= set(
      methods.method_names())
  assert methods.get_method("quest", token_budget=512).token_budget == 512
  with pytest.raises(ValueError, match="unknown decode method 'nope'"):
    methods.get_method("nope")
  with pytest.raises(ValueError, match="unknown options \\['budget'\\]"):
    methods.get_method("quest", budget=3)
  with pytest.raises(ValueError, match="token_budget must be an int >= 1"):
    methods.get_method("tidal", token_budget=0)
  with pytest.raises(ValueError, match="needs calibrated channels"):
    methods.get_method("double_sparsity").make_cache(3, 1, 8, 1, 8,
                                                     jnp.float32)
