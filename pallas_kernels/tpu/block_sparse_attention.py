"""Block-sparse flash attention for TPU: Pallas with the Mosaic lowering.

The BlockMask lists are scalar-prefetch operands (SMEM), and the k/v (or q)
BlockSpec index_maps read them, so the pipeline DMAs only listed blocks and
the grid never visits an unlisted one. Being operands rather than constants,
a new mask of the same list shapes reuses the compiled kernel.

Rows: (batch, q head, q block) for forward and dQ, and
(batch, q head, kv block) for dK/dV over the transposed lists; the grid is
(rows, list steps), the rows cut into SMEM-sized chunks (`_call`). The
last axis ("arbitrary") walks ONE concatenated list per row: steps [0, Wf)
are the full list, steps [Wf, Wf + Wp) the partial list (dropped when there
is no mask_fn: then every listed block is full). XLA packs it into a single
scalar-prefetch table of (block << 2) | kind (`_step_table`), so an index_map
is one SMEM read. A step past its section's count computes nothing
(`pl.when`) and names a block that is already resident (the lists repeat
their last valid index), so the pipeline issues no DMA for it.
Full blocks skip the element mask; partial ones apply `cfg.mask_fn` on iota
indices, plus the kv_len range when kv_len is not a block multiple.

Layout: q/k/v stay [B, L, H, D] and are viewed as [B, L, H * D] (a free
reshape); a (block, D) tile of head h is block index (b, i, h) on that view,
so no transposes are needed. That needs D % 128 == 0 on hardware: other head
dims are zero-padded to the next multiple of 128 (exact: zero columns add
nothing to q.k and give zero output columns, sliced off). lse and delta
travel as [B, H, L, 1] so each q block sees a (block_q, 1) column.

GQA: the kv index_map reads kv head h // group; dK/dV are computed per q head
and summed over each kv head's group in XLA (as the Triton kernel does).

`attention` (bottom) is the custom_vjp entry used by sparsejax.attention;
`sparsejax.reference.attention_reference` is the definition it must match.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsejax.block_sparse import block_math
from sparsejax.block_sparse import score_mods
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.block_sparse.vjp import make_vjp, walked_lists

NUM_LANES = 128
NUM_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Compiler settings; the block sizes come from the BlockMask.

  Masks default to 128 x 128 blocks, which suit the TPU: block_q fills the
  MXU rows and block_kv the 128 lanes of the score tile.
  """
  # Mark the row grid axis (batch, head, block) "parallel" so megacore chips
  # (v4, v5p) split it across TensorCores; the list axis is "arbitrary".
  megacore: bool = True
  # Scoped VMEM limit for Mosaic; None keeps the compiler default. Raise it
  # for head_dim 256 with large blocks.
  vmem_limit_bytes: Optional[int] = None
  # SMEM bytes for one chunk of the step table (SMEM is 1 MiB on v4..v7);
  # longer tables run as several chunks of rows (see `_call`).
  smem_table_bytes: int = 256 * 1024

  def __post_init__(self):
    if not isinstance(self.megacore, bool):
      raise ValueError(f"megacore must be a bool, got {self.megacore!r}")
    if self.vmem_limit_bytes is not None and (
        not isinstance(self.vmem_limit_bytes, int)
        or self.vmem_limit_bytes < (1 << 20)):
      raise ValueError(f"vmem_limit_bytes must be None or an int >= 1 MiB, "
                       f"got {self.vmem_limit_bytes!r}")
    if not isinstance(self.smem_table_bytes, int) or (
        self.smem_table_bytes < 4 or self.smem_table_bytes > (1 << 20)):
      raise ValueError(f"smem_table_bytes must be an int in [4, 1 MiB], got "
                       f"{self.smem_table_bytes!r}")

  def compiler_params(self) -> pltpu.CompilerParams:
    par = "parallel" if self.megacore else "arbitrary"
    return pltpu.CompilerParams(
        dimension_semantics=(par, "arbitrary"),
        vmem_limit_bytes=self.vmem_limit_bytes)


