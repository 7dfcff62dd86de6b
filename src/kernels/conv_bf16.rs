//! Same-size 3×3 convolutions as bf16 tile products, read in place from zero-padded
//! channels-last buffers: the forward pass, the input gradient (the same product over the
//! padded output gradient with flipped weights) and the weight gradient.
//!
//! Why in place: an im2col matrix is nine times the activations, and rounding it every step
//! cost more than AMX saved (BENCHMARKS.md, "bf16 matrix products"). In the flattened padded
//! grid of `n` images `[h+2, w+2, c]` (`wp = w + 2`), output position `q` reads, for kernel
//! row `ky`, the `3·c` consecutive values starting at position `q + (ky−1)·wp − 1`; so the
//! rows of the product are consecutive grid positions `c` values apart, which is a tile load's
//! stride. The grid's border positions are computed too and thrown away (15 % more work at
//! 28×28, 65 % at 7×7), which keeps every tile a plain strided load. Products are indexed by
//! `k = q − (wp + 1)`, so row `k` reads from position `k + ky·wp`, never before the buffer.
//!
//! The weight gradient sums over grid positions: `dW[tap][ci][co] = Σ_k x[k + shift(tap)][ci]
//! · dz[k + wp + 1][co]`, with `shift = ky·wp + kx`. Its left operand is the padded input
//! transposed (`[c][positions]`, [`transpose_padded`]), read at the tap's shift; its right one
//! is the padded output gradient packed as usual ([`PackedBf16::fill`]). The zero border makes
//! every pairing that crosses an image edge vanish.
//!
//! These run on the tile paths only (AMX, or its scalar emulation in tests): the AVX512_BF16
//! register kernel reads a padded matrix and measured slower than fp32 anyway.

use super::bf16::{round_into, run_tiles, Bf16Path, PackedBf16, TileSource, TILE_K, TILE_M};
use rayon::prelude::*;

/// Grid positions of `n` padded images and the number of product rows over them.
fn grid(n: usize, h: usize, w: usize) -> (usize, usize) {
    let wp = w + 2;
    let r = n * (h + 2) * wp;
    (r, r - 2 * (wp + 1))
}

/// Values a bf16 padded buffer of `n` images `[h+2, w+2, c]` needs: the grid and 16 zero
/// positions of slack that the last tile may read.
pub fn padded_len(n: usize, h: usize, w: usize, c: usize) -> usize {
    (grid(n, h, w).0 + TILE_M) * c
}

/// Rows of a convolution's product on the padded grid: `n·(h+2)·(w+2) − 2·(w+3)`; row `k`
/// belongs to grid position `k + w + 3`. See [`interior`].
pub fn grid_rows(n: usize, h: usize, w: usize) -> usize {
    grid(n, h, w).1
}

/// Sizes `out` as a bf16 padded buffer of `n` images `[h+2, w+2, c]` ([`padded_len`]) and
/// zeroes the slack past the grid. Whoever fills the images writes their interiors only: the
/// borders are zero from the allocation and never written (a buffer keeps its shape per
/// layer; only `n` changes, which moves no image).
pub fn padded_buffer(out: &mut Vec<u16>, n: usize, h: usize, w: usize, c: usize) -> &mut [u16] {
    let len = grid(n, h, w).0 * c;
    out.resize(padded_len(n, h, w, c), 0);
    out[len..].fill(0);
    &mut out[..len]
}

/// Rounds a padded fp32 buffer (`[r, c]` grid values) to bf16 with the slack [`Windows`]
/// needs, on rayon's threads.
pub fn round_padded(x: &[f32], n: usize, h: usize, w: usize, c: usize, out: &mut Vec<u16>) {
    let len = grid(n, h, w).0 * c;
    assert!(x.len() >= len, "round_padded: buffer too small");
    padded_buffer(out, n, h, w, c)
        .par_chunks_mut(1 << 14)
        .zip(x[..len].par_chunks(1 << 14))
        .for_each(|(d, s)| round_into(s, d));
}

