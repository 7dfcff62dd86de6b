//! The CPU compute engine, at the bottom of the library: packed GEMM, convolution windows
//! read in place, the outer-product sums of weight gradients, bf16 products ([`bf16`]) and
//! GELU ([`activation`]). The planned executor
//! (`onnx::plan`) and the training step (`fmnist-train`'s `cnn_step.rs`) both run on these, so
//! a kernel is written, tuned and tested once.
//!
//! The core is `out = act(a · b + bias)` with `b` (the weights) packed once at load.
//!
//! Why not only the `gemm` crate: on stable Rust it runs AVX2 kernels (its AVX-512 ones need
//! the `nightly` feature) and packs the weights on every call. On an AVX-512 CPU the kernel
//! in `avx512.rs` — up to 12 rows × 32 columns of accumulators in zmm registers, weights pre-packed
//! into 16-column panels, bias and ReLU applied while the results are still in registers —
//! does the same products in about half the time. Other CPUs, and widths that are not a
//! multiple of 16, go to `gemm`.

/// Weights `[k, n]` (row-major) in the layout the kernel reads: `n / 16` panels of `[k][16]`.
#[derive(Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// The row-major matrix, for the `gemm` fallback.
    plain: Vec<f32>,
    /// Panel layout, when the AVX-512 kernel can be used.
    panels: Option<Vec<f32>>,
}

const NR: usize = 16;
const MR: usize = 12;

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether code compiled with AVX-512 F, BW, DQ and VL may run here: the training engine
/// compiles its batch-norm and activation loops a second time with them (16 lanes instead of
/// the baseline target's 4).
pub fn avx512_wide() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The fp32 kernel path this CPU takes: `"avx512-fp32"` (the 12×32 register-blocked
/// kernels, for widths that are multiples of 16) or `"portable-fp32"` (the `gemm` crate
/// throughout). Training records it, since the path fixes the order of every sum and so the
/// bits a seed gives.
pub fn fp32_path() -> &'static str {
    if avx512() {
        "avx512-fp32"
    } else {
        "portable-fp32"
    }
}

impl PackedB {
    pub fn new(plain: Vec<f32>, k: usize, n: usize) -> Self {
        Self::with_kernel(plain, k, n, true)
    }

    /// `allow_avx512: false` always takes the portable path (tests compare the two).
    pub fn with_kernel(plain: Vec<f32>, k: usize, n: usize, allow_avx512: bool) -> Self {
        assert_eq!(plain.len(), k * n);
        let panels = (n.is_multiple_of(NR) && n > 0 && allow_avx512 && avx512()).then(|| {
            let mut p = vec![0f32; k * n];
            for j in 0..n / NR {
                for r in 0..k {
                    p[(j * k + r) * NR..(j * k + r + 1) * NR]
                        .copy_from_slice(&plain[r * n + j * NR..r * n + (j + 1) * NR]);
                }
            }
            p
        });
        PackedB {
            k,
            n,
            plain,
            panels,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The row-major `[k, n]` values.
    pub fn plain(&self) -> &[f32] {
        &self.plain
    }

    /// Which kernel runs: for logs and benchmarks.
    pub fn kernel_name(&self) -> &'static str {
        if self.panels.is_some() {
            "avx512"
        } else {
            "gemm"
        }
    }
}

/// `out[m×n] = a[m×k] · b + bias`, then ReLU when `relu`; all row-major, on this thread.
pub fn matmul_bias_act(
    a: &[f32],
    m: usize,
    b: &PackedB,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    let (k, n) = (b.k, b.n);
    assert!(a.len() >= m * k && out.len() >= m * n && bias.len() == n);
    if m == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(panels) = &b.panels {
        // SAFETY: panels exist only when the CPU has AVX-512F (checked in PackedB::new), and
        // the asserts above bound every access the kernel makes.
        unsafe { avx512::conv(a, &Windows::rows(k), None, 0, m, n, panels, bias, relu, out) };
        return;
    }
    sgemm(m, k, n, a, &b.plain, out);
    for row in out[..m * n].chunks_exact_mut(n) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
            if relu {
                *v = v.max(0.0);
            }
        }
    }
}

