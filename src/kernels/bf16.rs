//! bf16 matrix products with fp32 accumulation: `c[m×n] = a[m×k] · b[k×n]` with both operands
//! rounded to bfloat16 and every product summed in fp32.
//!
//! Why: a bf16 operand is half the bytes of an fp32 one, and the CPUs this project runs on
//! multiply pairs of them in one instruction — `vdpbf16ps` (AVX512_BF16: 16 lanes × 2 products)
//! and AMX's `tdpbf16ps` (a 16×16 fp32 tile += 16×32 by 32×16 bf16 tiles in one instruction).
//! Training keeps fp32 master weights and fp32 everywhere else; only the big products go here.
//!
//! The layouts are the ones both instruction sets read, so one packing serves all paths:
//! - `a` ([`Bf16Rows`]): row-major, each row padded with zeros to a multiple of 32 values and
//!   the rows to a multiple of 16, so every 16-row × 32-value tile is in bounds and zero
//!   outside the matrix;
//! - `b` ([`PackedBf16`]): 16-column panels in "VNNI" order — for each pair of rows `k, k+1`,
//!   16 columns × 2 values, so one 64-byte line is one row of an AMX B tile and one zmm
//!   operand of `vdpbf16ps`.
//!
//! Three paths compute the same sums, chosen once per process ([`Bf16Path::detect`]):
//! AMX tiles, AVX512_BF16 registers, and [`Bf16Path::Emulated`], a scalar emulation of the
//! tile operations that runs everywhere. The tile paths share one blocking loop
//! ([`tiled`]), generic over the tile operations, so the emulation tests the very code that
//! drives AMX on machines without it.

use rayon::prelude::*;

/// Values per row of an A tile (64 bytes of bf16), hence the depth `k` is padded to this.
pub const TILE_K: usize = 32;
/// Rows of a tile, and columns of a B panel.
pub const TILE_M: usize = 16;

/// fp32 → bf16, rounding to nearest even (NaN stays NaN, overflow goes to infinity), as
/// `vcvtneps2bf16` does. Written as a select, not an early return, so that loops over it can
/// vectorise.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        quiet
    } else {
        rounded
    }
}

/// Rounds `src` into `dst` (the shorter length) with [`to_bf16`]'s bits, 16 lanes at a time
/// where AVX-512 runs (the baseline x86-64 target vectorises the scalar loop 4 lanes wide at
/// best). Why: rounding a convolution's operands used to cost more than its tile products.
pub fn round_into(src: &[f32], dst: &mut [u16]) {
    let len = src.len().min(dst.len());
    let (src, dst) = (&src[..len], &mut dst[..len]);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if wide::available() {
        // SAFETY: AVX-512 F and BW are present; the loop stays inside both slices.
        unsafe {
            while done + 16 <= len {
                let v = wide::round16(src.as_ptr().add(done));
                std::arch::x86_64::_mm256_storeu_si256(dst.as_mut_ptr().add(done).cast(), v);
                done += 16;
            }
        }
    }
    for (d, s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = to_bf16(*s);
    }
}

/// VNNI pair-rows of one 16-column panel: from rows `r0, r0 + 1, …` of the row-major `k × n`
/// matrix `b`, columns `c0 .. c0 + width`, into `out` (32 values per pair-row: column `j`'s
/// even row at `2j`, its odd row at `2j + 1`); rows past `k` and columns past `width` give
/// zeros. A run of whole pair-rows goes 16 lanes at a time where AVX-512 runs.
fn pack_pairs(
    b: &[f32],
    (k, n): (usize, usize),
    (c0, width): (usize, usize),
    r0: usize,
    out: &mut [u16],
) {
    let pairs = out.len() / (2 * TILE_M);
    #[cfg(target_arch = "x86_64")]
    if width == TILE_M && r0 + 2 * pairs <= k && wide::available() {
        let src = &b[r0 * n + c0..(r0 + 2 * pairs - 1) * n + c0 + TILE_M];
        // SAFETY: AVX-512 F and BW are present; `src` holds the 2·pairs rows' 16 values at
        // stride n, and `out` 32 values per pair-row.
        unsafe { wide::pack_pairs(src, n, pairs, out) };
        return;
    }
    for (p, pair) in out.chunks_exact_mut(2 * TILE_M).enumerate() {
        for h in 0..2 {
            let r = r0 + 2 * p + h;
            let row = if r < k {
                &b[r * n + c0..r * n + c0 + width]
            } else {
                &[]
            };
            for j in 0..TILE_M {
                pair[2 * j + h] = row.get(j).map_or(0, |&v| to_bf16(v));
            }
        }
    }
}

