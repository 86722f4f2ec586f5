// Device code of the CPU attention backend (flash-attention style), written once and compiled
// per instruction set: attention_kernel_avx2.cpp includes it under `#pragma GCC target` with
// 8-float vectors, attention_kernel_baseline.cpp without, with 4-float vectors. The including
// file defines GENERALIST_VEC_WIDTH, includes every standard and ATen header used here first, and
// opens namespace generalist::cpu_attention::<isa>; so only the code below is compiled for that
// instruction set (shared inline functions from headers never are, which keeps the one-definition
// rule safe).
//
// Tiles: kBq queries by kBk keys, all in fp32 (bf16/fp16 inputs are converted when packed).
// Scores are computed transposed, S^T = K Q^T (keys x queries), so that the softmax statistics of
// kW queries sit in one vector and every reduction runs down the rows. Packed layouts, per head
// and global tile (tiles never straddle two sequences), with Dp = D rounded up to kHeadDimAlign
// and zeros in every padded row and column:
//   k_rows, v_rows (Hkv, KT, kBk, Dp)                         forward and backward (the forward
//   reads fp32 inputs with D == Dp in place, packing only each sequence's last partial tile)
//   q_rows, do_rows (H, QT, kBq, Dp), q_cols, do_cols (H, QT, D, kBq)   backward (forward packs
//   each query tile's columns itself)
//
// Forward: one work item per (sequence, head, query tile), an online softmax over key tiles
// (running max m and sum l in the exp2 domain, the scale folded into Q): S^T = K Q^T, then
// O = diag(alpha) O + P V; key tiles past the tile's last visible key are skipped and masks are
// applied only on tiles that need them. Backward: P^T recomputed from lse, dP^T = V dO^T,
// dS^T = P^T (dP^T - delta), then dV += P^T dO, dK += dS^T Q, dQ += dS K. Each work item owns
// the rows it writes, so there are no atomics and no races, and every sum runs in a fixed order:
// results do not depend on the number of threads.

constexpr int kW = GENERALIST_VEC_WIDTH;
typedef float vfloat __attribute__((vector_size(4 * kW)));
typedef int32_t vint __attribute__((vector_size(4 * kW)));

#define GENERALIST_INLINE inline __attribute__((always_inline))

constexpr int64_t kBq = 64;     // queries per tile
constexpr int64_t kBk = 64;     // keys per tile
constexpr int64_t kR = 4;       // tiles' rows are padded to a multiple of this
constexpr int kTileRows = 6;    // register micro-tile: rows ...
constexpr int kTileVecs = 2;    // ... by vectors of columns
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.69314718055994531f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

GENERALIST_INLINE int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }
GENERALIST_INLINE int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }

// ---------------------------------------------------------------------------------------------
// Vectors (GCC/Clang vector extensions, so the same source serves AVX2, SSE and NEON).

GENERALIST_INLINE vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
GENERALIST_INLINE void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
template <size_t... I>
GENERALIST_INLINE vfloat vsplat_impl(float x, std::index_sequence<I...>) {
  return vfloat{((void)I, x)...};
}
// An initializer list, which compiles to one broadcast (a loop of lane writes may not).
GENERALIST_INLINE vfloat vsplat(float x) { return vsplat_impl(x, std::make_index_sequence<kW>{}); }
// One instruction (maxps); it may drop a NaN, which vexp2 carries instead: a NaN score's
// exponential is NaN, and so are the row's sum and output, as in the reference.
GENERALIST_INLINE vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

// 2^x with a relative error of ~1e-7 (a degree-5 minimax polynomial on [-0.5, 0.5], fitted to
// 2^x's relative error). Arguments here are <= 0 or a rounding error above (larger ones would
// overflow); anything below -126, -inf included, gives exactly 0, and NaN gives NaN.
GENERALIST_INLINE vfloat vexp2(vfloat x) {
  const vfloat x_in = x;
  const vint keep = x >= vsplat(-126.0f), nan = x != x;
  x = keep ? x : vsplat(-126.0f);  // NaN lanes too: the polynomial sees numbers only
  const vfloat shifter = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat n = (x + shifter) - shifter;
  const vfloat f = x - n;  // in [-0.5, 0.5]
  vfloat poly = vsplat(1.32647e-3f);
  poly = poly * f + 9.67151e-3f;
  poly = poly * f + 5.550734e-2f;
  poly = poly * f + 2.4022242e-1f;
  poly = poly * f + 6.9314698e-1f;
  poly = poly * f + 1.0f;
  const vint pow2n = (__builtin_convertvector(n, vint) + 127) << 23;
  return (vfloat)(((vint)(poly * (vfloat)pow2n) & keep) | ((vint)x_in & nan));
}