def validate_blocks(block_q: int, block_kv: int, head_dim: int, *,
                    interpret) -> None:
  """Checks the kernel tile sizes against TPU (8, 128) tiling.

  On hardware: block_q is a sublane dimension (multiple of 8); block_kv is
  the lane dimension of the score tile and head_dim that of the q/k/v tiles
  (multiples of 128). Interpret mode on CPU has no tiling, so any positive
  sizes are allowed there: the shared test suite uses blocks of 16/32 and
  head_dim 16..64, which real TPUs would reject (head_dim is padded to 128
  by `forward`/`backward` on hardware, blocks are not).
  """
  for name, val in (("block_q", block_q), ("block_kv", block_kv),
                    ("head_dim", head_dim)):
    if not isinstance(val, int) or val <= 0:
      raise ValueError(f"{name} must be a positive int, got {val!r}")
  if interpret:
    return
  if block_q % NUM_SUBLANES:
    raise ValueError(f"pallas_tpu needs block_q a multiple of {NUM_SUBLANES} "
                     f"(TPU sublanes), got {block_q}")
  if block_kv % NUM_LANES:
    raise ValueError(f"pallas_tpu needs block_kv a multiple of {NUM_LANES} "
                     f"(TPU lanes), got {block_kv}")
  if head_dim % NUM_LANES:
    raise ValueError(f"pallas_tpu needs head_dim a multiple of {NUM_LANES} "
                     f"(TPU lanes), got {head_dim}")


def _interpret_params(flag):
  """pallas_call's `interpret` for cfg.interpret (False on hardware)."""
  if not flag:
    return False
  if isinstance(flag, pltpu.InterpretParams):
    return flag
  # TPU interpret mode simulates SMEM/VMEM, the DMA pipeline and megacore,
  # and its race detector checks the accumulator/output protocol.
  return pltpu.InterpretParams(detect_races=True)


def _tuning(cfg) -> TuningConfig:
  if cfg.tuning is None:
    return TuningConfig()
  if not isinstance(cfg.tuning, TuningConfig):
    raise ValueError(f"tuning for impl='pallas_tpu' must be a pallas_kernels."
                     f"tpu.block_sparse_attention.TuningConfig, got "
                     f"{type(cfg.tuning).__name__}")
  return cfg.tuning


def _kernel_head_dim(d: int, interpret) -> int:
  return d if interpret else -(-d // NUM_LANES) * NUM_LANES


def _heads_view(x, d_kernel):
  """[B, L, H, D] -> [B, L, H * d_kernel] (zero-padding D)."""
  b, l, h, d = x.shape
  if d_kernel != d:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d_kernel - d)))
  return x.reshape(b, l, h * d_kernel)


def _unview(x, heads, d):
  b, l, _ = x.shape
  return x.reshape(b, l, heads, -1)[..., :d]


# --- the concatenated list --------------------------------------------------

# Step kinds, packed with the block index as (block << 2) | kind: 0 skips,
# k > 0 runs walked list k - 1 (full, partial, seg: `vjp.walked_lists`).
_SKIP = 0