/// [`to_bf16`] on 16 lanes with AVX-512 F and BW, the same integer arithmetic.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
        })
    }

    /// The 16 rounded values in the low halves of 32-bit lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn round_lanes(p: *const f32) -> __m512i {
        // SAFETY: the caller guarantees 16 readable values.
        let x = unsafe { _mm512_loadu_ps(p) };
        let b = _mm512_castps_si512(x);
        let high = _mm512_srli_epi32::<16>(b);
        let bias = _mm512_add_epi32(
            _mm512_and_si512(high, _mm512_set1_epi32(1)),
            _mm512_set1_epi32(0x7fff),
        );
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_blend_epi32(nan, rounded, quiet)
    }

    /// 16 values from `p`, rounded, as 16 packed bf16.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn round16(p: *const f32) -> __m256i {
        // SAFETY: forwarded.
        _mm512_cvtepi32_epi16(unsafe { round_lanes(p) })
    }

    /// `pairs` VNNI pair-rows from rows of 16 values at stride `n` in `src`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_pairs(src: &[f32], n: usize, pairs: usize, out: &mut [u16]) {
        assert!(pairs == 0 || src.len() > (2 * pairs - 1) * n + 15);
        assert!(out.len() >= 32 * pairs);
        for p in 0..pairs {
            // SAFETY: the asserts above bound every read and write.
            unsafe {
                let even = src.as_ptr().add(2 * p * n);
                let v = _mm512_or_si512(
                    round_lanes(even),
                    _mm512_slli_epi32::<16>(round_lanes(even.add(n))),
                );
                _mm512_storeu_si512(out.as_mut_ptr().add(32 * p).cast(), v);
            }
        }
    }
}

/// bf16 → fp32 (exact).
#[inline]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// A row-major bf16 matrix padded for tiles: `m_pad = ⌈m/16⌉·16` rows of `k_pad = ⌈k/32⌉·32`
/// values, zero outside `m × k`.
#[derive(Debug, Clone, Default)]
pub struct Bf16Rows {
    m: usize,
    k: usize,
    k_pad: usize,
    data: Vec<u16>,
}

impl Bf16Rows {
    /// Rounds a row-major `m × k` fp32 matrix.
    pub fn from_f32(a: &[f32], m: usize, k: usize) -> Self {
        let mut r = Bf16Rows::default();
        r.fill(a, m, k);
        r
    }

    /// Refills in place (the buffer is kept between calls, as the training step does). Large
    /// matrices are rounded on rayon's threads, a block of rows each, since the products that
    /// follow run on all threads too.
    pub fn fill(&mut self, a: &[f32], m: usize, k: usize) {
        assert!(
            a.len() >= m * k,
            "Bf16Rows: {m}×{k} does not fit in {}",
            a.len()
        );
        let k_pad = round_up(k.max(1), TILE_K);
        self.m = m;
        self.k = k;
        self.k_pad = k_pad;
        self.data.resize(round_up(m.max(1), TILE_M) * k_pad, 0);
        // Every row is written whole (values, then zero padding; rows past `m` all zero), so
        // nothing of the previous contents survives and nothing needs clearing first.
        let round = |(i, row): (usize, &mut [u16])| {
            let src = if i < m { &a[i * k..(i + 1) * k] } else { &[] };
            round_into(src, row);
            row[src.len()..].fill(0);
        };
        if m * k >= PARALLEL_VALUES {
            self.data.par_chunks_mut(k_pad).enumerate().for_each(round);
        } else {
            self.data.chunks_mut(k_pad).enumerate().for_each(round);
        }
    }