// ---------------------------------------------------------------------------------------------
// Small GEMM on fp32 tiles: C (M x N, ldc) {=, +=, = diag(row_scale) C +} A (M x K) B (K x N, ldb).
// A is addressed A[r * a_row + k * a_col], so a transposed operand costs nothing; B rows are
// contiguous. M is a multiple of kR and N of kW; K is any size. Register tiles are up to
// kTileRows x kTileVecs vectors (6 x 2 on AVX2: 12 accumulators, as in BLIS's Haswell kernel).

enum class Acc { kSet, kAdd, kScaleAdd };

template <int R, int C, Acc MODE>
GENERALIST_INLINE void micro_tile(int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                                  int64_t ldb, float* Cm, int64_t ldc, const float* row_scale) {
  vfloat acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      if constexpr (MODE == Acc::kSet) {
        acc[r][c] = vsplat(0.0f);
      } else if constexpr (MODE == Acc::kAdd) {
        acc[r][c] = vload(Cm + r * ldc + c * kW);
      } else {
        acc[r][c] = vload(Cm + r * ldc + c * kW) * vsplat(row_scale[r]);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    vfloat b[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) b[c] = vload(B + k * ldb + c * kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vfloat a = vsplat(A[r * a_row + k * a_col]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) vstore(Cm + r * ldc + c * kW, acc[r][c]);
  }
}

// One panel of C columns (C vectors wide), all M rows: the panel of B stays in L1 while A streams.
template <int C, Acc MODE>
GENERALIST_INLINE void gemm_panel(int64_t M, int64_t K, const float* A, int64_t a_row, int64_t a_col,
                                  const float* B, int64_t ldb, float* Cm, int64_t ldc, const float* row_scale) {
  constexpr int R = kTileRows;
  int64_t r = 0;
  for (; r + R <= M; r += R) {
    micro_tile<R, C, MODE>(K, A + r * a_row, a_row, a_col, B, ldb, Cm + r * ldc, ldc,
                           row_scale == nullptr ? nullptr : row_scale + r);
  }
  if constexpr (R > kR) {  // M is a multiple of kR: the rest is kR rows, or half of that
    for (; r + kR <= M; r += kR) {
      micro_tile<kR, C, MODE>(K, A + r * a_row, a_row, a_col, B, ldb, Cm + r * ldc, ldc,
                              row_scale == nullptr ? nullptr : row_scale + r);
    }
    if (r < M) {
      micro_tile<kR / 2, C, MODE>(K, A + r * a_row, a_row, a_col, B, ldb, Cm + r * ldc, ldc,
                                  row_scale == nullptr ? nullptr : row_scale + r);
    }
  }
}

template <Acc MODE>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
          int64_t ldb, float* Cm, int64_t ldc, const float* row_scale = nullptr) {
  constexpr int C = kTileVecs;
  int64_t n = 0;
  for (; n + C * kW <= N; n += C * kW) gemm_panel<C, MODE>(M, K, A, a_row, a_col, B + n, ldb, Cm + n, ldc, row_scale);
  if constexpr (C > 1) {
    for (; n < N; n += kW) gemm_panel<1, MODE>(M, K, A, a_row, a_col, B + n, ldb, Cm + n, ldc, row_scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Packing (input dtype -> fp32 tiles) and unpacking.

// Uninitialised fp32 storage (every packed element is written before it is read).
struct Buffer {
  std::unique_ptr<float[]> data;
  explicit Buffer(int64_t n) : data(new float[n]) {}
  float* get() const { return data.get(); }
};

// The packed operands of one call, carved from memory that each calling thread keeps between
// calls: fresh pages would cost a page fault each (~4000 per forward of 8 x 8 x 512 x 64, a few
// percent of its time). Requests above kMaxCachedFloats are allocated for the call only. One
// Workspace per thread at a time.
constexpr int64_t kMaxCachedFloats = int64_t{1} << 26;  // 256 MiB

class Workspace {
 public:
  explicit Workspace(int64_t n) {
    TORCH_INTERNAL_ASSERT(!in_use(), "attention (cpu): nested workspaces on one thread");
    if (n > kMaxCachedFloats) {
      owned_.reset(new float[n]);
      data_ = owned_.get();
    } else {
      if (n > cache_size()) {
        cache().reset();
        cache().reset(new float[n]);
        cache_size() = n;
      }
      data_ = cache().get();
    }
    in_use() = true;
  }
  ~Workspace() { in_use() = false; }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // The next n floats of the workspace.
  float* take(int64_t n) {
    float* p = data_ + used_;
    used_ += n;
    return p;
  }

 private:
  static std::unique_ptr<float[]>& cache() {
    thread_local std::unique_ptr<float[]> data;
    return data;
  }
  static int64_t& cache_size() {
    thread_local int64_t size = 0;
    return size;
  }
  static bool& in_use() {
    thread_local bool flag = false;
    return flag;
  }
  std::unique_ptr<float[]> owned_;
  float* data_ = nullptr;
  int64_t used_ = 0;
};

// dst (rows_pad x dp) <- scale * rows [0, rows) of src (row stride `stride`, d columns); zeros elsewhere.
template <typename scalar_t>
void pack_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t d, float scale, float* dst,
               int64_t rows_pad, int64_t dp) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    float* out = dst + r * dp;
    int64_t c = 0;
    if (r < rows) {
      const scalar_t* in = src + r * stride;
      for (; c < d; ++c) out[c] = static_cast<float>(in[c]) * scale;
    }
    for (; c < dp; ++c) out[c] = 0.0f;
  }
}