def _step_table(lists, suffix: str, cfg):
  """int32 [B, H, R, S]: what each list step of row (b, h, r) does.

  One concatenated list per row: the walked lists' sections one after the
  other (full Wf steps, then partial Wp when there is a mask_fn, then seg
  when there are segment ids). Packing block and kind into one
  scalar-prefetch operand makes each index_map a single SMEM read. A step
  past its section's count is _SKIP and names the block of the last listed
  step before it (the first listed one if none), which is already resident,
  so the pipeline issues no DMA for it.
  """
  blocks, kinds = [], []
  for k, (name, _, _) in enumerate(walked_lists(cfg)):
    idx = lists[f"{name}_idx{suffix}"]
    count = lists[f"{name}_counts{suffix}"][..., None]
    blocks.append(idx)
    kinds.append(jnp.where(jnp.arange(idx.shape[-1]) < count, k + 1, _SKIP))
  block, kind = jnp.concatenate(blocks, -1), jnp.concatenate(kinds, -1)
  pos = jnp.arange(block.shape[-1])
  listed = jnp.where(kind != _SKIP, pos, -1)
  last = jax.lax.cummax(listed, axis=listed.ndim - 1)
  first = jnp.min(jnp.where(kind != _SKIP, pos, block.shape[-1] - 1), -1,
                  keepdims=True)
  src = jnp.where(last >= 0, last, first)
  return jnp.take_along_axis(block, src, -1) * 4 + kind


def _listed_block(table_ref, c, j):
  return jnp.right_shift(table_ref[c, j], 2)


def _run_step(table_ref, c, j, cfg, body):
  """body(block, use_fn, use_ids) for a listed step (see walked_lists)."""
  entry = table_ref[c, j]
  kind, block = jnp.bitwise_and(entry, 3), jnp.right_shift(entry, 2)
  for k, (_, use_fn, use_ids) in enumerate(walked_lists(cfg)):
    pl.when(kind == k + 1)(
        functools.partial(body, block, use_fn, use_ids))


def _col(ref):
  """A (block, 1) column ref value as the 1-D vector block_math expects."""
  return ref[...][:, 0]