    pub fn m(&self) -> usize {
        self.m
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// A left operand that [`tiled`] reads in 16-row × 32-value tiles: a padded matrix
/// ([`Bf16Rows`]) or a convolution's windows read in place ([`Windows`], [`TapRows`]).
///
/// # Safety
/// For every `row` that is a multiple of 16 below `⌈rows()/16⌉·16` and every `kc` below
/// `chunks()`, `tile(row, kc)` returns a pointer and a stride (in values) from which 16 rows of
/// 32 values are readable.
pub(super) unsafe trait TileSource: Sync {
    /// Rows of the product.
    fn rows(&self) -> usize;
    /// Depth in chunks of 32 values.
    fn chunks(&self) -> usize;
    /// Where the tile of rows `row ..` and depths `kc·32 ..` starts, and its row stride.
    fn tile(&self, row: usize, kc: usize) -> (*const u16, usize);
}

// SAFETY: `data` holds ⌈m/16⌉·16 rows of k_pad = chunks·32 values (`fill`).
unsafe impl TileSource for Bf16Rows {
    fn rows(&self) -> usize {
        self.m
    }
    fn chunks(&self) -> usize {
        self.k_pad / TILE_K
    }
    fn tile(&self, row: usize, kc: usize) -> (*const u16, usize) {
        (
            self.data[row * self.k_pad + kc * TILE_K..].as_ptr(),
            self.k_pad,
        )
    }
}

/// `b[k×n]` in bf16, packed as `⌈n/16⌉` panels of `k_pad/2` pair-rows × 16 columns × 2
/// values (zero outside the matrix).
#[derive(Debug, Clone, Default)]
pub struct PackedBf16 {
    k: usize,
    n: usize,
    k_pad: usize,
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Rounds and packs a row-major `k × n` fp32 matrix.
    pub fn new(b: &[f32], k: usize, n: usize) -> Self {
        let mut p = PackedBf16::default();
        p.fill(b, k, n);
        p
    }

    /// Repacks in place (the training step keeps the buffer). Every pair-row is written whole,
    /// zeros included, so nothing of the previous contents survives. Large matrices are packed
    /// on rayon's threads, 16 pair-rows a task.
    pub fn fill(&mut self, b: &[f32], k: usize, n: usize) {
        assert!(
            b.len() >= k * n,
            "PackedBf16: {k}×{n} does not fit in {}",
            b.len()
        );
        self.pack_with(k, n, |out, r0, cols| pack_pairs(b, (k, n), cols, r0, out));
    }

    /// Packs a row-major `k × n` matrix already rounded to bf16 (a padded buffer the
    /// training step wrote in bf16), as [`PackedBf16::fill`] packs the rounded fp32 one.
    pub fn fill_rounded(&mut self, b: &[u16], k: usize, n: usize) {
        assert!(
            b.len() >= k * n,
            "PackedBf16: {k}×{n} does not fit in {}",
            b.len()
        );
        self.pack_with(k, n, |out, r0, (c0, width)| {
            let row = |r: usize| match r < k {
                true => &b[r * n + c0..r * n + c0 + width],
                false => &[],
            };
            for (i, pair) in out.chunks_exact_mut(2 * TILE_M).enumerate() {
                let (even, odd) = (row(r0 + 2 * i), row(r0 + 2 * i + 1));
                if even.len() == TILE_M && odd.len() == TILE_M {
                    for ((p, &e), &o) in pair.chunks_exact_mut(2).zip(even).zip(odd) {
                        p[0] = e;
                        p[1] = o;
                    }
                } else {
                    for j in 0..TILE_M {
                        pair[2 * j] = even.get(j).copied().unwrap_or(0);
                        pair[2 * j + 1] = odd.get(j).copied().unwrap_or(0);
                    }
                }
            }
        });
    }

    /// Sizes the buffer for a `k × n` matrix and fills it in tasks of 16 pair-rows of one
    /// panel: `pack(out, r0, (c0, width))` writes the pair-rows from matrix row `r0` of
    /// columns `c0 .. c0 + width` (zeros past `k` and `width`). On rayon's threads when the
    /// matrix is large.
    fn pack_with(
        &mut self,
        k: usize,
        n: usize,
        pack: impl Fn(&mut [u16], usize, (usize, usize)) + Sync,
    ) {
        let k_pad = round_up(k.max(1), TILE_K);
        let panels = n.div_ceil(TILE_M);
        (self.k, self.n, self.k_pad) = (k, n, k_pad);
        self.data.resize(panels * k_pad * TILE_M, 0);
        let pairs_per_panel = k_pad / 2;
        const PAIRS: usize = 16;
        let task = |(t, chunk): (usize, &mut [u16])| {
            let g = t * PAIRS;
            let (panel, kp0) = (g / pairs_per_panel, g % pairs_per_panel);
            let c0 = panel * TILE_M;
            pack(chunk, 2 * kp0, (c0, (n - c0).min(TILE_M)));
        };
        // k_pad/2 is a multiple of 16, so no task straddles two panels.
        if k * n >= PARALLEL_VALUES {
            self.data
                .par_chunks_mut(PAIRS * 2 * TILE_M)
                .with_min_len(8)
                .enumerate()
                .for_each(task);
        } else {
            self.data
                .chunks_mut(PAIRS * 2 * TILE_M)
                .enumerate()
                .for_each(task);
        }
    }

    /// Where element `(r, j)` lives.
    #[cfg(test)]
    fn index(k_pad: usize, r: usize, j: usize) -> usize {
        let (panel, col) = (j / TILE_M, j % TILE_M);
        panel * k_pad * TILE_M + (r / 2) * 2 * TILE_M + col * 2 + (r % 2)
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(TILE_M)
    }

    /// The start of panel `p`'s pair-rows `kc·16 ..` (one 16 × 64-byte B tile per chunk).
    fn panel_ptr(&self, p: usize, kc: usize) -> *const u16 {
        self.data[p * self.k_pad * TILE_M + kc * TILE_K * TILE_M..].as_ptr()
    }
}

/// Which instructions run the bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Path {
    /// AMX tiles (`tdpbf16ps`): Intel Sapphire Rapids and later, with the kernel's permission.
    Amx,
    /// AVX512_BF16 (`vdpbf16ps`): Intel Cooper Lake and later, AMD Zen 4 and later.
    Avx512Bf16,
    /// The scalar emulation of the tile operations: everywhere, slowly; for tests.
    Emulated,
}

impl Bf16Path {
    /// The fastest path this CPU and kernel allow, or `None` when bf16 hardware is absent
    /// (callers then stay in fp32). Detected once per process.
    pub fn detect() -> Option<Bf16Path> {
        static PATH: std::sync::OnceLock<Option<Bf16Path>> = std::sync::OnceLock::new();
        *PATH.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if super::amx::available() {
                    return Some(Bf16Path::Amx);
                }
                if std::is_x86_feature_detected!("avx512bf16") {
                    return Some(Bf16Path::Avx512Bf16);
                }
            }
            None
        })
    }

    /// Whether this path can run here.
    pub fn supported(self) -> bool {
        match self {
            Bf16Path::Emulated => true,
            #[cfg(target_arch = "x86_64")]
            Bf16Path::Amx => super::amx::available(),
            #[cfg(target_arch = "x86_64")]
            Bf16Path::Avx512Bf16 => std::is_x86_feature_detected!("avx512bf16"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The name logs and benchmarks print ("amx-bf16", "avx512-bf16", "emulated-bf16").
    pub fn name(self) -> &'static str {
        match self {
            Bf16Path::Amx => "amx-bf16",
            Bf16Path::Avx512Bf16 => "avx512-bf16",
            Bf16Path::Emulated => "emulated-bf16",
        }
    }
}

/// Values of `a` from which [`Bf16Rows::fill`] rounds on all threads.
const PARALLEL_VALUES: usize = 1 << 16;

/// Rows of `c` per parallel task (a multiple of the 32-row block).
const ROWS_PER_TASK: usize = 128;

/// `c[m×n] = a · b` (row-major, row stride `ldc`), on `path`; with `threads`, row blocks are
/// split over rayon's threads (each value is still summed by one thread in one order, so the
/// result does not depend on the thread count).
///
/// Panics when `path` cannot run on this CPU or the shapes disagree.
pub fn gemm_bf16(
    path: Bf16Path,
    a: &Bf16Rows,
    b: &PackedBf16,
    c: &mut [f32],
    ldc: usize,
    threads: bool,
) {
    assert_eq!(a.k, b.k, "gemm_bf16: a is ·×{} but b is {}×·", a.k, b.k);
    match path {
        #[cfg(target_arch = "x86_64")]
        Bf16Path::Avx512Bf16 => split_rows(path, a.m, b.n, c, ldc, threads, |r0, rows, c| {
            // SAFETY: `split_rows` checked `supported()` before calling.
            unsafe { avx512bf16::gemm_rows(a, b, r0, rows, c, ldc) }
        }),
        _ => run_tiles(path, a, b, c, ldc, threads),
    }
}

/// `c = a · b` on a tile path (AMX or the emulation), rows split as [`gemm_bf16`] does.
pub(super) fn run_tiles<A: TileSource>(
    path: Bf16Path,
    a: &A,
    b: &PackedBf16,
    c: &mut [f32],
    ldc: usize,
    threads: bool,
) {
    split_rows(
        path,
        a.rows(),
        b.n,
        c,
        ldc,
        threads,
        |r0, rows, c| match path {
            Bf16Path::Emulated => tiled(&mut Emulated::default(), a, b, r0, rows, c, ldc),
            // SAFETY: `split_rows` checked `supported()` (CPU and AMX permission) before calling.
            #[cfg(target_arch = "x86_64")]
            Bf16Path::Amx => unsafe { super::amx::gemm_rows(a, b, r0, rows, c, ldc) },
            _ => panic!("{} has no tile operations", path.name()),
        },
    );
}

/// Runs `run(r0, rows, c)` over blocks of [`ROWS_PER_TASK`] rows of the `m × n` product `c`
/// (on rayon's threads with `threads`); each value is summed by one thread in one order either
/// way. Checks, for every path, that `c` is large enough and that `path` runs here.
fn split_rows(
    path: Bf16Path,
    m: usize,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    threads: bool,
    run: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        n <= ldc && (m - 1) * ldc + n <= c.len(),
        "bf16 product: c too small"
    );
    assert!(
        path.supported(),
        "bf16 product: {} is not available here",
        path.name()
    );
    let c = &mut c[..(m - 1) * ldc + n];
    let task = |(t, c): (usize, &mut [f32])| {
        let r0 = t * ROWS_PER_TASK;
        run(r0, (m - r0).min(ROWS_PER_TASK), c)
    };
    if threads && m > ROWS_PER_TASK {
        c.par_chunks_mut(ROWS_PER_TASK * ldc)
            .enumerate()
            .for_each(task);
    } else {
        c.chunks_mut(ROWS_PER_TASK * ldc).enumerate().for_each(task);
    }
}