/// Output columns `[j0, j1)` of one row: `out = act(a · b[:, j0..j1] + bias[j0..j1])`, with
/// `j0` and `j1` multiples of 16. Lets threads share one image's fully connected layer, each
/// reading only its own columns' weights.
pub fn matvec_cols(
    a: &[f32],
    b: &PackedB,
    (j0, j1): (usize, usize),
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    let (k, n) = (b.k, b.n);
    assert!(j0.is_multiple_of(NR) && j1.is_multiple_of(NR) && j0 <= j1 && j1 <= n);
    assert!(a.len() >= k && out.len() >= j1 - j0 && bias.len() == n);
    let (cols, bias) = (j1 - j0, &bias[j0..j1]);
    #[cfg(target_arch = "x86_64")]
    if let Some(panels) = &b.panels {
        let panels = &panels[j0 * k..j1 * k];
        // SAFETY: as in matmul_bias_act, for the panels of these columns and one row.
        unsafe {
            avx512::conv(
                a,
                &Windows::rows(k),
                None,
                0,
                1,
                cols,
                panels,
                bias,
                relu,
                out,
            )
        };
        return;
    }
    let plain = Mat {
        data: &b.plain[j0..],
        rs: n,
        cs: 1,
    };
    sgemm_strided(1, cols, k, Mat::rows(a, k), plain, out, cols, false);
    for (v, b) in out[..cols].iter_mut().zip(bias) {
        *v += b;
        if relu {
            *v = v.max(0.0);
        }
    }
}

/// Where a convolution's rows of input values lie in a (pre-padded) channels-last batch: row
/// `r` (image × output position) is `segs` runs of `seg_len` contiguous values, one per kernel
/// row, the first at [`Windows::base`] and the next `seg_stride` further on. The kernels read
/// them in place, so no im2col matrix is written and read back.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Output positions per image.
    pub ohw: usize,
    /// Output width.
    pub ow: usize,
    /// Values per padded input image.
    pub img_stride: usize,
    /// Offset between output rows (stride × padded width × channels).
    pub row_step: usize,
    /// Offset between output columns (stride × channels).
    pub col_step: usize,
    /// Kernel rows.
    pub segs: usize,
    /// Kernel width × channels.
    pub seg_len: usize,
    /// Padded width × channels.
    pub seg_stride: usize,
}

impl Windows {
    /// A plain row-major matrix `[rows, k]` as the degenerate window: one run of `k` values
    /// per row.
    pub fn rows(k: usize) -> Self {
        Windows {
            ohw: usize::MAX,
            ow: 1,
            img_stride: 0,
            row_step: k,
            col_step: 0,
            segs: 1,
            seg_len: k,
            seg_stride: 0,
        }
    }

    /// Offset of row `r`'s first run.
    #[inline(always)]
    pub fn base(&self, r: usize) -> usize {
        let (img, pos) = (r / self.ohw, r % self.ohw);
        img * self.img_stride + (pos / self.ow) * self.row_step + (pos % self.ow) * self.col_step
    }

    /// A cursor at row `r` that steps to the following rows without dividing: the kernels
    /// need each row's base, and two 64-bit divisions per row cost as much as a 3×3×1
    /// convolution's arithmetic.
    #[inline(always)]
    pub fn cursor(&self, r: usize) -> RowCursor {
        let (img, pos) = (r / self.ohw, r % self.ohw);
        let (y, x) = (pos / self.ow, pos % self.ow);
        RowCursor {
            last: 0,
            row: img * self.img_stride + y * self.row_step,
            x,
            y,
            img_start: img * self.img_stride,
        }
    }

    /// Values one row holds (the GEMM depth).
    pub fn k(&self) -> usize {
        self.segs * self.seg_len
    }

    /// Copies rows `[r0, r0 + rows)` into `col` (`rows × k`, row-major).
    pub fn gather(&self, src: &[f32], r0: usize, rows: usize, col: &mut [f32]) {
        let k = self.k();
        let mut at = self.cursor(r0);
        for dst in col[..rows * k].chunks_exact_mut(k) {
            self.copy_row(src, at.next_base(self), dst);
        }
    }

    /// Copies the row whose first run starts at `base` into `dst` (`k` values).
    fn copy_row(&self, src: &[f32], base: usize, dst: &mut [f32]) {
        for (s, d) in dst.chunks_exact_mut(self.seg_len).enumerate() {
            let at = base + s * self.seg_stride;
            d.copy_from_slice(&src[at..at + self.seg_len]);
        }
    }
}