# --- grid rows and SMEM chunks ----------------------------------------------
#
# The grid is (rows in chunk, list steps), a row being a flattened (batch,
# head, block row) triple. The step table lives in SMEM (1 MiB on v4..v7,
# shared with everything else), and at long lengths its B * H * R * S int32
# entries do not fit (32 heads at 32K dense: 8 MB). So rows are cut into
# chunks of at most `TuningConfig.smem_table_bytes`, run by ONE kernel in a
# fori_loop: the chunk's first row is a second scalar-prefetch operand, and
# the outputs are aliased through the loop so each chunk fills its blocks.


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Decodes a flat grid row into (batch, head, block row)."""
  heads: int
  rows: int  # block rows per head: nq (forward, dQ) or nk (dK/dV)

  def decode(self, row):
    # Truncating div/rem on non-negative scalars: no floor sign fix-ups.
    return (jax.lax.div(row, self.heads * self.rows),
            jax.lax.rem(jax.lax.div(row, self.rows), self.heads),
            jax.lax.rem(row, self.rows))

  def spec(self, block_shape, index):
    """BlockSpec whose block is index(b, h, r, listed block)."""

    def index_map(c, j, table_ref, start_ref):
      b, h, r = self.decode(start_ref[0] + c)
      return index(b, h, r, _listed_block(table_ref, c, j))

    return pl.BlockSpec(block_shape, index_map)

  def grid_point(self, start_ref):
    """(b, h, r, c, j): the row, its slot in the chunk and the list step."""
    c, j = pl.program_id(0), pl.program_id(1)
    return (*self.decode(start_ref[0] + c), c, j)


def _is_last_step(j):
  return j == pl.num_programs(1) - 1


def _chunk_rows(n: int, width: int, budget: int) -> int:
  """The largest divisor of n whose table chunk fits the SMEM budget."""
  best = 1
  for c in range(1, n + 1):
    if n % c == 0 and c * width * 4 <= budget:
      best = c
  return best


def _call(kernel, steps, args, *, in_specs, out_specs, out_shape, scratch,
          cfg, interpret, name):
  """kernel(table, start, *args refs, *out refs, *scratch) over all rows."""
  width = steps.shape[-1]
  table = steps.reshape(-1, width)
  n = table.shape[0]
  tuning = _tuning(cfg)
  chunk = _chunk_rows(n, width, tuning.smem_table_bytes)
  n_in, n_out = len(args), len(out_shape)

  def aliased_kernel(table_ref, start_ref, *refs):
    # Drop the aliased output buffers, passed in as (never read) inputs.
    kernel(table_ref, start_ref, *refs[:n_in], *refs[n_in + n_out:])

  call = pl.pallas_call(
      aliased_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(chunk, width),
          in_specs=[*in_specs, *[pl.BlockSpec(memory_space=pl.ANY)] * n_out],
          out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      input_output_aliases={2 + n_in + o: o for o in range(n_out)},
      compiler_params=tuning.compiler_params(),
      interpret=interpret,
      name=name,
  )

  def run_chunk(t, outs):
    start = jnp.asarray(t * chunk, jnp.int32)
    part = jax.lax.dynamic_slice_in_dim(table, start, chunk, 0)
    return tuple(call(part, start[None], *args, *outs))

  outs = tuple(jnp.zeros(o.shape, o.dtype) for o in out_shape)
  if chunk == n:
    return run_chunk(0, outs)
  return jax.lax.fori_loop(0, n // chunk, run_chunk, outs)


class _Geometry:
  """Shapes, kernel head dim and the tiles shared by the three kernels.

  Tiles sit at the grid row's own block ("row") or at the block its list
  step names ("listed"): q blocks for forward/dQ rows, kv blocks for dK/dV.
  """

  def __init__(self, q, k, cfg):
    self.b, self.lq, self.h, self.d = q.shape
    self.lk, hkv = k.shape[1], k.shape[2]
    self.group = self.h // hkv
    self.bq, self.bk = cfg.block_q, cfg.block_kv
    self.interpret = _interpret_params(cfg.interpret)
    self.dp = _kernel_head_dim(self.d, self.interpret)
    validate_blocks(self.bq, self.bk, self.dp, interpret=self.interpret)
    _tuning(cfg)  # reject a foreign tuning object early

  def view(self, x):
    return _heads_view(x, self.dp)

  def unview(self, x):
    return _unview(x, self.h, self.d)

  @staticmethod
  def _pick(which):
    return (lambda r, s: r) if which == "row" else (lambda r, s: s)

  def q_tile(self, rows, which):
    pick = self._pick(which)
    return rows.spec((None, self.bq, self.dp),
                     lambda b, h, r, s: (b, pick(r, s), h))

  def kv_tile(self, rows, which, head_of_q=False):
    pick, g = self._pick(which), 1 if head_of_q else self.group
    return rows.spec((None, self.bk, self.dp),
                     lambda b, h, r, s: (b, pick(r, s), h // g))

  def col_tile(self, rows, which):
    """lse / delta [B, H, Lq, 1] as (block_q, 1) columns."""
    pick = self._pick(which)
    return rows.spec((None, None, self.bq, 1),
                     lambda b, h, r, s: (b, h, pick(r, s), 0))

  def seg_tiles(self, rows, cfg, q_which):
    """q ids [B, Lq, 1] as (block_q, 1) columns and kv ids [B, 1, Lk] as
    (1, block_kv) rows, one at the row's block and one at the listed one."""
    if not cfg.segments:
      return []
    kv_which = "listed" if q_which == "row" else "row"
    qp, kp = self._pick(q_which), self._pick(kv_which)
    return [rows.spec((None, self.bq, 1), lambda b, h, r, s: (b, qp(r, s), 0)),
            rows.spec((None, 1, self.bk), lambda b, h, r, s: (b, 0, kp(r, s)))]


def _seg_args(lists, cfg):
  if not cfg.segments:
    return ()
  return lists["q_segments"][..., None], lists["kv_segments"][:, None, :]


def _seg_names(cfg):
  return ("q_seg", "kv_seg") if cfg.segments else ()


def _param_specs(params):
  """Mod params as whole arrays in SMEM: scalar reads at dynamic indices."""
  return [pl.BlockSpec(memory_space=pltpu.SMEM) for _ in params]


