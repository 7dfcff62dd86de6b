//! The AVX-512 micro-kernels behind [`super`]: register-blocked products over packed weight
//! panels, reading convolution windows in place. Chosen at run time; callers check
//! `is_x86_feature_detected!("avx512f")` first.

use super::{Windows, MR, NR};
use std::arch::x86_64::*;

/// Evaluates `$call` with `$R` and `$P` bound as constants to the runtime row count `$r`
/// (1–12, = `MR`) and panel count `$p` (1 or 2): the blocks are generic over both so that
/// their accumulators stay in registers, and this is the one place that maps sizes to them.
macro_rules! with_block {
    ($r:expr, $p:expr, |$R:ident, $P:ident| $call:expr) => {
        match $p {
            2 => with_block!(@rows $r, 2, $R, $P, $call),
            _ => with_block!(@rows $r, 1, $R, $P, $call),
        }
    };
    (@rows $r:expr, $pv:literal, $R:ident, $P:ident, $call:expr) => {
        with_block!(@pick $r, $pv, $R, $P, $call, 12 11 10 9 8 7 6 5 4 3 2)
    };
    (@pick $r:expr, $pv:literal, $R:ident, $P:ident, $call:expr, $($n:literal)*) => {
        match $r {
            $($n => {
                const $R: usize = $n;
                const $P: usize = $pv;
                $call
            })*
            _ => {
                const $R: usize = 1;
                const $P: usize = $pv;
                $call
            }
        }
    };
}

/// One block: `R` rows (read in place through `Windows`) × `P` panels of 16 columns.
/// With `pool`, the rows come in fours (one 2×2 window each) and `R / 4` pooled rows are
/// written.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_block<const R: usize, const P: usize>(
    src: *const f32,
    bases: &[usize; MR],
    win: &Windows,
    k: usize,
    panel: *const f32,
    bias: *const f32,
    relu: bool,
    pool: bool,
    c: *mut f32,
    n: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut r = 0;
    for s in 0..win.segs {
        let off = s * win.seg_stride;
        for t in 0..win.seg_len {
            let mut b = [_mm512_setzero_ps(); P];
            for (p, b) in b.iter_mut().enumerate() {
                *b = _mm512_loadu_ps(panel.add((p * k + r) * NR));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*src.add(bases[i] + off + t));
                for p in 0..P {
                    acc[p] = _mm512_fmadd_ps(x, b[p], acc[p]);
                }
            }
            r += 1;
        }
    }
    // Bias, ReLU and the store of one vector: column panel `p` of output row `at`.
    #[inline(always)]
    unsafe fn finish(v: __m512, bias: *const f32, relu: bool, c: *mut f32, at: usize) {
        let mut v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
        if relu {
            v = _mm512_max_ps(v, _mm512_setzero_ps());
        }
        _mm512_storeu_ps(c.add(at), v);
    }
    if pool {
        // Rows come in fours, one 2×2 window each: reduce, then bias and ReLU.
        for (g, four) in acc.chunks_exact(4).enumerate() {
            for (p, first) in four[0].iter().enumerate() {
                let a = _mm512_max_ps(*first, four[1][p]);
                let b = _mm512_max_ps(four[2][p], four[3][p]);
                finish(
                    _mm512_max_ps(a, b),
                    bias.add(p * NR),
                    relu,
                    c,
                    g * n + p * NR,
                );
            }
        }
    } else {
        for (i, acc) in acc.iter().enumerate() {
            for (p, v) in acc.iter().enumerate() {
                finish(*v, bias.add(p * NR), relu, c, i * n + p * NR);
            }
        }
    }
}

/// See [`super::conv_bias_act`]; with `quad`, each of the `m` units is a 2×2 window whose
/// four rows lie at its base plus `quad` (see [`super::conv_pool2_bias_act`]).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn conv(
    src: &[f32],
    win: &Windows,
    quad: Option<[usize; 4]>,
    r0: usize,
    m: usize,
    n: usize,
    panels: &[f32],
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    let k = win.k();
    let np = n / NR;
    let mut j = 0;
    while j < np {
        let pp = if np - j >= 2 { 2 } else { 1 };
        let panel = panels.as_ptr().add(j * k * NR);
        let b = bias.as_ptr().add(j * NR);
        let mut i = 0;
        let mut at = win.cursor(r0);
        // Rows per unit, and units per block.
        let per = if quad.is_some() { 4 } else { 1 };
        while i < m {
            let u = (m - i).min(MR / per);
            let mut bases = [0usize; MR];
            for unit in bases.chunks_exact_mut(per).take(u) {
                let top = at.next_base(win);
                match quad {
                    Some(q) => {
                        for (base, q) in unit.iter_mut().zip(q) {
                            *base = top + q;
                        }
                    }
                    None => unit[0] = top,
                }
            }
            let c = out.as_mut_ptr().add(i * n + j * NR);
            let s = src.as_ptr();
            let pool = quad.is_some();
            with_block!(u * per, pp, |R, P| conv_block::<R, P>(
                s, &bases, win, k, panel, b, relu, pool, c, n
            ));
            i += u;
        }
        j += pp;
    }
}

/// `R` rows of `c` × `P` panels of 16 columns, summed over all `k` row pairs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn outer_block<const R: usize, const P: usize>(
    k: usize,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    b_rs: usize,
    c: *mut f32,
    n: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    for r in 0..k {
        let ar = a.add(r * a_rs);
        let br = b.add(r * b_rs);
        let mut bv = [_mm512_setzero_ps(); P];
        for (p, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(br.add(p * NR));
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*ar.add(i));
            for p in 0..P {
                acc[p] = _mm512_fmadd_ps(x, bv[p], acc[p]);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (p, v) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * n + p * NR), *v);
        }
    }
}

/// See [`super::outer_sum`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn outer_sum(
    k: usize,
    m: usize,
    a: &[f32],
    a_rs: usize,
    n: usize,
    b: &[f32],
    b_rs: usize,
    c: &mut [f32],
) {
    let np = n / NR;
    let mut j = 0;
    while j < np {
        let pp = if np - j >= 2 { 2 } else { 1 };
        let bj = b.as_ptr().add(j * NR);
        let mut i = 0;
        while i < m {
            let r = (m - i).min(MR);
            let ai = a.as_ptr().add(i);
            let ci = c.as_mut_ptr().add(i * n + j * NR);
            with_block!(r, pp, |R, P| outer_block::<R, P>(
                k, ai, a_rs, bj, b_rs, ci, n
            ));
            i += r;
        }
        j += pp;
    }
}