/// Walks the rows of a [`Windows`] in order; see [`Windows::cursor`].
#[derive(Debug, Clone, Copy)]
pub struct RowCursor {
    /// The base [`RowCursor::next_base`] returned last.
    pub last: usize,
    /// Offset of the current output row's first column.
    row: usize,
    x: usize,
    y: usize,
    img_start: usize,
}

impl RowCursor {
    /// The current row's base, then a step to the next row.
    #[inline(always)]
    pub fn next_base(&mut self, win: &Windows) -> usize {
        let base = self.row + self.x * win.col_step;
        self.last = base;
        self.x += 1;
        if self.x == win.ow {
            self.x = 0;
            self.y += 1;
            self.row += win.row_step;
            if self.y * win.ow == win.ohw {
                self.y = 0;
                self.img_start += win.img_stride;
                self.row = self.img_start;
            }
        }
        base
    }
}

thread_local! {
    /// Per-thread gathered rows for the fallback path (reused; every value is overwritten).
    static COL_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Convolution rows `[r0, r0 + rows)` as `act(windows · b + bias)` into `out` (`rows × n`).
#[allow(clippy::too_many_arguments)]
pub fn conv_bias_act(
    src: &[f32],
    win: &Windows,
    r0: usize,
    rows: usize,
    b: &PackedB,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    assert_eq!(win.k(), b.k);
    assert!(out.len() >= rows * b.n && bias.len() == b.n);
    if rows == 0 {
        return;
    }
    // Every run of every row must lie inside `src`: the last row's last run ends furthest.
    let last = win.base(r0 + rows - 1) + (win.segs - 1) * win.seg_stride + win.seg_len;
    let first_row_end = win.base(r0) + (win.segs - 1) * win.seg_stride + win.seg_len;
    assert!(last <= src.len() && first_row_end <= src.len());
    #[cfg(target_arch = "x86_64")]
    if let Some(panels) = &b.panels {
        // SAFETY: panels exist only with AVX-512F; bases grow with the row index, so the
        // check above bounds every run the kernel reads, and `out` holds rows × n values.
        unsafe { avx512::conv(src, win, None, r0, rows, b.n, panels, bias, relu, out) };
        return;
    }
    let step = (256 * 1024 / (4 * b.k.max(1))).max(8);
    COL_SCRATCH.with_borrow_mut(|col| {
        let mut done = 0;
        while done < rows {
            let r = step.min(rows - done);
            if col.len() < r * b.k {
                col.resize(r * b.k, 0.0);
            }
            win.gather(src, r0 + done, r, col);
            let o = &mut out[done * b.n..(done + r) * b.n];
            matmul_bias_act(col, r, b, bias, relu, o);
            done += r;
        }
    });
}

/// Convolution followed by a 2×2, stride-2 max-pool, for pooled outputs `[p0, p0 + count)`
/// (image × pooled position) into `out` (`count × n`). `win` describes the convolution; the
/// pooled map is `(oh / 2) × (ow / 2)` (floor, as ONNX's default `ceil_mode = 0`).
///
/// Why fused: the four convolution rows of each window are computed side by side and reduced
/// while they are still in registers, so the full-size map is never stored and read back —
/// at 28×28×32 that store and the separate pooling pass took longer than the arithmetic.
/// `max(a + b, c + b) = max(a, c) + b` and ReLU is monotonic, so bias and ReLU go after the
/// max, and the result equals pooling [`conv_bias_act`]'s output exactly.
#[allow(clippy::too_many_arguments)]
pub fn conv_pool2_bias_act(
    src: &[f32],
    win: &Windows,
    p0: usize,
    count: usize,
    b: &PackedB,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    assert_eq!(win.k(), b.k);
    assert!(out.len() >= count * b.n && bias.len() == b.n);
    let (oh, ow) = (win.ohw / win.ow, win.ow);
    let (ph, pw) = (oh / 2, ow / 2);
    if count == 0 || ph * pw == 0 {
        return;
    }
    // The pooled grid as windows of its own: each "row" is a window's top-left convolution
    // row, and `quad` reaches its four convolution rows from there.
    let grid = Windows {
        ohw: ph * pw,
        ow: pw,
        row_step: 2 * win.row_step,
        col_step: 2 * win.col_step,
        ..*win
    };
    let quad = [0, win.col_step, win.row_step, win.row_step + win.col_step];
    let reach = quad[3] + (win.segs - 1) * win.seg_stride + win.seg_len;
    assert!(grid.base(p0 + count - 1) + reach <= src.len());
    #[cfg(target_arch = "x86_64")]
    if let Some(panels) = &b.panels {
        // SAFETY: as in conv_bias_act; the last window's last row reaches furthest.
        unsafe {
            avx512::conv(
                src,
                &grid,
                Some(quad),
                p0,
                count,
                b.n,
                panels,
                bias,
                relu,
                out,
            )
        };
        return;
    }
    // Portable path: the four rows of each window gathered side by side, multiplied, then
    // reduced.
    let n = b.n;
    COL_SCRATCH.with_borrow_mut(|col| {
        let mut rows4 = Vec::new();
        let step = ((256 * 1024 / (4 * b.k.max(1))) / 4).max(2);
        let mut at = grid.cursor(p0);
        let mut done = 0;
        while done < count {
            let u = step.min(count - done);
            if col.len() < 4 * u * b.k {
                col.resize(4 * u * b.k, 0.0);
            }
            for (i, dst) in col[..4 * u * b.k].chunks_exact_mut(b.k).enumerate() {
                if i % 4 == 0 {
                    at.next_base(&grid);
                }
                win.copy_row(src, at.last + quad[i % 4], dst);
            }
            rows4.resize(4 * u * n, 0.0);
            matmul_bias_act(col, 4 * u, b, bias, relu, &mut rows4);
            for (o, four) in out[done * n..(done + u) * n]
                .chunks_exact_mut(n)
                .zip(rows4.chunks_exact(4 * n))
            {
                for (j, o) in o.iter_mut().enumerate() {
                    *o = four[j]
                        .max(four[n + j])
                        .max(four[2 * n + j].max(four[3 * n + j]));
                }
            }
            done += u;
        }
    });
}

/// `dst[m×n] = a[m×k] · b[k×n]`, all row-major and contiguous, on the calling thread (the
/// `gemm` crate's AVX2/FMA kernels, chosen at run time).
pub fn sgemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], dst: &mut [f32]) {
    sgemm_strided(m, n, k, Mat::rows(a, k), Mat::rows(b, n), dst, n, false);
}