def _param_names(params):
  return tuple(f"param{j}" for j in range(len(params)))


def _mod(cfg, r):
  n = 0 if cfg.score_mod is None else cfg.score_mod.num_leaves
  return score_mods.rebuild(cfg.score_mod, [r[f"param{j}"] for j in range(n)])


def _tile(cfg, mod, r, b, h, q_start, kv_start, use_fn, use_ids):
  """(element mask or None, mod coordinates or None) of the resident tiles."""
  bq, bk = cfg.block_q, cfg.block_kv
  ids = (r["q_seg"][...], r["kv_seg"][...]) if use_ids else None
  vis = block_math.element_mask(cfg.mask_fn if use_fn else None, b, h,
                                q_start, kv_start, bq, bk, cfg.kv_len,
                                cfg.kv_len % bk != 0, ids)
  at = (None if mod is None else
        block_math.coords(b, h, q_start, kv_start, bq, bk))
  return vis, at


# --- forward ----------------------------------------------------------------


def _fwd_kernel(table_ref, start_ref, *refs, names, cfg, rows):
  r = dict(zip(names, refs))
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i, c, j = rows.grid_point(start_ref)
  mod = _mod(cfg, r)
  m_ref, l_ref, acc_ref = r["m"], r["l"], r["acc"]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(kv_block, use_fn, use_ids):
    vis, at = _tile(cfg, mod, r, b, h, i * bq, kv_block * bk, use_fn,
                    use_ids)
    s = block_math.scores(r["q"][...], r["k"][...], cfg.scale, cfg.soft_cap,
                          mod, at)
    m, l, acc = block_math.online_softmax_step(
        s, r["v"][...], _col(m_ref), _col(l_ref), acc_ref[...], vis)
    m_ref[...] = m[:, None]
    l_ref[...] = l[:, None]
    acc_ref[...] = acc

  _run_step(table_ref, c, j, cfg, body)

  @pl.when(_is_last_step(j))
  def _finish():
    out, lse = block_math.finalize(_col(m_ref), _col(l_ref), acc_ref[...],
                                   r["o"].dtype)
    r["o"][...] = out
    r["lse"][...] = lse[:, None]