/// The tile operations [`tiled`] needs: four 16×16 fp32 accumulators `c0..c3`, two A tiles
/// (16 rows × 32 bf16) and two B tiles (16 pair-rows × 16 columns × 2 bf16).
pub(super) trait Tiles {
    /// `c[t] = 0`.
    unsafe fn zero(&mut self, t: usize);
    /// A tile `t` from 16 rows of 32 values, `stride` values apart.
    unsafe fn load_a(&mut self, t: usize, src: *const u16, stride: usize);
    /// B tile `t` from 16 consecutive 64-byte pair-rows.
    unsafe fn load_b(&mut self, t: usize, src: *const u16);
    /// `c[ct] += a[at] · b[bt]`.
    unsafe fn dot(&mut self, ct: usize, at: usize, bt: usize);
    /// `c[t]` to 16 rows of 16 values, `stride` values apart.
    unsafe fn store(&mut self, t: usize, dst: *mut f32, stride: usize);
}

/// Rows `r0 .. r0 + rows` of `c = a · b` through tile operations, `c` starting at row `r0`:
/// blocks of 32 rows × 32 columns (four accumulators), smaller at the edges; a block that
/// overhangs `c` is stored to a scratch tile and copied. `t` must be usable on this CPU (for
/// AMX: supported, permitted and configured by the caller), which is why this is private to
/// the kernel module.
pub(super) fn tiled<T: Tiles, A: TileSource + ?Sized>(
    t: &mut T,
    a: &A,
    b: &PackedBf16,
    r0: usize,
    rows: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let (n, chunks, panels) = (b.n, a.chunks(), b.panels());
    assert_eq!(chunks, b.k_pad / TILE_K, "tiled: depths differ");
    let mut scratch = [0f32; TILE_M * TILE_M];
    for rb in (0..rows).step_by(2 * TILE_M) {
        let mt = if rows - rb > TILE_M { 2 } else { 1 };
        for pb in (0..panels).step_by(2) {
            let nt = (panels - pb).min(2);
            // SAFETY: `a` keeps ⌈m/16⌉·16 rows of its chunks readable (`TileSource`) and `b`
            // has ⌈n/16⌉ panels of k_pad pair-rows, so every tile read below is in bounds;
            // stores are bounds-checked.
            unsafe {
                for i in 0..mt {
                    for j in 0..nt {
                        t.zero(i * 2 + j);
                    }
                }
                for kc in 0..chunks {
                    for i in 0..mt {
                        let (src, stride) = a.tile(r0 + rb + i * TILE_M, kc);
                        t.load_a(i, src, stride);
                    }
                    for j in 0..nt {
                        t.load_b(j, b.panel_ptr(pb + j, kc));
                    }
                    for i in 0..mt {
                        for j in 0..nt {
                            t.dot(i * 2 + j, i, j);
                        }
                    }
                }
                for i in 0..mt {
                    for j in 0..nt {
                        let (row, col) = (rb + i * TILE_M, (pb + j) * TILE_M);
                        let (vr, vc) = ((rows - row).min(TILE_M), (n - col).min(TILE_M));
                        if vr == TILE_M && vc == TILE_M {
                            let end = (row + TILE_M - 1) * ldc + col + TILE_M;
                            assert!(end <= c.len());
                            t.store(i * 2 + j, c[row * ldc + col..].as_mut_ptr(), ldc);
                        } else {
                            t.store(i * 2 + j, scratch.as_mut_ptr(), TILE_M);
                            for r in 0..vr {
                                c[(row + r) * ldc + col..][..vc]
                                    .copy_from_slice(&scratch[r * TILE_M..][..vc]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The tile operations in scalar code, summing each pair as `tdpbf16ps` is specified to:
/// `c += a[2i]·b[2i]`, then `c += a[2i+1]·b[2i+1]`, in fp32 (bf16 products are exact in fp32).
pub(super) struct Emulated {
    c: [[f32; TILE_M * TILE_M]; 4],
    a: [[u16; TILE_M * TILE_K]; 2],
    b: [[u16; TILE_M * TILE_K]; 2],
}

impl Default for Emulated {
    fn default() -> Self {
        Emulated {
            c: [[0.0; TILE_M * TILE_M]; 4],
            a: [[0; TILE_M * TILE_K]; 2],
            b: [[0; TILE_M * TILE_K]; 2],
        }
    }
}

impl Tiles for Emulated {
    unsafe fn zero(&mut self, t: usize) {
        self.c[t] = [0.0; TILE_M * TILE_M];
    }

    unsafe fn load_a(&mut self, t: usize, src: *const u16, stride: usize) {
        for r in 0..TILE_M {
            for v in 0..TILE_K {
                // SAFETY: the caller keeps 16 rows of 32 values readable.
                self.a[t][r * TILE_K + v] = unsafe { *src.add(r * stride + v) };
            }
        }
    }

    unsafe fn load_b(&mut self, t: usize, src: *const u16) {
        for v in 0..TILE_M * TILE_K {
            // SAFETY: the caller keeps 16 × 32 values readable.
            self.b[t][v] = unsafe { *src.add(v) };
        }
    }

    unsafe fn dot(&mut self, ct: usize, at: usize, bt: usize) {
        let (a, b) = (&self.a[at], &self.b[bt]);
        for i in 0..TILE_M {
            for j in 0..TILE_M {
                let mut s = self.c[ct][i * TILE_M + j];
                for p in 0..TILE_K / 2 {
                    for h in 0..2 {
                        s +=
                            from_bf16(a[i * TILE_K + 2 * p + h]) * from_bf16(b[p * 32 + j * 2 + h]);
                    }
                }
                self.c[ct][i * TILE_M + j] = s;
            }
        }
    }

    unsafe fn store(&mut self, t: usize, dst: *mut f32, stride: usize) {
        for r in 0..TILE_M {
            for v in 0..TILE_M {
                // SAFETY: the caller keeps 16 rows of 16 values writable.
                unsafe { *dst.add(r * stride + v) = self.c[t][r * TILE_M + v] };
            }
        }
    }
}

/// The AVX512_BF16 path: 8 rows × 32 columns of accumulators in zmm registers, one
/// `vdpbf16ps` per row and panel for each pair of depths.
#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use super::{Bf16Rows, PackedBf16, TILE_M};
    use std::arch::x86_64::*;

    const ROWS: usize = 8;

    /// Rows `r0 .. r0 + rows` of `c = a · b`, `c` starting at row `r0`.
    ///
    /// # Safety
    /// The CPU must have AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn gemm_rows(
        a: &Bf16Rows,
        b: &PackedBf16,
        r0: usize,
        rows: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        let (n, pairs, panels) = (b.n, a.k_pad / 2, b.panels());
        let a_rows = a.data.len() / a.k_pad;
        for rb in (0..rows).step_by(ROWS) {
            for pb in (0..panels).step_by(2) {
                let two = panels - pb >= 2;
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                let p0 = b.panel_ptr(pb, 0);
                let p1 = if two { b.panel_ptr(pb + 1, 0) } else { p0 };
                for kp in 0..pairs {
                    // SAFETY: panels hold k_pad/2 pair-rows of 16 dwords each.
                    let (b0, b1) = unsafe {
                        (
                            _mm512_loadu_si512(p0.add(kp * 2 * TILE_M).cast()),
                            _mm512_loadu_si512(p1.add(kp * 2 * TILE_M).cast()),
                        )
                    };
                    let (b0, b1) = (
                        std::mem::transmute::<__m512i, __m512bh>(b0),
                        std::mem::transmute::<__m512i, __m512bh>(b1),
                    );
                    for (r, acc) in acc.iter_mut().enumerate() {
                        // Rows past the padded matrix (a short last block) read row 0: in
                        // bounds, and never stored.
                        let row = r0 + rb + r;
                        let row = if row < a_rows { row } else { 0 };
                        // SAFETY: row < a_rows and 2·kp + 1 < k_pad.
                        let pair = unsafe {
                            (a.data.as_ptr().add(row * a.k_pad + 2 * kp) as *const i32)
                                .read_unaligned()
                        };
                        let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                        acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                        if two {
                            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate().take((rows - rb).min(ROWS)) {
                    let row = (rb + r) * ldc;
                    for (j, v) in acc.iter().enumerate().take(if two { 2 } else { 1 }) {
                        let col = (pb + j) * TILE_M;
                        let valid = (n - col).min(TILE_M);
                        let dst = &mut c[row + col..row + col + valid];
                        let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
                        // SAFETY: the mask limits the store to `dst`.
                        unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, *v) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Deterministic values in [−1, 1) (an LCG), for the kernels' tests.
    pub(in crate::kernels) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The plain triple loop over the rounded operands, summing in the order the tiles do
    /// (depth ascending), in fp32.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f32;
                for r in 0..k {
                    s += from_bf16(to_bf16(a[i * k + r])) * from_bf16(to_bf16(b[r * n + j]));
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    /// Σ |a_ir|·|b_rj| per output, the scale of its rounding error.
    fn magnitude(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|r| (a[i * k + r] * b[r * n + j]).abs()).sum();
            }
        }
        c
    }

    /// Shapes covering every edge: one and two row tiles, short blocks, one and two panels,
    /// ragged columns, depths below, at and above one 32-chunk, odd depths.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (3, 5, 7),
        (16, 32, 16),
        (17, 33, 17),
        (31, 64, 33),
        (32, 31, 32),
        (45, 95, 50),
        (129, 288, 96),
        (200, 9, 40),
    ];

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above the tie rounds up.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "overflow is infinity");
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(-0.0), 0x8000);
        for x in values(1000, 3) {
            let y = from_bf16(to_bf16(x));
            assert!((x - y).abs() <= x.abs() / 256.0, "{x} → {y}");
        }
    }

    /// The 16-lane rounding (and pairing) gives [`to_bf16`]'s bits on every kind of value:
    /// ties both ways, denormals, signed zeros, infinities, overflow, NaNs with payloads, and
    /// lengths that leave a scalar tail.
    #[test]
    fn vector_rounding_equals_the_scalar_rounding() {
        let mut xs: Vec<f32> = [
            0x3f80_8000u32, // a tie to even (down)
            0x3f81_8000,    // a tie to even (up)
            0x3f80_8001,
            0x0000_0001, // the smallest denormal
            0x807f_ffff, // the largest negative denormal
            0x8000_0000,
            0x7f7f_ffff, // f32::MAX: rounds to infinity
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001, // a signalling NaN: quieted, payload kept
            0xffbf_ffff,
        ]
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect();
        xs.extend(values(1000, 11).iter().map(|v| v * 1e-3));
        for len in [0, 1, 15, 16, 17, 33, xs.len()] {
            let mut got = vec![7u16; len];
            round_into(&xs[..len], &mut got);
            let want: Vec<u16> = xs[..len].iter().map(|&v| to_bf16(v)).collect();
            assert_eq!(got, want, "{len} values");
        }
        // As a 16-column panel: whole pair-rows (the 16-lane path), then with a last row
        // alone (the scalar path).
        for k in [62usize, 63] {
            let mut got = vec![7u16; k.div_ceil(2) * 32];
            pack_pairs(&xs, (k, 16), (0, 16), 0, &mut got);
            for r in 0..k.div_ceil(2) * 2 {
                for j in 0..16 {
                    let want = if r < k { to_bf16(xs[r * 16 + j]) } else { 0 };
                    assert_eq!(got[r / 2 * 32 + 2 * j + r % 2], want, "row {r} column {j}");
                }
            }
        }
    }

    #[test]
    fn packing_places_every_value() {
        let (k, n) = (37, 21);
        let b = values(k * n, 5);
        let p = PackedBf16::new(&b, k, n);
        for r in 0..k {
            for j in 0..n {
                assert_eq!(
                    p.data[PackedBf16::index(p.k_pad, r, j)],
                    to_bf16(b[r * n + j])
                );
            }
        }
        let nonzero = p.data.iter().filter(|&&v| v != 0).count();
        assert_eq!(
            nonzero,
            b.iter().filter(|&&v| to_bf16(v) & 0x7fff != 0).count()
        );
    }

    /// Packing values already rounded gives the packing of the fp32 values, partial panels
    /// and an odd last row included, also into a buffer that held a larger matrix.
    #[test]
    fn packing_rounded_values_equals_rounding_while_packing() {
        let mut reused = PackedBf16::default();
        for (k, n) in [(300, 64), (37, 21), (64, 32), (1, 16), (101, 48)] {
            let b = values(k * n, (k * n) as u64);
            let rounded: Vec<u16> = b.iter().map(|&v| to_bf16(v)).collect();
            reused.fill_rounded(&rounded, k, n);
            let want = PackedBf16::new(&b, k, n);
            assert_eq!((reused.k, reused.n, reused.k_pad), (k, n, want.k_pad));
            assert_eq!(reused.data, want.data, "{k}×{n}");
        }
    }

    /// A refilled buffer equals a fresh one, whether the new matrix is smaller or larger and
    /// whether it is rounded on one thread or on all (sizes on both sides of the threshold).
    #[test]
    fn refilling_equals_a_fresh_buffer() {
        let mut reused = Bf16Rows::default();
        for (m, k) in [(300, 300), (5, 37), (1, 1), (17, 33), (400, 200), (3, 64)] {
            let a = values(m * k, (m + k) as u64);
            reused.fill(&a, m, k);
            let mut fresh = Bf16Rows::default();
            fresh.k_pad = round_up(k, TILE_K);
            fresh.data = vec![0; round_up(m, TILE_M) * fresh.k_pad];
            for i in 0..m {
                for j in 0..k {
                    fresh.data[i * fresh.k_pad + j] = to_bf16(a[i * k + j]);
                }
            }
            assert_eq!((reused.m, reused.k, reused.k_pad), (m, k, fresh.k_pad));
            assert_eq!(reused.data, fresh.data, "{m}×{k}");
        }
    }

    /// The tiling loop over the emulated tiles gives exactly the plain loop's sums: same
    /// products, same order. This covers the blocking and edge logic that drives AMX.
    #[test]
    fn emulated_tiles_equal_the_plain_loop() {
        for (m, k, n) in SHAPES {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let mut c = vec![f32::NAN; m * n];
            let (pa, pb) = (Bf16Rows::from_f32(&a, m, k), PackedBf16::new(&b, k, n));
            gemm_bf16(Bf16Path::Emulated, &pa, &pb, &mut c, n, false);
            assert_eq!(c, reference(&a, &b, m, k, n), "{m}×{k}×{n}");
        }
    }

    /// A row stride wider than `n` leaves the gap untouched, and threads change nothing.
    #[test]
    fn strided_output_and_threads() {
        let (m, k, n, ldc) = (300, 40, 20, 27);
        let (a, b) = (values(m * k, 7), values(k * n, 8));
        let (pa, pb) = (Bf16Rows::from_f32(&a, m, k), PackedBf16::new(&b, k, n));
        let mut one = vec![-7f32; m * ldc];
        let mut many = one.clone();
        gemm_bf16(Bf16Path::Emulated, &pa, &pb, &mut one, ldc, false);
        gemm_bf16(Bf16Path::Emulated, &pa, &pb, &mut many, ldc, true);
        assert_eq!(one, many);
        let want = reference(&a, &b, m, k, n);
        for i in 0..m {
            assert_eq!(&one[i * ldc..i * ldc + n], &want[i * n..(i + 1) * n]);
            assert!(one[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == -7.0));
        }
    }

    /// Every hardware path against the emulation: the same rounded products, summed in an
    /// order the hardware chooses, so within fp32 rounding of Σ|a||b| (2^-20 relative, far
    /// below bf16's own 2^-8). Paths this CPU lacks say so and are skipped.
    #[test]
    fn hardware_paths_match_the_emulation() {
        for path in [Bf16Path::Amx, Bf16Path::Avx512Bf16] {
            if !path.supported() {
                eprintln!("skipped: {} is not available on this CPU", path.name());
                continue;
            }
            for (m, k, n) in SHAPES {
                let (a, b) = (values(m * k, 11), values(k * n, 12));
                let (pa, pb) = (Bf16Rows::from_f32(&a, m, k), PackedBf16::new(&b, k, n));
                let mut want = vec![0f32; m * n];
                gemm_bf16(Bf16Path::Emulated, &pa, &pb, &mut want, n, false);
                let mut got = vec![f32::NAN; m * n];
                gemm_bf16(path, &pa, &pb, &mut got, n, true);
                let mag = magnitude(&a, &b, m, k, n);
                for i in 0..m * n {
                    let tol = mag[i] * (k as f32) * 2f32.powi(-22) + 1e-30;
                    assert!(
                        (got[i] - want[i]).abs() <= tol,
                        "{} {m}×{k}×{n} [{i}]: {} vs {} (tol {tol})",
                        path.name(),
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }

    /// The stated tolerance against full fp32 products: each operand is off by at most 2^-9
    /// relative, so each product by about 2^-8, hence |bf16 − fp32| ≤ 2^-8 · Σ|a||b| (plus
    /// fp32 summation error).
    #[test]
    fn bf16_is_within_its_rounding_of_fp32() {
        let path = Bf16Path::detect().unwrap_or(Bf16Path::Emulated);
        eprintln!("bf16 path: {}", path.name());
        for (m, k, n) in SHAPES {
            let (a, b) = (values(m * k, 21), values(k * n, 22));
            let (pa, pb) = (Bf16Rows::from_f32(&a, m, k), PackedBf16::new(&b, k, n));
            let mut got = vec![0f32; m * n];
            gemm_bf16(path, &pa, &pb, &mut got, n, false);
            let mag = magnitude(&a, &b, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|r| a[i * k + r] as f64 * b[r * n + j] as f64)
                        .sum();
                    let tol = mag[i * n + j] as f64 * (2f64.powi(-8) + k as f64 * 2f64.powi(-23));
                    let err = (got[i * n + j] as f64 - exact).abs();
                    assert!(err <= tol, "{m}×{k}×{n} ({i},{j}): err {err} > {tol}");
                }
            }
        }
    }
}
