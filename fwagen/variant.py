"""Kernel variants as data.

A variant is a frozen dataclass: the problem it computes plus the tuning knobs. Its `key()` is derived
from its fields and is its only identity: it names the kernel symbol, the compile-cache entry, the tuned
YAML entry and log lines. Every derived number (threads, shared memory, padded sizes) is computed here,
never in a template.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache

from .problem import Problem, pad_to

ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
CUDA_TYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
# The log-sum-exp the forward saves for the backward: float32, but float64 for float32 inputs, whose backward
# recomputes P = exp(S - lse): one rounding of a float32 lse near 10 moves every P of its row by 5e-7 relative,
# several times eager PyTorch's float32 error (measured: dbias 1.6-3.7x eager's max error, bench/accuracy_backward.py).
LSE_TYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float64"}
MMA_TYPE = {"float16": "f16", "bfloat16": "bf16"}
# Rows of shared-memory tiles are padded by 16 bytes so that ldmatrix rows fall in distinct banks.
SMEM_ROW_PAD_BYTES = 16
# Shared memory a block may opt into, by architecture.
MAX_SMEM_PER_BLOCK = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
DEFAULT_MAX_SMEM = 99 * 1024


@dataclass(frozen=True)
class ForwardVariant:
    """Tensor-core forward (fp16/bf16, mma.sync m16n8k16, fp32 accumulation).

    A block owns one (head, mask window) pair and one chunk of `query_chunk` query rows, and walks over
    the windows that share that pair, `windows_per_block` at a time; the bias and mask of its rows are
    read once into shared memory. Each warp owns `rows_per_warp` query rows of one window and streams
    its keys in tiles of `key_tile`; `stages` = 2 loads the next tile (or the next windows) while the
    current one computes.
    """

    problem: Problem
    windows_per_block: int = 1
    query_chunk: int = 64  # query rows of one item handled by one block
    rows_per_warp: int = 16  # 16 or 32: query rows (m16 tiles) owned by one warp
    key_tile: int = 64
    stages: int = 1
    min_blocks: int = 1  # __launch_bounds__ minimum blocks per SM: caps registers to raise occupancy

    kind = "mma"
    stream_add = False  # the (bias + mask) term resident for the block's query chunk (ForwardStreamVariant: streamed)
    wgmma = False  # products by mma.sync (ForwardWgmmaVariant: by warpgroup MMA)
    tensor_maps = False  # K and V copied by the block's threads (ForwardWgmmaTmaVariant: by TMA)

    # --- identity -------------------------------------------------------------------------------
    def knobs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "problem"}

    def key(self) -> str:
        cached = self.__dict__.get("_key")  # computed once: the launch path asks for it on every call
        if cached is None:
            knobs = "_".join(f"{abbrev(name)}{int(value)}" for name, value in self.knobs().items())
            cached = f"fwagen_{self.kind}_{self.problem.key()}_{knobs}"
            object.__setattr__(self, "_key", cached)
        return cached

    def to_dict(self) -> dict:
        return {"kind": self.kind, "problem": asdict(self.problem), **self.knobs()}

    # --- derived numbers ------------------------------------------------------------------------
    @property
    def n_pad(self) -> int:
        return pad_to(self.problem.n, 16)

    @property
    def head_dim_pad(self) -> int:
        return pad_to(self.problem.head_dim, 16)

    @property
    def chunks_per_item(self) -> int:
        return -(-self.n_pad // self.query_chunk)

    @property
    def key_tiles(self) -> int:
        return -(-self.n_pad // self.key_tile)

    @property
    def m_tiles_per_warp(self) -> int:
        return self.rows_per_warp // 16

    @property
    def warps_per_item(self) -> int:
        return self.query_chunk // self.rows_per_warp

    @property
    def warps(self) -> int:
        return self.windows_per_block * self.warps_per_item

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def smem_row_elems(self) -> int:
        return self.head_dim_pad + SMEM_ROW_PAD_BYTES // ELEMENT_BYTES[self.problem.dtype]

    @property
    def kv_row_elems(self) -> int:
        """Row pitch of the K and V tiles: padded for ldmatrix, or unpadded in wgmma's swizzled layout."""
        return self.head_dim_pad if self.wgmma else self.smem_row_elems

    @property
    def mma_type(self) -> str:
        return MMA_TYPE[self.problem.dtype]

    @property
    def logit_add_bytes(self) -> int:
        """The block's (bias + mask) term: its query chunk x every key tile, float32."""
        return self.query_chunk * self.key_tiles * self.key_tile * 4

    @property
    def add_pitch(self) -> int:
        """Row pitch, in floats, of a streamed bias or mask tile: 8 mod 32, so that a warp's float2 reads of
        eight rows are conflict-free."""
        return pad_to(self.key_tile, 32) + 8

    @property
    def smem_bytes(self) -> int:
        stage_elems = self.windows_per_block * (self.query_chunk * self.smem_row_elems
                                                + 2 * self.key_tile * self.kv_row_elems)
        tiles = self.stages * stage_elems * ELEMENT_BYTES[self.problem.dtype]
        return (tiles + self.logit_add_bytes + (WGMMA_ALIGN_BYTES if self.wgmma else 0)
                + (TMA_BARRIER_BYTES if self.tensor_maps else 0))

    def grid(self, windows: int, heads: int, mask_windows: int, resident_blocks: int) -> tuple[int, int]:
        """(blocks, splits) for a call: each (head, mask window, query chunk) owner gets `splits` blocks
        walking its window groups with that stride (`resident_blocks` is how many blocks the GPU holds at
        once). See `choose_splits`."""
        pair_windows = max(mask_windows, 1)
        owners = heads * pair_windows * self.chunks_per_item
        groups = -(-(windows // pair_windows) // self.windows_per_block)
        if groups == 0:
            return 0, 1
        splits = choose_splits(owners, groups, resident_blocks)
        return owners * splits, splits


@dataclass(frozen=True)
class ForwardStreamVariant(ForwardVariant):
    """ForwardVariant whose (bias + mask) term streams with the key tiles instead of staying resident.

    A resident term holds the block's query chunk against every key: 147 KB of shared memory for 64 rows at window
    24, one block of a few warps per multiprocessor. Streamed, each step's bias and mask tiles (query chunk x key
    tile, float32 as given) load beside its K and V tiles, shared by the block's windows, and the sum is formed
    where it is read: more L2 traffic, far less shared memory, more warps to hide latency.
    """

    kind = "mma_stream"
    template = "fwd_mma.cu.j2"
    stream_add = True

    @property
    def logit_add_bytes(self) -> int:
        adds = int(self.problem.has_bias) + int(self.problem.has_mask)
        return self.stages * adds * self.query_chunk * self.add_pitch * 4

    def grid(self, windows: int, heads: int, mask_windows: int, resident_blocks: int) -> tuple[int, int]:
        """(blocks, 1): one wave, each block an even share of the units of work (one owner's window group each),
        since no block fills a term of its owner's (the template says more). The kernel takes its share from
        gridDim."""
        pair_windows = max(mask_windows, 1)
        groups = -(-(windows // pair_windows) // self.windows_per_block)
        units = heads * pair_windows * self.chunks_per_item * groups
        blocks = min(units, resident_blocks)
        if units * self.key_tiles + blocks >= 2**31:  # the kernel counts units and steps in 32 bits
            raise ValueError(f"q: {windows} windows x {heads} heads is more work than one launch indexes")
        return blocks, 1


# wgmma reads K and V through descriptors of the 64-byte swizzle, whose tiles start 1024-byte aligned: the kernel
# rounds its shared-memory base up, into this much room. Where TMA brings those tiles, a stage's copies complete on an
# 8-byte mbarrier after the term (two stages at most).
WGMMA_ALIGN_BYTES = 1024
TMA_BARRIER_BYTES = 16


class _WarpgroupProducts:
    """Mixin: the forward's two products by warpgroup MMA (wgmma, sm_90a) instead of mma.sync.

    Four consecutive warps of one window form a warpgroup; S = Q K^T and O += P V are each one instruction a 16-column
    (or 16-key) step for 64 rows (16 of each warp: two instructions where warps hold 32), K and V read by descriptor
    from tiles in the 64-byte swizzle (`templates/wgmma.cuh`), A (Q, then P) from registers as before. Everything
    else (the term, the online softmax, the loads, the grid) is the mma.sync variant's. Legal for head dims of 17-32
    (padded to 32), fp16 and bf16, on sm_90 only (`fwagen/space.py`); the layouts were checked on an H100 by
    bench/wgmma_probe.py, the kernels timed by bench/wgmma_forward.py.
    """

    wgmma = True
    template = "fwd_mma.cu.j2"
    arch_suffix = "a"  # wgmma needs the architecture-specific target (sm_90a)


class _TensorMemoryAccelerator:
    """Mixin: K and V tiles brought by TMA instead of the block's own cp.async copies.

    One thread issues a stage's copies through tensor maps of k and v (`fwagen/launch.py` encodes them each call:
    boxes of key_tile rows of 32 columns, in the 64-byte swizzle, zeros past N and past d) and arms the stage's
    mbarrier, on which every thread waits; no per-thread copy addresses, and no proxy fence before wgmma reads them.
    Measured on an H100 (bench/results/nvidia-h100-80gb-hbm3-forward-tma.md): 4-7% faster at window 24, up to 8%
    slower at window 16's picks, so both kinds stay in the space.
    """

    tensor_maps = True


@dataclass(frozen=True)
class ForwardWgmmaVariant(_WarpgroupProducts, ForwardVariant):
    """ForwardVariant with its products by wgmma (the term resident)."""

    kind = "wgmma"


@dataclass(frozen=True)
class ForwardWgmmaStreamVariant(_WarpgroupProducts, ForwardStreamVariant):
    """ForwardStreamVariant with its products by wgmma (the term streamed)."""

    kind = "wgmma_stream"


@dataclass(frozen=True)
class ForwardWgmmaTmaVariant(_TensorMemoryAccelerator, ForwardWgmmaVariant):
    """ForwardWgmmaVariant with K and V by TMA."""

    kind = "wgmma_tma"


@dataclass(frozen=True)
class ForwardWgmmaStreamTmaVariant(_TensorMemoryAccelerator, ForwardWgmmaStreamVariant):
    """ForwardWgmmaStreamVariant with K and V by TMA."""

    kind = "wgmma_stream_tma"


def tma_twin(variant) -> Variant | None:
    """The variant of the same knobs with K and V by TMA, for a wgmma variant that copies them itself; else None."""
    twin = {ForwardWgmmaVariant: ForwardWgmmaTmaVariant, ForwardWgmmaStreamVariant: ForwardWgmmaStreamTmaVariant}
    cls = twin.get(type(variant))
    return None if cls is None else cls(variant.problem, **variant.knobs())


# A block's fixed cost (its bias and mask term, the first load nothing overlaps) in window groups.
BLOCK_OVERHEAD_GROUPS = 2


@lru_cache(maxsize=4096)
def choose_splits(owners: int, groups: int, resident_blocks: int) -> int:
    """Blocks per owner minimising waves x (window groups per block + a block's fixed cost).

    Rounding owners x splits up past what the GPU holds leaves a nearly empty last wave that costs a whole
    wave's time (measured: 0.68 ms against 0.47 for 16 owners on 132 SMs); more, smaller blocks shrink it.
    """
    def cost(splits: int) -> int:
        waves = -(-owners * splits // resident_blocks)
        return waves * (-(-groups // splits) + BLOCK_OVERHEAD_GROUPS)

    limit = min(groups, 8 * -(-resident_blocks // owners))
    return min(range(1, limit + 1), key=lambda splits: (cost(splits), splits))


@dataclass(frozen=True)
class SimtVariant:
    """CUDA-core forward for any dtype, float32 accurate to float32 (no TF32).

    `threads_per_row` threads share one query row, each holding head_dim / threads_per_row columns of q
    and o; a block owns `query_chunk` rows of one item and streams keys in tiles of `key_tile`.
    """

    problem: Problem
    query_chunk: int = 64
    threads_per_row: int = 4
    key_tile: int = 64

    kind = "simt"
    tensor_maps = False

    knobs = ForwardVariant.knobs
    key = ForwardVariant.key
    to_dict = ForwardVariant.to_dict

    @property
    def n_pad(self) -> int:
        return pad_to(self.problem.n, 16)

    @property
    def chunks_per_item(self) -> int:
        return -(-self.problem.n // self.query_chunk)

    @property
    def cols_per_thread(self) -> int:
        return self.problem.head_dim // self.threads_per_row

    @property
    def threads(self) -> int:
        return self.query_chunk * self.threads_per_row

    @property
    def smem_bytes(self) -> int:
        return 2 * self.key_tile * self.problem.head_dim * 4  # K and V tiles, staged as float

    def grid(self, windows: int, heads: int, mask_windows: int, resident_blocks: int) -> tuple[int, int]:
        return windows * heads * self.chunks_per_item, 1


LARGE_BACKWARD_FROM = 96  # padded window size past which the whole-window backward uses its large-window layout
DBIAS_SMEM_GROUPS = 3  # groups of a lane's dbias sums that the masked large-window backward keeps in shared memory


@dataclass(frozen=True)
class BackwardVariant:
    """Tensor-core backward (fp16/bf16) for windows whose padded size fits one tile (up to 144 tokens).

    A block owns one (head, mask window) pair and walks its windows (past 96 tokens with a mask, a share of one
    head's windows across mask windows: `shares_mask_windows`); warp w recomputes P for query rows [16w, 16w+16),
    forms dS and dQ, then computes dK and dV for key rows [16w, 16w+16) from P and dS staged in shared memory (past
    96 tokens, dV or dK of 32 keys a warp instead: `key_gradients_from_staged`). dbias is summed over the block's
    windows and written once per block: in shared memory up to 96 tokens (bwd_mma.cu.j2), in
    registers past that (bwd_mma_large.cu.j2, `large_window`).
    """

    problem: Problem
    stages: int = 1
    min_blocks: int = 1

    kind = "bwd_mma"
    prepass = None  # computes D = rowsum(dO * O) itself

    knobs = ForwardVariant.knobs
    key = ForwardVariant.key
    to_dict = ForwardVariant.to_dict
    n_pad = ForwardVariant.n_pad
    head_dim_pad = ForwardVariant.head_dim_pad
    smem_row_elems = ForwardVariant.smem_row_elems

    @property
    def threads(self) -> int:
        return 32 * (self.n_pad // 16)

    @property
    def large_window(self) -> bool:
        """Past 96 tokens the layout of small windows (`stages` stages of q, k, v, dO and O, and the dbias sums in
        shared memory) outgrows shared memory: one stage of q, k, v and dO then, O read from global memory a window
        ahead, dbias summed in registers and P and dS formed 16 keys at a time (bwd_mma_large.cu.j2)."""
        return self.n_pad > LARGE_BACKWARD_FROM

    @property
    def template(self) -> str:
        return "bwd_mma_large.cu.j2" if self.large_window else "bwd_mma.cu.j2"

    @property
    def smem_bytes(self) -> int:
        if self.large_window:
            return self._large_window_smem_bytes(self.dbias_smem_groups)
        tile, staged, logit_add = self._smem_parts()
        return self.stages * 5 * tile + staged + logit_add + self.n_pad * self.n_pad * 4  # + the dbias sums

    def _smem_parts(self) -> tuple[int, int, int]:
        """Bytes of one q/k/v/dO/O tile, of the staged P and dS tiles, and of the float32 (bias + mask) term."""
        elem = ELEMENT_BYTES[self.problem.dtype]
        return (self.n_pad * self.smem_row_elems * elem, 2 * self.n_pad * (self.n_pad + 8) * elem,
                self.n_pad * self.n_pad * 4)

    def _large_window_smem_bytes(self, dbias_groups: int) -> int:
        tile, staged, logit_add = self._smem_parts()
        return 4 * tile + staged + logit_add + dbias_groups * 4 * self.threads * 4  # q, k, v, dO; some dbias sums

    @property
    def dbias_smem_groups(self) -> int:
        """Large-window layout with a bias and a mask: how many of a lane's NP / 8 groups of four dbias sums live in
        shared memory rather than registers (bwd_mma_large.cu.j2). At 168 registers a thread (9 warps) ptxas keeps
        some of the 72 sums in local memory at window 12, loading and storing them at every window; 3 groups in
        shared memory made the masked training step 3-5 us faster on an H100 and the unmasked one 15-17 us slower
        (bench/results/nvidia-h100-80gb-hbm3-backward-mask-overhead.md and ...-backward-mask-dbias-smem.md). So only
        the masked kernel of 9 warps (129-144 tokens; with 8 or fewer the register file leaves a thread 255) takes
        them, and only where they keep it within the smallest shared-memory limit it fitted before (227 KB a block at
        head_dim 32 on an H100): no GPU loses the whole-window kernel to them."""
        if not (self.large_window and self.problem.has_bias and self.problem.has_mask and self.threads > 256):
            return 0
        without = self._large_window_smem_bytes(0)
        limits = [limit for limit in sorted({DEFAULT_MAX_SMEM, *MAX_SMEM_PER_BLOCK.values()}) if limit >= without]
        fits = limits and self._large_window_smem_bytes(DBIAS_SMEM_GROUPS) <= limits[0]
        return DBIAS_SMEM_GROUPS if fits else 0

    @property
    def shares_mask_windows(self) -> bool:
        """Whether a block's windows run across mask windows (the large-window layout with a mask: MaskWindowShare in
        mma_tiles.cuh), not one (head, mask window) pair's."""
        return self.large_window and self.problem.has_mask

    def grid(self, windows: int, heads: int, mask_windows: int, resident_blocks: int) -> tuple[int, int]:
        if self.shares_mask_windows:  # `splits` shares of each head's windows, as many as `choose_splits` finds best
            if windows == 0:
                return 0, 1
            splits = choose_splits(heads, windows, resident_blocks)
            return heads * splits, splits
        # Whole (head, mask window) pairs per block keep dbias one partial sum per block; as many splits of
        # each pair's windows as fit in one wave (rounding down: a second, nearly empty wave would cost a
        # whole wave's time).
        pair_windows = max(mask_windows, 1)
        pairs = heads * pair_windows
        splits = max(1, min(windows // pair_windows, resident_blocks // pairs))
        return pairs * splits, splits

    def dbias_partials(self, heads: int, mask_windows: int, splits: int) -> tuple[int, ...]:
        """Shape of the float32 partial sums, one per block, as (outer, heads, inner, N, N) (DbiasSumVariant sums
        outer and inner): block i writes partial i."""
        n = self.problem.n
        if self.shares_mask_windows:  # block h * splits + split
            return 1, heads, splits, n, n
        return max(mask_windows, 1), heads, splits, n, n  # block (mask window * heads + head) * splits + split


# dbias partial sums of the split backward kernels stay under this many bytes: they are the one buffer of those
# kernels that grows with the number of splits, and the peak memory of a training step should not.
DBIAS_PARTIAL_BUDGET_BYTES = 128 * 2**20
# The tiled kernel's dQ blocks read and write their part of the partial sums at every step: kept within an H100's
# 50 MB L2, those reads stay out of DRAM (measured at window 24: 42 MB of partials as fast as 10, 85 MB 20% slower).
TILE_DBIAS_PARTIAL_BYTES = 48 * 2**20


@lru_cache(maxsize=4096)
def choose_tile_splits(owners: int, images: int, pair_windows: int, windows_per_block: int, resident_blocks: int,
                       max_splits: int) -> int:
    """Splits of the images for the tiled backward's dQ blocks: the fewest with the least estimated time, in units of
    one window group's step, which a dQ and a dK/dV block take alike:
      * a dQ block walks pair_windows x G groups of WPB windows (G = ceil(images / splits / WPB)) in sequence, and
        the dQ blocks come in ceil(owners x splits / resident) waves: that chain bounds the launch from below;
      * all blocks together (the dQ blocks' group slots, idle ones included, and one group each for the dK/dV
        blocks) over the resident blocks bound it too.
    On an H100's measurement (tests/data/h100_tile_backward_splits.json) the split count of least cost ran within 7%
    of the fastest (within 1.5% in 11 of 12 variants), over split counts whose times differ 4x."""
    kv_groups = owners * pair_windows * -(-images // windows_per_block)

    def cost(splits: int) -> float:
        images_per_split = -(-images // splits)
        groups = -(-images_per_split // windows_per_block)
        chain = -(-owners * splits // resident_blocks) * pair_windows * groups
        return max(chain, (owners * splits * pair_windows * groups + kv_groups) / resident_blocks)

    return min(range(1, max(1, min(images, max_splits)) + 1), key=lambda splits: (cost(splits), splits))


class _SplitBackward:
    """What the split backward kernels share: one launch of dQ blocks (each walking the windows of a split and
    summing its part of dbias into a float32 partial sum of its own) and then dK/dV blocks; a block owns
    `own_rows` rows of a window (queries or keys) and stages the other side's rows `tile_rows` at a time."""

    knobs = ForwardVariant.knobs
    key = ForwardVariant.key
    to_dict = ForwardVariant.to_dict
    n_pad = ForwardVariant.n_pad

    @property
    def chunks_per_item(self) -> int:
        return -(-self.problem.n // self.own_rows)

    def dbias_partials(self, heads: int, mask_windows: int, splits: int) -> tuple[int, ...]:
        """Shape of the float32 partial sums, one per split, as (outer, heads, inner, N, N) (DbiasSumVariant sums
        outer and inner); (0,) without a bias."""
        n = self.problem.n
        return (splits, heads, 1, n, n) if self.problem.has_bias else (0,)


@dataclass(frozen=True)
class BackwardSimtVariant(_SplitBackward):
    """CUDA-core backward for any dtype, window size and head dim, float32 arithmetic (no TF32).

    One launch runs two kinds of block, neither needing the other's results:
      * dQ blocks (the first heads x chunks x splits): a block owns `own_rows` query rows of one head and walks
        the windows of its split; per window it recomputes P and dS against every key, forms dQ, and adds dS
        into its rows of its split's float32 dbias partial sum (in global memory, owned by this block alone);
      * dK/dV blocks (one per window, head and chunk of `own_rows` keys) recompute P and dS against every query
        row and form dK and dV.
    `threads_per_row` threads share a row (head_dim / threads_per_row columns each); the other side's rows are
    staged through shared memory `tile_rows` at a time.
    """

    problem: Problem
    own_rows: int = 64
    threads_per_row: int = 2
    tile_rows: int = 32

    kind = "bwd_simt"
    prepass = None  # computes D = rowsum(dO * O) itself

    @property
    def cols_per_thread(self) -> int:
        return self.problem.head_dim // self.threads_per_row

    @property
    def threads(self) -> int:
        return self.own_rows * self.threads_per_row

    @property
    def smem_bytes(self) -> int:
        problem = self.problem
        staged = 2 * self.tile_rows * problem.head_dim * 4  # K and V (dQ blocks) or Q and dO (dK/dV blocks)
        tile = self.own_rows * (self.tile_rows + 1) * 4  # one [own_rows][tile_rows] float tile, padded
        dq_extra = tile * ((problem.has_bias or problem.has_mask) + problem.has_bias)  # (bias + mask), and dS
        return staged + max(dq_extra, self.tile_rows * (8 + 4))  # (dK/dV blocks: the staged rows' lse (double), D)

    def grid(self, windows: int, heads: int, mask_windows: int, resident_blocks: int) -> tuple[int, int]:
        """(blocks, splits): dQ blocks first (they run longest), then one dK/dV block per window, head and chunk.
        Without a bias every dQ block takes one window; with one, splits are bounded by the resident blocks
        (more buys no parallelism) and by the dbias partials' memory."""
        if windows == 0:
            return 0, 1
        owners = heads * self.chunks_per_item
        splits = windows
        if self.problem.has_bias:
            by_memory = DBIAS_PARTIAL_BUDGET_BYTES // (heads * self.problem.n ** 2 * 4)
            splits = max(1, min(windows, by_memory, -(-4 * resident_blocks // owners)))
        return owners * splits + windows * owners, splits


@dataclass(frozen=True)
class BackwardTileVariant(_SplitBackward):
    """Tensor-core backward (fp16/bf16) for windows of any size: the other side's rows come `tile_rows` at a time.

    One launch runs two kinds of block, neither needing the other's results, after a prepass (`prepass`) that forms
    D = rowsum(dO * O) of every row:
      * dQ blocks (the first heads x chunks x splits): `own_rows` query rows of one head (16 a warp) over the images
        of a split, `windows_per_block` windows of one mask window at a time (a set of warps each, sharing the bias
        and mask tiles); per key tile they recompute P and dS, accumulate dQ = dS K, and add the sets' dS, summed in
        a fixed order, into the split's float32 dbias partial (global memory, each element owned by one thread);
      * dK/dV blocks (per `windows_per_block` windows of one mask window, head and chunk of `own_rows` keys) compute
        S^T and dP^T per query tile, so that P^T and dS^T feed dV = P^T dO and dK = dS^T Q from registers.
    Both are two-stage cp.async pipelines: the next tile's operands load while the current one computes.
    """

    problem: Problem
    own_rows: int = 64
    tile_rows: int = 64
    windows_per_block: int = 1
    min_blocks: int = 1

    kind = "bwd_tile"

    head_dim_pad = ForwardVariant.head_dim_pad
    smem_row_elems = ForwardVariant.smem_row_elems

    @property
    def threads(self) -> int:
        return 32 * self.windows_per_block * (self.own_rows // 16)

    @property
    def prepass(self) -> RowDeltaVariant:
        """The kernel run first: D = rowsum(dO * O), which both kinds of block read instead of staging O."""
        problem = self.problem
        return RowDeltaVariant(Problem(problem.n, problem.head_dim, problem.dtype, False, False, "bwd"))

    @property
    def smem_bytes(self) -> int:
        """The larger of the two kinds of block's layouts (bwd_tile.cu.j2 asserts it covers both): own tiles (dQ
        blocks: two stages, one a window group), two stages of other-side tiles, of bias and mask tiles (float) and
        of log-sum-exp and D rows, and the dQ blocks' dS slices for dbias."""
        wpb, own, tile, problem = self.windows_per_block, self.own_rows, self.tile_rows, self.problem
        tile_bytes = self.smem_row_elems * ELEMENT_BYTES[problem.dtype]  # one staged row
        adds = problem.has_bias + problem.has_mask
        other = 2 * wpb * 2 * tile * tile_bytes
        dq = (2 * wpb * 2 * own * tile_bytes + other + 2 * adds * own * (tile + 8) * 4 + 2 * wpb * 2 * own * 4
              + (wpb * own * tile * 4 if problem.has_bias else 0))
        dkdv = wpb * 2 * own * tile_bytes + other + 2 * adds * tile * (own + 4) * 4 + 2 * wpb * 2 * tile * 4
        return max(dq, dkdv)

    def grid(self, windows: int, heads: int, mask_windows: int, resident_blocks: int) -> tuple[int, int]:
        """(blocks, splits): dQ blocks first, then the dK/dV blocks; the images split by `choose_tile_splits`, within
        TILE_DBIAS_PARTIAL_BYTES of dbias partial sums where there is a bias."""
        pair_windows = max(mask_windows, 1)
        images = windows // pair_windows
        if images == 0:
            return 0, 1
        owners = heads * self.chunks_per_item
        max_splits = images
        if self.problem.has_bias:
            max_splits = TILE_DBIAS_PARTIAL_BYTES // (heads * self.problem.n ** 2 * 4)
        splits = choose_tile_splits(owners, images, pair_windows, self.windows_per_block, resident_blocks, max_splits)
        groups = -(-images // self.windows_per_block)
        return owners * splits + owners * pair_windows * groups, splits


@dataclass(frozen=True)
class RowDeltaVariant:
    """The tiled backward's prepass: D = rowsum(dO * O) of every row, float32, one thread a row. Not tuned: it reads
    O and dO once, where without it every block of the backward would stage O beside dO, once per tile."""

    problem: Problem
    threads: int = 256

    kind = "bwd_delta"
    smem_bytes = 0

    def knobs(self) -> dict:
        return {}

    def key(self) -> str:
        return f"fwagen_{self.kind}_{self.problem.key()}"

    def grid(self, windows: int, heads: int, mask_windows: int, resident_blocks: int) -> tuple[int, int]:
        return -(-windows * heads * self.problem.n // self.threads), 1


@dataclass(frozen=True)
class DbiasSumVariant:
    """dbias from a backward's float32 partial sums (`dbias_partials`), summed in a fixed order (dbias_sum.cu.j2). Not
    tuned: it reads the partials once. The grid covers heads x N x N, four floats a thread where N * N allows."""

    problem: Problem
    threads: int = 128

    kind = "dbias_sum"
    smem_bytes = 0

    def knobs(self) -> dict:
        return {}

    def key(self) -> str:
        return f"fwagen_{self.kind}_n{self.problem.n}"

    @property
    def floats_per_thread(self) -> int:
        """A float4 where every head's N x N block starts 16-byte aligned, else a float."""
        return 4 if self.problem.n * self.problem.n % 4 == 0 else 1

    def grid(self, windows: int, heads: int, mask_windows: int, resident_blocks: int) -> tuple[int, int]:
        n = self.problem.n
        return -(-heads * n * n // (self.floats_per_thread * self.threads)), 1


Variant = ForwardVariant | SimtVariant | BackwardVariant | BackwardSimtVariant | BackwardTileVariant  # and subclasses
BACKWARD_KINDS = ("bwd_mma", "bwd_simt", "bwd_tile")

_ABBREV = {
    "windows_per_block": "w",
    "query_chunk": "q",
    "rows_per_warp": "r",
    "key_tile": "k",
    "stages": "s",
    "min_blocks": "b",
    "threads_per_row": "t",
    "tile_rows": "n",
    "own_rows": "o",
}


def abbrev(knob: str) -> str:
    return _ABBREV[knob]


def variant_from_dict(data: dict) -> Variant:
    """Inverse of `to_dict`; raises ValueError naming what is wrong."""
    data = dict(data)
    kind = data.pop("kind", None)
    kinds = {"mma": ForwardVariant, "mma_stream": ForwardStreamVariant, "wgmma": ForwardWgmmaVariant,
             "wgmma_stream": ForwardWgmmaStreamVariant, "wgmma_tma": ForwardWgmmaTmaVariant,
             "wgmma_stream_tma": ForwardWgmmaStreamTmaVariant, "simt": SimtVariant, "bwd_mma": BackwardVariant,
             "bwd_simt": BackwardSimtVariant, "bwd_tile": BackwardTileVariant}
    cls = kinds.get(kind)
    if cls is None:
        raise ValueError(f"variant kind {kind!r}: expected one of {sorted(kinds)}")
    problem = Problem(**data.pop("problem"))
    allowed = {f.name for f in fields(cls)} - {"problem"}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {kind} variant knobs: {sorted(unknown)}")
    return cls(problem=problem, **data)