def forward(q, k, v, lists, params, cfg):
  g = _Geometry(q, k, cfg)
  rows = _Rows(g.h, g.lq // g.bq)
  names = ("q", "k", "v", *_seg_names(cfg), *_param_names(params), "o",
           "lse", "m", "l", "acc")
  out, lse = _call(
      functools.partial(_fwd_kernel, names=names, cfg=cfg, rows=rows),
      _step_table(lists, "", cfg),
      (g.view(q), g.view(k), g.view(v), *_seg_args(lists, cfg), *params),
      in_specs=[g.q_tile(rows, "row"), g.kv_tile(rows, "listed"),
                g.kv_tile(rows, "listed"), *g.seg_tiles(rows, cfg, "row"),
                *_param_specs(params)],
      out_specs=[g.q_tile(rows, "row"), g.col_tile(rows, "row")],
      out_shape=[jax.ShapeDtypeStruct((g.b, g.lq, g.h * g.dp), q.dtype),
                 jax.ShapeDtypeStruct((g.b, g.h, g.lq, 1), jnp.float32)],
      scratch=[pltpu.VMEM((g.bq, 1), jnp.float32),
               pltpu.VMEM((g.bq, 1), jnp.float32),
               pltpu.VMEM((g.bq, g.dp), jnp.float32)],
      cfg=cfg, interpret=g.interpret, name="sparsejax_block_sparse_fwd_tpu")
  return g.unview(out), lse[..., 0]


# --- backward: dQ (and the score mod's statistics) over row lists ------------


def _dq_kernel(table_ref, start_ref, *refs, names, cfg, rows, width):
  r = dict(zip(names, refs))
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i, c, j = rows.grid_point(start_ref)
  mod = _mod(cfg, r)
  acc_ref = r["acc"]

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    if width:
      r["stats_acc"][...] = jnp.zeros(r["stats_acc"].shape, jnp.float32)

  def body(kv_block, use_fn, use_ids):
    k = r["k"][...]
    vis, at = _tile(cfg, mod, r, b, h, i * bq, kv_block * bk, use_fn,
                    use_ids)
    s_raw = block_math.raw_scores(r["q"][...], k)
    _, gs, ds = block_math.grads_from_raw(
        s_raw, r["v"][...], r["do"][...], _col(r["lse"]), _col(r["delta"]),
        cfg.scale, cfg.soft_cap, vis, mod, at)
    acc_ref[...] += jax.lax.dot(ds.astype(k.dtype), k,
                                precision=block_math.dot_precision(k.dtype),
                                preferred_element_type=jnp.float32)
    if width:
      stats = mod.tile_stats(gs, s_raw * cfg.scale, *at, width)
      r["stats_acc"][...] += stats.reshape(1, width)

  _run_step(table_ref, c, j, cfg, body)

  @pl.when(_is_last_step(j))
  def _finish():
    r["dq"][...] = acc_ref[...].astype(r["dq"].dtype)
    if width:
      r["stats"][...] = r["stats_acc"][...]


def _stats_width(cfg, params) -> int:
  if cfg.score_mod is None:
    return 0
  n = score_mods.rebuild(cfg.score_mod, params).num_stats
  return next_power_of_2(n) if n else 0


def backward_dq(q, k, v, do, lse, delta, lists, params, cfg):
  """(dQ [B, Lq, H, D], the mod params' cotangents): the forward's grid over
  the row lists; each row also sums its tiles' score-mod statistics."""
  g = _Geometry(q, k, cfg)
  rows = _Rows(g.h, g.lq // g.bq)
  width = _stats_width(cfg, params)
  out_specs = [g.q_tile(rows, "row")]
  out_shape = [jax.ShapeDtypeStruct((g.b, g.lq, g.h * g.dp), q.dtype)]
  scratch = [pltpu.VMEM((g.bq, g.dp), jnp.float32)]
  if width:  # [B, H, nq, 1, width]: one row of statistics per q block
    out_specs.append(rows.spec((None, None, None, 1, width),
                               lambda b, h, r, s: (b, h, r, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((g.b, g.h, g.lq // g.bq, 1, width),
                                          jnp.float32))
    scratch.append(pltpu.VMEM((1, width), jnp.float32))
  names = ("q", "k", "v", "do", "lse", "delta", *_seg_names(cfg),
           *_param_names(params), "dq", *(("stats",) if width else ()),
           "acc", *(("stats_acc",) if width else ()))
  res = _call(
      functools.partial(_dq_kernel, names=names, cfg=cfg, rows=rows,
                        width=width),
      _step_table(lists, "", cfg),
      (g.view(q), g.view(k), g.view(v), g.view(do.astype(q.dtype)),
       lse[..., None], delta[..., None], *_seg_args(lists, cfg), *params),
      in_specs=[g.q_tile(rows, "row"), g.kv_tile(rows, "listed"),
                g.kv_tile(rows, "listed"), g.q_tile(rows, "row"),
                g.col_tile(rows, "row"), g.col_tile(rows, "row"),
                *g.seg_tiles(rows, cfg, "row"), *_param_specs(params)],
      out_specs=out_specs, out_shape=out_shape, scratch=scratch,
      cfg=cfg, interpret=g.interpret, name="sparsejax_block_sparse_dq_tpu")
  dparams = (None,) * len(params)
  if width:
    mod = score_mods.rebuild(cfg.score_mod, params)
    stats = score_mods.tree_sum(res[1][:, :, :, 0, :mod.num_stats], 2)
    dparams = tuple(mod.stats_to_grads(stats))
  return g.unview(res[0]), dparams


# --- backward: dK/dV over column lists --------------------------------------


def _dkv_kernel(table_ref, start_ref, *refs, names, cfg, rows):
  r = dict(zip(names, refs))
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, kv_block, c, j = rows.grid_point(start_ref)
  mod = _mod(cfg, r)
  dk_acc, dv_acc = r["dk_acc"], r["dv_acc"]

  @pl.when(j == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def body(q_block, use_fn, use_ids):
    q, do = r["q"][...], r["do"][...]
    vis, at = _tile(cfg, mod, r, b, h, q_block * bq, kv_block * bk, use_fn,
                    use_ids)
    p, _, ds = block_math.probs_and_grads(
        q, r["k"][...], r["v"][...], do, _col(r["lse"]), _col(r["delta"]),
        cfg.scale, cfg.soft_cap, vis, mod, at)
    prec = block_math.dot_precision(q.dtype)
    dims = (((0,), (0,)), ((), ()))  # ds^T @ q and p^T @ do
    dk_acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, dims,
                                       precision=prec,
                                       preferred_element_type=jnp.float32)
    dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, dims,
                                       precision=prec,
                                       preferred_element_type=jnp.float32)

  _run_step(table_ref, c, j, cfg, body)

  @pl.when(_is_last_step(j))
  def _finish():
    r["dk"][...] = dk_acc[...].astype(r["dk"].dtype)
    r["dv"][...] = dv_acc[...].astype(r["dv"].dtype)


def backward_dkv(q, k, v, do, lse, delta, lists, params, cfg):
  """(dK, dV) [B, Lk, Hkv, D]: per q head over the transposed lists."""
  g = _Geometry(q, k, cfg)
  rows = _Rows(g.h, g.lk // g.bk)
  # Per-q-head partials are summed per kv head below: keep them in f32.
  dtype = k.dtype if g.group == 1 else jnp.float32
  names = ("k", "v", "q", "do", "lse", "delta", *_seg_names(cfg),
           *_param_names(params), "dk", "dv", "dk_acc", "dv_acc")
  dk, dv = _call(
      functools.partial(_dkv_kernel, names=names, cfg=cfg, rows=rows),
      _step_table(lists, "_t", cfg),
      (g.view(k), g.view(v), g.view(q), g.view(do.astype(q.dtype)),
       lse[..., None], delta[..., None], *_seg_args(lists, cfg), *params),
      in_specs=[g.kv_tile(rows, "row"), g.kv_tile(rows, "row"),
                g.q_tile(rows, "listed"), g.q_tile(rows, "listed"),
                g.col_tile(rows, "listed"), g.col_tile(rows, "listed"),
                *g.seg_tiles(rows, cfg, "listed"), *_param_specs(params)],
      out_specs=[g.kv_tile(rows, "row", head_of_q=True)] * 2,
      out_shape=[jax.ShapeDtypeStruct((g.b, g.lk, g.h * g.dp), dtype)] * 2,
      scratch=[pltpu.VMEM((g.bk, g.dp), jnp.float32)] * 2,
      cfg=cfg, interpret=g.interpret, name="sparsejax_block_sparse_dkv_tpu")
  dk, dv = g.unview(dk), g.unview(dv)
  if g.group > 1:  # sum the q heads of each kv head
    shape = (g.b, g.lk, g.h // g.group, g.group, g.d)
    dk = dk.reshape(shape).sum(3).astype(k.dtype)
    dv = dv.reshape(shape).sum(3).astype(v.dtype)
  return dk, dv


def backward(q, k, v, out, lse, do, delta, lists, params, cfg):
  del out
  dq, dparams = backward_dq(q, k, v, do, lse, delta, lists, params, cfg)
  dk, dv = backward_dkv(q, k, v, do, lse, delta, lists, params, cfg)
  return dq, dk, dv, dparams


attention = make_vjp(forward, backward)