/// A convolution's left operand: for product row `k`, the three kernel rows' `3·c` values
/// starting at grid position `k + ky·(w+2)` of a bf16 padded buffer.
pub struct Windows<'a> {
    x: &'a [u16],
    c: usize,
    wp: usize,
    m: usize,
}

impl<'a> Windows<'a> {
    /// Panics unless `c` is a multiple of 32 (a tile's 32 values must not straddle two kernel
    /// rows) and `x` holds [`padded_len`] values.
    pub fn new(x: &'a [u16], n: usize, h: usize, w: usize, c: usize) -> Self {
        assert!(
            c.is_multiple_of(TILE_K),
            "bf16 windows need channels in 32s, not {c}"
        );
        assert!(
            x.len() >= padded_len(n, h, w, c),
            "Windows: buffer too small"
        );
        Windows {
            x,
            c,
            wp: w + 2,
            m: grid(n, h, w).1,
        }
    }
}

// SAFETY: the last tile row read is ⌈m/16⌉·16 − 1 + 2·wp ≤ r + 13, and the last value
// 3·c − 1 further; `new` checked that `x` holds r + 16 positions of `c` values.
unsafe impl TileSource for Windows<'_> {
    fn rows(&self) -> usize {
        self.m
    }
    fn chunks(&self) -> usize {
        9 * self.c / TILE_K
    }
    fn tile(&self, row: usize, kc: usize) -> (*const u16, usize) {
        let per_row = 3 * self.c / TILE_K;
        let (ky, j) = (kc / per_row, kc % per_row);
        let at = (row + ky * self.wp) * self.c + j * TILE_K;
        (self.x[at..].as_ptr(), self.c)
    }
}

/// The bf16 product of a same-size 3×3 convolution on the padded grid: `out[k][co]` (row
/// stride `weights.n()`) for the [`grid_rows`] rows, from `x` (bf16 padded, [`round_padded`])
/// and `weights` packed as `[9·cin, cout]` (tap-major, as the fp32 kernel takes them).
/// Rows are split over rayon's threads; each value is summed by one thread in one order.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_bf16(
    path: Bf16Path,
    x: &[u16],
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    weights: &PackedBf16,
    out: &mut [f32],
) {
    assert_eq!(
        weights.k(),
        9 * cin,
        "conv3x3_bf16: weights are not [9·cin, ·]"
    );
    let a = Windows::new(x, n, h, w, cin);
    run_tiles(path, &a, weights, out, weights.n(), true);
}

/// Copies the interior of a product on the padded grid (`[grid_rows, c]`) to channels-last
/// rows `[n·h·w, c]`: image `i`'s pixel `(y, x)` is product row `i·(h+2)·(w+2) + y·(w+2) + x`.
pub fn interior(grid: &[f32], n: usize, h: usize, w: usize, c: usize, out: &mut [f32]) {
    let per = (h + 2) * (w + 2) * c;
    out[..n * h * w * c]
        .par_chunks_mut(h * w * c)
        .enumerate()
        .for_each(|(i, img)| {
            for (y, row) in img.chunks_exact_mut(w * c).enumerate() {
                let at = i * per + y * (w + 2) * c;
                // The last image's last row ends before the grid's last product row.
                row.copy_from_slice(&grid[at..at + w * c]);
            }
        });
}

/// Row stride of [`transpose_padded`]'s output for `r` grid positions: every tap's shifted
/// read of the padded depth stays inside the row.
fn transposed_stride(r: usize) -> usize {
    r.div_ceil(TILE_K) * TILE_K + TILE_K
}