// dst (d x cols_pad) <- scale * the transpose of rows [0, rows) of src; zeros in columns [rows, cols_pad).
template <typename scalar_t>
void pack_cols(const scalar_t* src, int64_t stride, int64_t rows, int64_t d, float scale, float* dst,
               int64_t cols_pad) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * stride;
    for (int64_t c = 0; c < d; ++c) dst[c * cols_pad + r] = static_cast<float>(in[c]) * scale;
  }
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * cols_pad + rows, dst + (c + 1) * cols_pad, 0.0f);
}

// rows [0, rows) of dst (row stride `stride`) <- scale * the first d columns of src (rows x dp).
template <typename scalar_t>
void unpack_rows(const float* src, int64_t dp, int64_t rows, int64_t d, float scale, scalar_t* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < d; ++c) dst[r * stride + c] = static_cast<scalar_t>(src[r * dp + c] * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Work distribution.

// Tiles of one side (queries or keys) of a varlen batch: sequence b owns global tiles
// [first[b], first[b + 1]); seq[t] is the sequence of global tile t, start[t] its first token
// within that sequence.
struct Tiles {
  std::vector<int64_t> first, seq, start;
  int64_t count() const { return first.back(); }
};

inline Tiles make_tiles(const std::vector<Sequence>& seqs, bool keys, int64_t tile) {
  Tiles t;
  t.first.push_back(0);
  for (size_t b = 0; b < seqs.size(); ++b) {
    const int64_t len = keys ? seqs[b].len_k : seqs[b].len_q;
    for (int64_t i = 0; i < len; i += tile) {
      t.seq.push_back(static_cast<int64_t>(b));
      t.start.push_back(i);
    }
    t.first.push_back(static_cast<int64_t>(t.seq.size()));
  }
  return t;
}

// Below this many multiply-adds a pass runs on the calling thread: waking the other threads
// would cost more than they save.
constexpr int64_t kMinParallelWork = int64_t{1} << 20;
// Packing loops hand each thread at least this many elements (ATen's grain size).
constexpr int64_t kPackGrain = int64_t{1} << 15;

// Runs fn(item, scratch) for every item in [0, n) on the intra-op threads, handing items out
// one at a time in order (callers sort them longest first) so uneven items balance. Each thread
// builds one scratch with make_scratch(). Items write disjoint outputs, so the result does not
// depend on which thread ran what.
template <typename MakeScratch, typename F>
void parallel_items(int64_t n, int64_t work, const MakeScratch& make_scratch, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = work < kMinParallelWork ? 1 : at::get_num_threads();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(i, scratch);
    }
  });
}

struct Item {
  int64_t seq, head, tile, cost;
};

// Sorts items longest first; returns the sum of their costs.
inline int64_t sort_longest_first(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  int64_t total = 0;
  for (const Item& it : items) total += it.cost;
  return total;
}

// One query tile: its valid rows, and how many keys each of its kBq rows sees (0 for padding).
struct QueryTile {
  int64_t rows = 0, rows_r = 0, cols = 0;  // valid rows; rounded up to kR; to kHeadDimAlign
  int64_t n_first = 0, n_last = 0;         // keys seen by the first and the last valid row
  alignas(64) int32_t vis[kBq];