/// A matrix operand of [`sgemm_strided`]: element `(i, j)` is `data[i·rs + j·cs]`, so a
/// transposed view costs nothing (swap the strides).
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether an `r × c` matrix fits in `data`.
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst[m×n] = a[m×k] · b[k×n]` for strided operands, `dst` row-major with row stride
/// `dst_rs`. `threads`: split the output over rayon's threads (each value is still summed
/// by one thread in one order, so results do not depend on the thread count).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    dst: &mut [f32],
    dst_rs: usize,
    threads: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst_rs && (m - 1) * dst_rs + n <= dst.len());
    if k == 0 {
        for row in dst.chunks_mut(dst_rs).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    assert!(
        a.fits(m, k) && b.fits(k, n),
        "sgemm_strided: operand out of bounds"
    );
    // SAFETY: the asserts above keep every access of the three matrices in bounds, and `dst`
    // (borrowed mutably) cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            if threads {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// `c[m×n] = Σ_{r<k} a_r ⊗ b_r`: the sum of outer products of `k` row pairs, row `r` of `a`
/// being `m` values from `a[r·a_rs]` and row `r` of `b` `n` values from `b[r·b_rs]`; `c`
/// row-major. This is a layer's weight gradient (inputs ⊗ output gradients, summed over
/// positions), with both operands read in place: rows may overlap, as the windows of a
/// convolution do. On AVX-512 CPUs with `n` a multiple of 16 it runs the same 12×32
/// register-blocked loop as the convolution kernel; elsewhere `gemm`.
#[allow(clippy::too_many_arguments)]
pub fn outer_sum(
    k: usize,
    m: usize,
    a: &[f32],
    a_rs: usize,
    n: usize,
    b: &[f32],
    b_rs: usize,
    c: &mut [f32],
) {
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    assert!((k - 1) * a_rs + m <= a.len() && (k - 1) * b_rs + n <= b.len());
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(NR) && avx512() {
        // SAFETY: AVX-512F was detected; the asserts above bound every row read and `c`.
        unsafe { avx512::outer_sum(k, m, a, a_rs, n, b, b_rs, c) };
        return;
    }
    sgemm_strided(
        m,
        n,
        k,
        Mat {
            data: a,
            rs: 1,
            cs: a_rs,
        },
        Mat {
            data: b,
            rs: b_rs,
            cs: 1,
        },
        c,
        n,
        false,
    );
}

pub mod activation;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod bf16;
pub mod conv_bf16;

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        a: &[f32],
        m: usize,
        k: usize,
        b: &[f32],
        n: usize,
        bias: &[f32],
        relu: bool,
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for r in 0..k {
                    s += a[i * k + r] as f64 * b[r * n + j] as f64;
                }
                let v = s as f32 + bias[j];
                out[i * n + j] = if relu { v.max(0.0) } else { v };
            }
        }
        out
    }

    /// Every row remainder (1–6), one and two panels, odd depths, widths that take the
    /// fallback; against a float64 reference.
    #[test]
    fn matches_a_plain_triple_loop() {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(m, k, n) in &[
            (1, 1, 16),
            (5, 7, 16),
            (6, 9, 32),
            (7, 288, 64),
            (13, 33, 48),
            (64, 3136, 128),
            (3, 5, 10),
            (17, 100, 24),
            (2, 4096, 16),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            for packed in [
                PackedB::new(b.clone(), k, n),
                PackedB::with_kernel(b.clone(), k, n, false),
            ] {
                for relu in [false, true] {
                    let mut out = vec![f32::NAN; m * n];
                    matmul_bias_act(&a, m, &packed, &bias, relu, &mut out);
                    let want = reference(&a, m, k, &b, n, &bias, relu);
                    let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                    // The first row, column block by column block (16 at a time, then all).
                    if n.is_multiple_of(16) {
                        for (j0, j1) in (0..n / 16).map(|j| (16 * j, 16 * j + 16)).chain([(0, n)]) {
                            let mut part = vec![f32::NAN; j1 - j0];
                            matvec_cols(&a[..k], &packed, (j0, j1), &bias, relu, &mut part);
                            for (j, x) in part.iter().enumerate() {
                                let y = want[j0 + j];
                                assert!(
                                    (x - y).abs() <= tol,
                                    "cols {j0}..{j1} k{k} n{n} relu {relu} [{j}]: {x} vs {y} ({})",
                                    packed.kernel_name()
                                );
                            }
                        }
                    }
                    for (i, (x, y)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (x - y).abs() <= tol,
                            "m{m} k{k} n{n} relu {relu} [{i}]: {x} vs {y} ({})",
                            packed.kernel_name()
                        );
                    }
                }
            }
        }
    }
}

/// A deterministic stream of indices below `m` for the tests (no seed source needed).
#[cfg(test)]
fn test_index_stream(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |m| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as usize) % m
    }
}

#[cfg(test)]
mod conv_tests {
    use super::*;

    /// Windows read in place (AVX-512 where present) and gathered (portable path) against a
    /// direct convolution loop, for odd sizes, strides, kernel sizes and channel counts.
    #[test]
    fn in_place_windows_match_a_direct_convolution() {
        let mut next = test_index_stream(3);
        for case in 0..40 {
            let (k, s) = (1 + next(4), 1 + next(2));
            let (c, cout) = (1 + next(5), 16 * (1 + next(3)));
            let (hp, wp) = (k + next(9), k + next(9));
            let n = 1 + next(3);
            let (oh, ow) = ((hp - k) / s + 1, (wp - k) / s + 1);
            let src: Vec<f32> = (0..n * hp * wp * c)
                .map(|_| next(2001) as f32 / 1000.0 - 1.0)
                .collect();
            let kk = k * k * c;
            let w: Vec<f32> = (0..kk * cout)
                .map(|_| next(2001) as f32 / 1000.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..cout)
                .map(|_| next(2001) as f32 / 1000.0 - 1.0)
                .collect();
            let win = Windows {
                ohw: oh * ow,
                ow,
                img_stride: hp * wp * c,
                row_step: s * wp * c,
                col_step: s * c,
                segs: k,
                seg_len: k * c,
                seg_stride: wp * c,
            };
            let m = n * oh * ow;
            // Direct loop: out[b, oy, ox, o].
            let direct = |relu: bool| {
                let mut out = vec![0f32; m * cout];
                for b in 0..n {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            for o in 0..cout {
                                let mut v = bias[o] as f64;
                                for ky in 0..k {
                                    for kx in 0..k {
                                        for ch in 0..c {
                                            let x =
                                                src[((b * hp + oy * s + ky) * wp + ox * s + kx)
                                                    * c
                                                    + ch];
                                            v += x as f64
                                                * w[((ky * k + kx) * c + ch) * cout + o] as f64;
                                        }
                                    }
                                }
                                let v = v as f32;
                                out[((b * oh + oy) * ow + ox) * cout + o] =
                                    if relu { v.max(0.0) } else { v };
                            }
                        }
                    }
                }
                out
            };
            let want = direct(true);
            // The fused 2×2 pool against pooling the direct map (odd maps drop their last row
            // or column, as ONNX's floor mode does), ReLU on and off, split at a random unit.
            let (ph, pw) = (oh / 2, ow / 2);
            let units = n * ph * pw;
            for relu in [true, false] {
                let map = direct(relu);
                let mut pooled = vec![0f32; units * cout];
                for (i, o) in pooled.chunks_exact_mut(cout).enumerate() {
                    let (b, py, px) = (i / (ph * pw), i / pw % ph, i % pw);
                    for (ch, o) in o.iter_mut().enumerate() {
                        *o = f32::NEG_INFINITY;
                        for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                            let r = (b * oh + 2 * py + dy) * ow + 2 * px + dx;
                            *o = o.max(map[r * cout + ch]);
                        }
                    }
                }
                for allow in [true, false] {
                    let packed = PackedB::with_kernel(w.clone(), kk, cout, allow);
                    let split = next(units + 1);
                    let mut out = vec![f32::NAN; units * cout];
                    let (a, b) = out.split_at_mut(split * cout);
                    conv_pool2_bias_act(&src, &win, 0, split, &packed, &bias, relu, a);
                    let rest = units - split;
                    conv_pool2_bias_act(&src, &win, split, rest, &packed, &bias, relu, b);
                    for (i, (x, y)) in out.iter().zip(&pooled).enumerate() {
                        assert!(
                            (x - y).abs() <= 1e-4,
                            "pooled case {case} ({}) k{k} s{s} c{c} relu {relu} [{i}]: {x} vs {y}",
                            packed.kernel_name()
                        );
                    }
                }
            }
            for allow in [true, false] {
                let packed = PackedB::with_kernel(w.clone(), kk, cout, allow);
                // In two calls, the second starting mid-image, as the executor's chunks do.
                let split = m / 2;
                let mut out = vec![f32::NAN; m * cout];
                let (a, b) = out.split_at_mut(split * cout);
                conv_bias_act(&src, &win, 0, split, &packed, &bias, true, a);
                conv_bias_act(&src, &win, split, m - split, &packed, &bias, true, b);
                for (i, (x, y)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-4,
                        "case {case} ({}) k{k} s{s} c{c} [{i}]: {x} vs {y}",
                        packed.kernel_name()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod outer_sum_tests {
    use super::*;

    /// Every row-block remainder, one and two panels, widths that take the `gemm` path, and
    /// overlapping rows (a row stride smaller than the row), against a float64 loop.
    #[test]
    fn matches_a_float64_loop() {
        let mut next = test_index_stream(11);
        for case in 0..60 {
            let k = 1 + next(300);
            let m = 1 + next(40);
            let n = if case % 4 == 3 {
                1 + next(40)
            } else {
                16 * (1 + next(5))
            };
            let a_rs = if case % 2 == 0 { m } else { 1 + next(m) };
            let b_rs = n + next(3);
            let a: Vec<f32> = (0..(k - 1) * a_rs + m)
                .map(|_| next(2001) as f32 / 1000.0 - 1.0)
                .collect();
            let b: Vec<f32> = (0..(k - 1) * b_rs + n)
                .map(|_| next(2001) as f32 / 1000.0 - 1.0)
                .collect();
            let mut c = vec![f32::NAN; m * n];
            outer_sum(k, m, &a, a_rs, n, &b, b_rs, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|r| a[r * a_rs + i] as f64 * b[r * b_rs + j] as f64)
                        .sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (k as f64).sqrt() * 4.0,
                        "case {case} (k {k}, m {m}, n {n}): c[{i},{j}] = {got}, expected {want}"
                    );
                }
            }
        }
    }
}