/// The rounded padded buffer `xb` ([`round_padded`]: `[r, c]` grid values) transposed to
/// `[c][stride]` (zeros past `r`), the weight gradient's left operand; returns the stride.
/// The training step passes the buffer its forward pass rounded, so nothing is rounded twice.
/// Channel blocks of 16 run on rayon's threads; each gathers 64 positions of its 16 channels
/// into a small block and writes 16 contiguous runs, instead of 16 two-byte streams.
pub fn transpose_padded(
    xb: &[u16],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    out: &mut Vec<u16>,
) -> usize {
    assert!(
        c.is_multiple_of(TILE_M),
        "transpose_padded: channels in 16s, not {c}"
    );
    let r = grid(n, h, w).0;
    assert!(xb.len() >= r * c, "transpose_padded: buffer too small");
    let stride = transposed_stride(r);
    out.resize(c * stride, 0);
    const BLOCK: usize = 64;
    out.par_chunks_mut(TILE_M * stride)
        .enumerate()
        .for_each(|(b, rows)| {
            let c0 = b * TILE_M;
            let mut block = [[0u16; BLOCK]; TILE_M];
            for q0 in (0..r).step_by(BLOCK) {
                let len = (r - q0).min(BLOCK);
                for (i, v) in xb[q0 * c..(q0 + len) * c].chunks_exact(c).enumerate() {
                    for (j, &v) in v[c0..c0 + TILE_M].iter().enumerate() {
                        block[j][i] = v;
                    }
                }
                for (j, run) in block.iter().enumerate() {
                    rows[j * stride + q0..][..len].copy_from_slice(&run[..len]);
                }
            }
            for j in 0..TILE_M {
                rows[j * stride + r..(j + 1) * stride].fill(0);
            }
        });
    stride
}

/// The weight gradient's left operand: row `tap·c + ci` is input channel `ci` along the grid,
/// shifted by the tap's `ky·(w+2) + kx`.
struct TapRows<'a> {
    xt: &'a [u16],
    stride: usize,
    c: usize,
    wp: usize,
    chunks: usize,
}

// SAFETY: a tile covers 16 channels of one tap (c is a multiple of 16); its last value read is
// channel c − 1 at shift ≤ 2·wp + 2 plus chunks·32 − 1 ≤ m + 31, i.e. below r + 32 ≤ stride,
// and `weight_grad_bf16` checked that `xt` holds c rows of `stride`.
unsafe impl TileSource for TapRows<'_> {
    fn rows(&self) -> usize {
        9 * self.c
    }
    fn chunks(&self) -> usize {
        self.chunks
    }
    fn tile(&self, row: usize, kc: usize) -> (*const u16, usize) {
        let (tap, ci) = (row / self.c, row % self.c);
        let shift = (tap / 3) * self.wp + tap % 3;
        (
            self.xt[ci * self.stride + shift + kc * TILE_K..].as_ptr(),
            self.stride,
        )
    }
}