  void init(const AttentionParams& p, const Sequence& s, int64_t i0) {
    rows = std::min(kBq, s.len_q - i0);
    rows_r = round_up(rows, kR);
    cols = round_up(rows, kHeadDimAlign);
    for (int64_t r = 0; r < kBq; ++r) vis[r] = r < rows ? static_cast<int32_t>(p.visible_keys(s, i0 + r)) : 0;
    n_first = vis[0];
    n_last = vis[rows - 1];
  }
};

GENERALIST_INLINE vint vload_int(const int32_t* p) {
  vint v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Sets S^T[j][i] to `fill` where key j0 + j is hidden from query i (j < key_rows, i < cols).
GENERALIST_INLINE void mask_scores(float* st, int64_t key_rows, int64_t j0, const QueryTile& qt, float fill) {
  const vfloat vfill = vsplat(fill);
  for (int64_t i = 0; i < qt.cols; i += kW) {
    const vint vis = vload_int(qt.vis + i);
    for (int64_t j = 0; j < key_rows; ++j) {
      float* x = st + j * kBq + i;
      vstore(x, (vis > static_cast<int32_t>(j0 + j)) ? vload(x) : vfill);
    }
  }
}

// Packs key tile idx = kv head * KT + global tile of k and v, (Tk, Hkv, D) each, into fp32 row
// tiles (kBk x Dp).
template <typename scalar_t>
void pack_key_tile(const AttentionParams& p, const Tiles& kt, int64_t idx, float* k_rows, float* v_rows) {
  const int64_t hkv = p.kv_heads, d = p.head_dim, dp = round_up(d, kHeadDimAlign), n_tiles = kt.count();
  const int64_t h = idx / n_tiles, t = idx % n_tiles;
  const Sequence& s = p.seqs[kt.seq[t]];
  const int64_t j0 = kt.start[t], rows = std::min(kBk, s.len_k - j0), offset = ((s.k_start + j0) * hkv + h) * d;
  pack_rows(static_cast<const scalar_t*>(p.k) + offset, hkv * d, rows, d, 1.0f, k_rows + idx * kBk * dp, kBk, dp);
  pack_rows(static_cast<const scalar_t*>(p.v) + offset, hkv * d, rows, d, 1.0f, v_rows + idx * kBk * dp, kBk, dp);
}

// ---------------------------------------------------------------------------------------------
// Forward.

struct FwdScratch {
  Buffer q_cols, st, o;
  alignas(64) float m[kBq], l[kBq], alpha[kBq];
  QueryTile qt;
  explicit FwdScratch(int64_t d, int64_t dp) : q_cols(d * kBq), st(kBk * kBq), o(kBq * dp) {}
};

template <typename scalar_t>
void attention_fwd(const AttentionParams& p) {
  const int64_t H = p.heads, Hkv = p.kv_heads, G = H / Hkv, D = p.head_dim, Dp = round_up(D, kHeadDimAlign);
  const Tiles kt = make_tiles(p.seqs, true, kBk);
  const int64_t KT = kt.count();
  const int64_t key_pack = Hkv * KT * kBk * Dp;
  Workspace ws(2 * key_pack);
  float* k_rows = ws.take(key_pack);
  float* v_rows = ws.take(key_pack);
  // fp32 inputs whose rows need no padding are read where they are, but for each sequence's last
  // partial key tile: the products read whole groups of kR rows, and rows past a sequence's end
  // must be zeros (its next rows may hold anything, or lie past the end of the tensor).
  const bool direct = std::is_same_v<scalar_t, float> && D == Dp;
  const auto full_tile = [&](int64_t t) { return p.seqs[kt.seq[t]].len_k - kt.start[t] >= kBk; };
  at::parallel_for(0, Hkv * KT, ceil_div(kPackGrain, 2 * kBk * Dp), [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      if (!direct || !full_tile(idx % KT)) pack_key_tile<scalar_t>(p, kt, idx, k_rows, v_rows);
    }
  });

  std::vector<Item> items;
  for (int64_t b = 0; b < static_cast<int64_t>(p.seqs.size()); ++b) {
    const Sequence& s = p.seqs[b];
    for (int64_t i0 = 0; i0 < s.len_q; i0 += kBq) {
      const int64_t cost = p.visible_keys(s, std::min(i0 + kBq, s.len_q) - 1) + 16;
      for (int64_t h = 0; h < H; ++h) items.push_back({b, h, i0 / kBq, cost});
    }
  }
  const int64_t work = sort_longest_first(items) * kBq * D * 2;

  const auto* q = static_cast<const scalar_t*>(p.q);
  auto* out = static_cast<scalar_t*>(p.out);
  const float qk_scale = p.softmax_scale * kLog2e;  // scores in the exp2 domain
  const auto make_scratch = [&] { return std::make_unique<FwdScratch>(D, Dp); };
  parallel_items(static_cast<int64_t>(items.size()), work, make_scratch, [&](int64_t idx, std::unique_ptr<FwdScratch>& scratch) {
    FwdScratch& w = *scratch;
    const Item& it = items[idx];
    const Sequence& s = p.seqs[it.seq];
    const int64_t h = it.head, hkv = h / G, i0 = it.tile * kBq;
    QueryTile& qt = w.qt;
    qt.init(p, s, i0);
    pack_cols(q + ((s.q_start + i0) * H + h) * D, H * D, qt.rows, D, qk_scale, w.q_cols.get(), kBq);
    float* st = w.st.get();
    float* o = w.o.get();
    std::fill(o, o + qt.rows_r * Dp, 0.0f);
    std::fill(w.m, w.m + kBq, kNegInf);
    std::fill(w.l, w.l + kBq, 0.0f);

    for (int64_t j0 = 0; j0 < qt.n_last; j0 += kBk) {
      const int64_t key_rows = round_up(std::min(kBk, qt.n_last - j0), kR);
      const int64_t tile = hkv * KT + kt.first[it.seq] + j0 / kBk;
      const float* k_tile = k_rows + tile * kBk * Dp;
      const float* v_tile = v_rows + tile * kBk * Dp;
      int64_t ld = Dp;  // row stride of k_tile and v_tile
      if (direct && full_tile(tile % KT)) {
        const int64_t offset = ((s.k_start + j0) * Hkv + hkv) * D;
        k_tile = reinterpret_cast<const float*>(p.k) + offset;
        v_tile = reinterpret_cast<const float*>(p.v) + offset;
        ld = Hkv * D;
      }
      gemm<Acc::kSet>(key_rows, qt.cols, D, k_tile, ld, 1, w.q_cols.get(), kBq, st, kBq);
      if (qt.n_first < j0 + key_rows) mask_scores(st, key_rows, j0, qt, kNegInf);
      // Online softmax, kW queries at a time: new running max, rescale factor, exp and sum.
      for (int64_t i = 0; i < qt.cols; i += kW) {
        vfloat mx = vsplat(kNegInf);
        for (int64_t j = 0; j < key_rows; ++j) mx = vmax(mx, vload(st + j * kBq + i));
        const vfloat m_old = vload(w.m + i), m_new = vmax(m_old, mx);
        const vfloat m_use = (m_new == vsplat(kNegInf)) ? vsplat(0.0f) : m_new;  // rows with no key yet
        const vfloat alpha = vexp2(m_old - m_use);
        vfloat sum = vsplat(0.0f);
        for (int64_t j = 0; j < key_rows; ++j) {
          const vfloat e = vexp2(vload(st + j * kBq + i) - m_use);
          vstore(st + j * kBq + i, e);
          sum += e;
        }
        vstore(w.m + i, m_new);
        vstore(w.alpha + i, alpha);
        vstore(w.l + i, vload(w.l + i) * alpha + sum);
      }
      gemm<Acc::kScaleAdd>(qt.rows_r, Dp, key_rows, st, 1, kBq, v_tile, ld, o, Dp, w.alpha);
    }

    scalar_t* out_rows = out + ((s.q_start + i0) * H + h) * D;
    float* lse = p.lse + h * p.total_q + s.q_start + i0;
    for (int64_t r = 0; r < qt.rows; ++r) {
      const bool seen = !(w.l[r] == 0.0f);  // false only when the row sees no key (a NaN sum is seen)
      unpack_rows(o + r * Dp, Dp, 1, D, seen ? 1.0f / w.l[r] : 0.0f, out_rows + r * H * D, H * D);
      lse[r] = seen ? (w.m[r] + std::log2(w.l[r])) * kLn2 : kNegInf;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Per (head, query tile): q and dO as rows (kBq x Dp) and as columns (D x kBq), lse * log2(e)
// (+inf on padding rows, so their P is 0) and delta = rowsum(dO * O) - dlse. Per (kv head, key
// tile): k and v as rows (kBk x Dp).
struct BwdPacks {
  float *q_rows, *q_cols, *do_rows, *do_cols, *lse2, *delta, *k_rows, *v_rows;

  static int64_t size(int64_t H, int64_t QT, int64_t Hkv, int64_t KT, int64_t D, int64_t Dp) {
    return H * QT * kBq * (2 * Dp + 2 * D + 2) + Hkv * KT * kBk * Dp * 2;
  }
  BwdPacks(Workspace& ws, int64_t H, int64_t QT, int64_t Hkv, int64_t KT, int64_t D, int64_t Dp)
      : q_rows(ws.take(H * QT * kBq * Dp)), q_cols(ws.take(H * QT * D * kBq)), do_rows(ws.take(H * QT * kBq * Dp)),
        do_cols(ws.take(H * QT * D * kBq)), lse2(ws.take(H * QT * kBq)), delta(ws.take(H * QT * kBq)),
        k_rows(ws.take(Hkv * KT * kBk * Dp)), v_rows(ws.take(Hkv * KT * kBk * Dp)) {}
};

struct BwdScratch {
  Buffer st, dst, dq, dk, dv;
  QueryTile qt;
  explicit BwdScratch(int64_t dp) : st(kBk * kBq), dst(kBk * kBq), dq(kBq * dp), dk(kBk * dp), dv(kBk * dp) {}
};

// One (query tile, key tile) block of the backward: recomputes P^T from lse, then accumulates
// into dq (kBq x Dp) and dk, dv (kBk x Dp) those that are not null. dq and dk still need a
// factor softmax_scale.
struct BwdBlock {
  const BwdPacks& pk;
  int64_t D, Dp;
  float qk_scale;  // softmax_scale * log2(e)

  void operator()(const QueryTile& qt, int64_t q_idx, int64_t k_idx, int64_t j0, BwdScratch& w, float* dq,
                  float* dk, float* dv) const {
    const int64_t key_rows = round_up(std::min(kBk, qt.n_last - j0), kR);
    const float* q_rows = pk.q_rows + q_idx * kBq * Dp;
    const float* do_rows = pk.do_rows + q_idx * kBq * Dp;
    const float* k_rows = pk.k_rows + k_idx * kBk * Dp;
    float* st = w.st.get();
    float* dst = w.dst.get();
    gemm<Acc::kSet>(key_rows, qt.cols, D, k_rows, Dp, 1, pk.q_cols + q_idx * D * kBq, kBq, st, kBq);
    gemm<Acc::kSet>(key_rows, qt.cols, D, pk.v_rows + k_idx * kBk * Dp, Dp, 1,
                    pk.do_cols + q_idx * D * kBq, kBq, dst, kBq);
    const vfloat vc = vsplat(qk_scale);
    for (int64_t i = 0; i < qt.cols; i += kW) {
      const vfloat lse2 = vload(pk.lse2 + q_idx * kBq + i), delta = vload(pk.delta + q_idx * kBq + i);
      for (int64_t j = 0; j < key_rows; ++j) {
        float* s = st + j * kBq + i;
        float* ds = dst + j * kBq + i;
        const vfloat pv = vexp2(vload(s) * vc - lse2);
        vstore(s, pv);
        vstore(ds, pv * (vload(ds) - delta));
      }
    }
    // hidden keys, and the zero padding columns past the tile's last query (a -inf or inf key
    // makes their score 0 * inf = NaN, which would reach dk and dv): P = dS = 0
    if (qt.n_first < j0 + key_rows || qt.rows < qt.cols) {
      mask_scores(st, key_rows, j0, qt, 0.0f);
      mask_scores(dst, key_rows, j0, qt, 0.0f);
    }
    if (dv != nullptr) gemm<Acc::kAdd>(key_rows, Dp, qt.cols, st, kBq, 1, do_rows, Dp, dv, Dp);
    if (dk != nullptr) gemm<Acc::kAdd>(key_rows, Dp, qt.cols, dst, kBq, 1, q_rows, Dp, dk, Dp);
    if (dq != nullptr) gemm<Acc::kAdd>(qt.rows_r, Dp, key_rows, dst, 1, kBq, k_rows, Dp, dq, Dp);
  }
};

template <typename scalar_t>
void attention_bwd(const AttentionParams& p) {
  const int64_t H = p.heads, Hkv = p.kv_heads, G = H / Hkv, D = p.head_dim, Dp = round_up(D, kHeadDimAlign);
  const int64_t B = static_cast<int64_t>(p.seqs.size());
  const Tiles qtiles = make_tiles(p.seqs, false, kBq), ktiles = make_tiles(p.seqs, true, kBk);
  const int64_t QT = qtiles.count(), KT = ktiles.count();
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const auto* out = static_cast<const scalar_t*>(p.out);

  const int64_t dq_size = H * QT * kBq * Dp;
  Workspace ws(BwdPacks::size(H, QT, Hkv, KT, D, Dp) + dq_size);
  BwdPacks pk(ws, H, QT, Hkv, KT, D, Dp);
  // One pass packs every query tile (4 layouts) and then every key tile.
  at::parallel_for(0, H * QT + Hkv * KT, ceil_div(kPackGrain, 4 * kBq * Dp), [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      if (idx >= H * QT) {
        pack_key_tile<scalar_t>(p, ktiles, idx - H * QT, pk.k_rows, pk.v_rows);
        continue;
      }
      const int64_t h = idx / QT, t = idx % QT;
      const Sequence& s = p.seqs[qtiles.seq[t]];
      const int64_t i0 = qtiles.start[t], rows = std::min(kBq, s.len_q - i0);
      const int64_t offset = ((s.q_start + i0) * H + h) * D;
      pack_rows(q + offset, H * D, rows, D, 1.0f, pk.q_rows + idx * kBq * Dp, kBq, Dp);
      pack_cols(q + offset, H * D, rows, D, 1.0f, pk.q_cols + idx * D * kBq, kBq);
      pack_rows(dout + offset, H * D, rows, D, 1.0f, pk.do_rows + idx * kBq * Dp, kBq, Dp);
      pack_cols(dout + offset, H * D, rows, D, 1.0f, pk.do_cols + idx * D * kBq, kBq);
      for (int64_t r = 0; r < kBq; ++r) {
        float delta = 0.0f, lse2 = std::numeric_limits<float>::infinity();
        if (r < rows) {
          const scalar_t* o_row = out + offset + r * H * D;
          const float* do_row = pk.do_rows + (idx * kBq + r) * Dp;
          for (int64_t c = 0; c < D; ++c) delta += do_row[c] * static_cast<float>(o_row[c]);
          const int64_t row = h * p.total_q + s.q_start + i0 + r;
          if (p.dlse != nullptr) delta -= p.dlse[row];
          lse2 = p.lse[row] * kLog2e;
        }
        pk.delta[idx * kBq + r] = delta;
        pk.lse2[idx * kBq + r] = lse2;
      }
    }
  });

  const BwdBlock block{pk, D, Dp, p.softmax_scale * kLog2e};
  auto* dq_out = static_cast<scalar_t*>(p.dq);
  auto* dk_out = static_cast<scalar_t*>(p.dk);
  auto* dv_out = static_cast<scalar_t*>(p.dv);
  const float scale = p.softmax_scale;
  const auto make_scratch = [&] { return std::make_unique<BwdScratch>(Dp); };

  // All query tiles of the G heads sharing kv head `hkv` against key tile j0 of sequence b:
  // accumulates dk, dv (and dq into dq_acc when given), then writes dk and dv.
  auto key_tile = [&](int64_t b, int64_t hkv, int64_t j0, BwdScratch& w, float* dq_acc) {
    const Sequence& s = p.seqs[b];
    const int64_t k_idx = hkv * KT + ktiles.first[b] + j0 / kBk;
    float* dk = w.dk.get();
    float* dv = w.dv.get();
    std::fill(dk, dk + kBk * Dp, 0.0f);
    std::fill(dv, dv + kBk * Dp, 0.0f);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hkv * G + g;
      for (int64_t i0 = 0; i0 < s.len_q; i0 += kBq) {
        if (p.visible_keys(s, std::min(i0 + kBq, s.len_q) - 1) <= j0) continue;  // no row sees these keys
        w.qt.init(p, s, i0);
        const int64_t q_idx = h * QT + qtiles.first[b] + i0 / kBq;
        block(w.qt, q_idx, k_idx, j0, w, dq_acc == nullptr ? nullptr : dq_acc + q_idx * kBq * Dp, dk, dv);
      }
    }
    const int64_t rows = std::min(kBk, s.len_k - j0), offset = ((s.k_start + j0) * Hkv + hkv) * D;
    unpack_rows(dk, Dp, rows, D, scale, dk_out + offset, Hkv * D);
    unpack_rows(dv, Dp, rows, D, 1.0f, dv_out + offset, Hkv * D);
  };

  // Work of key tile j0 of sequence b for one kv head: query rows that see it, times G.
  auto key_tile_cost = [&](const Sequence& s, int64_t j0) {
    int64_t cost = 16;
    for (int64_t i0 = 0; i0 < s.len_q; i0 += kBq) {
      if (p.visible_keys(s, std::min(i0 + kBq, s.len_q) - 1) > j0) cost += std::min(kBq, s.len_q - i0) * G;
    }
    return cost;
  };

  // One pass, one work item per (sequence, kv head), when there are enough of them to keep every
  // thread busy: dq accumulates in place. Otherwise two passes: dk, dv per (sequence, kv head,
  // key tile), then dq per (sequence, head, query tile), recomputing P and dS. Both add every
  // term in the same order (key tiles ascending for dq; heads, then query tiles for dk, dv), so
  // both give the same bits.
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    int64_t cost = 0;
    for (int64_t j0 = 0; j0 < p.seqs[b].len_k; j0 += kBk) cost += key_tile_cost(p.seqs[b], j0);
    for (int64_t hkv = 0; hkv < Hkv && p.seqs[b].len_q + p.seqs[b].len_k > 0; ++hkv) {
      items.push_back({b, hkv, 0, cost + 1});
    }
  }
  const int64_t work = sort_longest_first(items) * kBk * D * 5;  // 5 products per block
  const int64_t threads = work < kMinParallelWork ? 1 : at::get_num_threads();
  if (static_cast<int64_t>(items.size()) >= 2 * threads) {
    float* dq_acc = ws.take(dq_size);
    parallel_items(static_cast<int64_t>(items.size()), work, make_scratch, [&](int64_t idx, std::unique_ptr<BwdScratch>& w) {
      const int64_t b = items[idx].seq, hkv = items[idx].head;
      const Sequence& s = p.seqs[b];
      // This item owns dq of its G heads in sequence b: zero, accumulate over key tiles, write.
      for (int64_t h = hkv * G; h < (hkv + 1) * G; ++h) {
        float* acc = dq_acc + (h * QT + qtiles.first[b]) * kBq * Dp;
        std::fill(acc, acc + (qtiles.first[b + 1] - qtiles.first[b]) * kBq * Dp, 0.0f);
      }
      for (int64_t j0 = 0; j0 < s.len_k; j0 += kBk) key_tile(b, hkv, j0, *w, dq_acc);
      for (int64_t h = hkv * G; h < (hkv + 1) * G; ++h) {
        const float* acc = dq_acc + (h * QT + qtiles.first[b]) * kBq * Dp;
        unpack_rows(acc, Dp, s.len_q, D, scale, dq_out + (s.q_start * H + h) * D, H * D);
      }
    });
    return;
  }

  items.clear();
  for (int64_t t = 0; t < KT; ++t) {
    const int64_t cost = key_tile_cost(p.seqs[ktiles.seq[t]], ktiles.start[t]);
    for (int64_t hkv = 0; hkv < Hkv; ++hkv) items.push_back({ktiles.seq[t], hkv, ktiles.start[t] / kBk, cost});
  }
  const int64_t work_dkdv = sort_longest_first(items) * kBk * D * 4;
  parallel_items(static_cast<int64_t>(items.size()), work_dkdv, make_scratch, [&](int64_t idx, std::unique_ptr<BwdScratch>& w) {
    key_tile(items[idx].seq, items[idx].head, items[idx].tile * kBk, *w, nullptr);
  });

  items.clear();
  for (int64_t t = 0; t < QT; ++t) {
    const Sequence& s = p.seqs[qtiles.seq[t]];
    const int64_t cost = p.visible_keys(s, std::min(qtiles.start[t] + kBq, s.len_q) - 1) + 16;
    for (int64_t h = 0; h < H; ++h) items.push_back({qtiles.seq[t], h, qtiles.start[t] / kBq, cost});
  }
  const int64_t work_dq = sort_longest_first(items) * kBq * D * 3;
  parallel_items(static_cast<int64_t>(items.size()), work_dq, make_scratch, [&](int64_t idx, std::unique_ptr<BwdScratch>& scratch) {
    BwdScratch& w = *scratch;
    const Item& it = items[idx];
    const Sequence& s = p.seqs[it.seq];
    const int64_t i0 = it.tile * kBq, q_idx = it.head * QT + qtiles.first[it.seq] + it.tile;
    w.qt.init(p, s, i0);
    float* dq = w.dq.get();
    std::fill(dq, dq + kBq * Dp, 0.0f);
    for (int64_t j0 = 0; j0 < w.qt.n_last; j0 += kBk) {
      block(w.qt, q_idx, (it.head / G) * KT + ktiles.first[it.seq] + j0 / kBk, j0, w, dq, nullptr, nullptr);
    }
    unpack_rows(dq, Dp, w.qt.rows, D, scale, dq_out + ((s.q_start + i0) * H + it.head) * D, H * D);
  });
}