/// The weight gradient `[9·cin][cout]` (tap-major rows, as `out`'s `9·cin × cout`) from the
/// transposed padded input ([`transpose_padded`], `stride`) and the padded output gradient
/// packed as a `[grid_rows, cout]` matrix starting at grid position `w + 3`.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_bf16(
    path: Bf16Path,
    xt: &[u16],
    stride: usize,
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    dz: &PackedBf16,
    out: &mut [f32],
) {
    let (r, m) = grid(n, h, w);
    assert!(
        cin.is_multiple_of(TILE_M),
        "weight_grad_bf16: channels in 16s, not {cin}"
    );
    assert_eq!(dz.k(), m, "weight_grad_bf16: dz is not [grid_rows, ·]");
    assert!(stride >= transposed_stride(r) && xt.len() >= cin * stride);
    let a = TapRows {
        xt,
        stride,
        c: cin,
        wp: w + 2,
        chunks: m.div_ceil(TILE_K),
    };
    run_tiles(path, &a, dz, out, dz.n(), true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16::tests::values;
    use crate::kernels::bf16::{from_bf16, to_bf16};

    /// `n` padded images with random interiors and zero borders.
    fn padded(n: usize, h: usize, w: usize, c: usize, seed: u64) -> Vec<f32> {
        let v = values(n * h * w * c, seed);
        let mut x = vec![0f32; n * (h + 2) * (w + 2) * c];
        for i in 0..n {
            for y in 0..h {
                for xx in 0..w {
                    let d = ((i * (h + 2) + y + 1) * (w + 2) + xx + 1) * c;
                    let s = ((i * h + y) * w + xx) * c;
                    x[d..d + c].copy_from_slice(&v[s..s + c]);
                }
            }
        }
        x
    }

    fn r(v: f32) -> f32 {
        from_bf16(to_bf16(v))
    }

    /// Forward by the definition over rounded operands, `[n·h·w, cout]`, summing taps then
    /// channels in the order the tiles do; `wt` is `[9·cin][cout]`.
    fn conv_reference(
        x: &[f32],
        wt: &[f32],
        (n, h, w, cin, cout): (usize, usize, usize, usize, usize),
    ) -> Vec<f32> {
        let mut z = vec![0f32; n * h * w * cout];
        for i in 0..n {
            for y in 0..h {
                for xx in 0..w {
                    for o in 0..cout {
                        let mut s = 0f32;
                        for tap in 0..9 {
                            let (ky, kx) = (tap / 3, tap % 3);
                            let q = (i * (h + 2) + y + ky) * (w + 2) + xx + kx;
                            for ci in 0..cin {
                                s += r(x[q * cin + ci]) * r(wt[(tap * cin + ci) * cout + o]);
                            }
                        }
                        z[((i * h + y) * w + xx) * cout + o] = s;
                    }
                }
            }
        }
        z
    }

    const SHAPES: [(usize, usize, usize, usize, usize); 4] = [
        // n, h, w, cin, cout
        (1, 3, 3, 32, 16),
        (2, 5, 4, 32, 40),
        (3, 7, 7, 64, 32),
        (1, 1, 2, 32, 17),
    ];

    fn paths() -> Vec<Bf16Path> {
        let mut p = vec![Bf16Path::Emulated];
        if Bf16Path::Amx.supported() {
            p.push(Bf16Path::Amx);
        } else {
            eprintln!("skipped: amx-bf16 is not available on this CPU");
        }
        p
    }

    fn forward(
        path: Bf16Path,
        s: (usize, usize, usize, usize, usize),
        x: &[f32],
        wt: &[f32],
    ) -> Vec<f32> {
        let (n, h, w, cin, cout) = s;
        let mut xb = vec![7u16; 3];
        round_padded(x, n, h, w, cin, &mut xb);
        let packed = PackedBf16::new(wt, 9 * cin, cout);
        let mut g = vec![f32::NAN; grid_rows(n, h, w) * cout];
        conv3x3_bf16(path, &xb, n, h, w, cin, &packed, &mut g);
        let mut z = vec![f32::NAN; n * h * w * cout];
        interior(&g, n, h, w, cout, &mut z);
        z
    }

    /// The emulated tiles give exactly the definition's sums (same products, same order); AMX
    /// the same within fp32 rounding of Σ|x||w| (its order within a pair is the hardware's).
    #[test]
    fn forward_matches_the_definition() {
        for s in SHAPES {
            let (n, h, w, cin, cout) = s;
            let x = padded(n, h, w, cin, 1);
            let wt = values(9 * cin * cout, 2);
            let want = conv_reference(&x, &wt, s);
            assert_eq!(forward(Bf16Path::Emulated, s, &x, &wt), want, "{s:?}");
            for path in paths().into_iter().skip(1) {
                let got = forward(path, s, &x, &wt);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (9 * cin) as f32,
                        "{s:?}: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// The weight gradient against its definition over rounded operands (sum over positions
    /// ascending), exactly on the emulation, within fp32 rounding on AMX.
    #[test]
    fn weight_grad_matches_the_definition() {
        for s in SHAPES {
            let (n, h, w, cin, cout) = s;
            let x = padded(n, h, w, cin, 3);
            let dz = padded(n, h, w, cout, 4);
            let (rr, m) = grid(n, h, w);
            let wp = w + 2;
            let mut want = vec![0f32; 9 * cin * cout];
            for tap in 0..9 {
                let shift = (tap / 3) * wp + tap % 3;
                for ci in 0..cin {
                    for o in 0..cout {
                        let mut acc = 0f32;
                        for k in 0..m {
                            acc += r(x[(k + shift) * cin + ci]) * r(dz[(k + wp + 1) * cout + o]);
                        }
                        want[(tap * cin + ci) * cout + o] = acc;
                    }
                }
            }
            for path in paths() {
                let (mut xb, mut xt) = (Vec::new(), vec![9u16; 5]);
                round_padded(&x, n, h, w, cin, &mut xb);
                let stride = transpose_padded(&xb, n, h, w, cin, &mut xt);
                assert!(xt[..]
                    .chunks(stride)
                    .all(|row| row[rr..].iter().all(|&v| v == 0)));
                let mut packed = PackedBf16::new(&[1.0; 40], 5, 8);
                packed.fill(&dz[(wp + 1) * cout..], m, cout);
                let mut got = vec![f32::NAN; 9 * cin * cout];
                weight_grad_bf16(path, &xt, stride, n, h, w, cin, &packed, &mut got);
                if path == Bf16Path::Emulated {
                    assert_eq!(got, want, "{s:?}");
                } else {
                    for (g, e) in got.iter().zip(&want) {
                        assert!((g - e).abs() <= 1e-5 * m as f32, "{s:?}: {g} vs {e}");
                    }
                }
            }
        }
    }

    /// Against full fp32 arithmetic the forward is within bf16's rounding: each operand off
    /// by at most 2^-9 relative, so |bf16 − fp32| ≤ 2^-8 · Σ|x||w| (plus fp32 summation).
    #[test]
    fn forward_is_within_bf16_rounding_of_fp32() {
        let path = paths().pop().expect("the emulation always runs");
        let s = (2, 6, 5, 32, 24);
        let (n, h, w, cin, cout) = s;
        let x = padded(n, h, w, cin, 5);
        let wt = values(9 * cin * cout, 6);
        let got = forward(path, s, &x, &wt);
        for i in 0..n {
            for y in 0..h {
                for xx in 0..w {
                    for o in 0..cout {
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for tap in 0..9 {
                            let q = (i * (h + 2) + y + tap / 3) * (w + 2) + xx + tap % 3;
                            for ci in 0..cin {
                                let p =
                                    x[q * cin + ci] as f64 * wt[(tap * cin + ci) * cout + o] as f64;
                                exact += p;
                                mag += p.abs();
                            }
                        }
                        let g = got[((i * h + y) * w + xx) * cout + o] as f64;
                        let tol = mag * (2f64.powi(-8) + 288.0 * 2f64.powi(-23));
                        assert!((g - exact).abs() <= tol, "{g} vs {exact} (tol {tol})");
                    }
                }
            }
        }
    }

    /// Refilled buffers (smaller after larger) equal fresh ones.
    #[test]
    fn reused_buffers_are_clean() {
        let big = padded(3, 6, 6, 32, 7);
        let small = padded(1, 2, 3, 32, 8);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        round_padded(&big, 3, 6, 6, 32, &mut a);
        round_padded(&small, 1, 2, 3, 32, &mut a);
        round_padded(&small, 1, 2, 3, 32, &mut b);
        assert_eq!(a, b);
        let (mut bigb, mut smallb) = (Vec::new(), Vec::new());
        round_padded(&big, 3, 6, 6, 32, &mut bigb);
        round_padded(&small, 1, 2, 3, 32, &mut smallb);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        transpose_padded(&bigb, 3, 6, 6, 32, &mut a);
        let s1 = transpose_padded(&smallb, 1, 2, 3, 32, &mut a);
        let s2 = transpose_padded(&smallb, 1, 2, 3, 32, &mut b);
        assert_eq!((s1, &a[..32 * s1]), (s2, &b[..]));
    }
}
