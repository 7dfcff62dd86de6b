//! AMX-BF16 tiles behind [`super::bf16`]: detection, the kernel's permission, and the tile
//! operations of [`super::bf16::tiled`] in inline assembly.
//!
//! Why assembly: neither AMX's intrinsics nor its feature detection are stable in Rust. The
//! instructions used are few — `ldtilecfg`, `tilezero`, `tileloadd`, `tdpbf16ps`,
//! `tilestored`, `tilerelease` — and the blocking around them is ordinary Rust, shared with
//! a scalar emulation that tests it on every machine.
//!
//! Availability needs three things: the CPU (CPUID leaf 7: AMX-TILE and AMX-BF16), the OS
//! saving tile state (XCR0 bits 17 and 18), and, on Linux, the process's permission to use
//! that state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), without which the
//! first tile instruction faults. If any is missing the callers fall back.

use super::bf16::{tiled, PackedBf16, TileSource, Tiles};
use std::arch::asm;
use std::arch::x86_64::__cpuid_count;

/// Whether AMX-BF16 can run in this process; detected (and permission requested) once.
pub(super) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let leaf1 = __cpuid_count(1, 0);
        let leaf7 = __cpuid_count(7, 0);
        let osxsave = leaf1.ecx & (1 << 27) != 0;
        let amx_bf16 = leaf7.edx & (1 << 22) != 0;
        let amx_tile = leaf7.edx & (1 << 24) != 0;
        if !(osxsave && amx_bf16 && amx_tile) {
            return false;
        }
        // XCR0 bit 17 is XTILECFG, bit 18 XTILEDATA: the OS manages the tile state.
        let (lo, _hi): (u32, u32);
        // SAFETY: OSXSAVE is set, so XGETBV is enabled.
        unsafe {
            asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack));
        }
        if lo & (0b11 << 17) != 0b11 << 17 {
            return false;
        }
        request_permission()
    })
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted state.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// The palette-1 configuration: tmm0–tmm3 accumulators (16 rows × 16 fp32), tmm4–tmm5 A
/// tiles (16 rows × 32 bf16), tmm6–tmm7 B tiles (16 pair-rows × 16 × 2 bf16): all 16 rows of
/// 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Rows `r0 .. r0 + rows` of `c = a · b` on AMX tiles.
///
/// # Safety
/// [`available`] must have returned true.
pub(super) unsafe fn gemm_rows<A: TileSource>(
    a: &A,
    b: &PackedBf16,
    r0: usize,
    rows: usize,
    c: &mut [f32],
    ldc: usize,
) {
    // SAFETY: AMX is available and permitted; the configuration is valid for palette 1.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    tiled(&mut Amx, a, b, r0, rows, c, ldc);
    // SAFETY: as above; releases the tile state so context switches stay cheap.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// The tile operations on the real registers (configured by [`gemm_rows`]).
struct Amx;

/// Runs `$body` with `$t` replaced by the tile register literal for index `$i`.
macro_rules! tile {
    ($i:expr, [$($n:literal => $reg:literal),*], |$r:ident| $body:expr) => {
        match $i {
            $($n => { macro_rules! $r { () => { $reg } } $body })*
            _ => unreachable!("tile index"),
        }
    };
}

impl Tiles for Amx {
    #[inline(always)]
    unsafe fn zero(&mut self, t: usize) {
        tile!(t, [0 => "tmm0", 1 => "tmm1", 2 => "tmm2", 3 => "tmm3"], |reg| unsafe {
            asm!(concat!("tilezero ", reg!()), options(nostack, nomem))
        })
    }

    #[inline(always)]
    unsafe fn load_a(&mut self, t: usize, src: *const u16, stride: usize) {
        let bytes = stride * 2;
        tile!(t, [0 => "tmm4", 1 => "tmm5"], |reg| unsafe {
            asm!(concat!("tileloadd ", reg!(), ", [{0} + {1}*1]"), in(reg) src, in(reg) bytes,
                 options(nostack, readonly))
        })
    }

    #[inline(always)]
    unsafe fn load_b(&mut self, t: usize, src: *const u16) {
        tile!(t, [0 => "tmm6", 1 => "tmm7"], |reg| unsafe {
            asm!(concat!("tileloadd ", reg!(), ", [{0} + {1}*1]"), in(reg) src, in(reg) 64usize,
                 options(nostack, readonly))
        })
    }

    #[inline(always)]
    unsafe fn dot(&mut self, ct: usize, at: usize, bt: usize) {
        macro_rules! dp {
            ($c:literal, $a:literal, $b:literal) => {
                unsafe {
                    asm!(
                        concat!("tdpbf16ps ", $c, ", ", $a, ", ", $b),
                        options(nostack, nomem)
                    )
                }
            };
        }
        match (ct, at, bt) {
            (0, 0, 0) => dp!("tmm0", "tmm4", "tmm6"),
            (1, 0, 1) => dp!("tmm1", "tmm4", "tmm7"),
            (2, 1, 0) => dp!("tmm2", "tmm5", "tmm6"),
            (3, 1, 1) => dp!("tmm3", "tmm5", "tmm7"),
            _ => unreachable!("the blocking pairs accumulator i·2+j with A i and B j"),
        }
    }

    #[inline(always)]
    unsafe fn store(&mut self, t: usize, dst: *mut f32, stride: usize) {
        let bytes = stride * 4;
        tile!(t, [0 => "tmm0", 1 => "tmm1", 2 => "tmm2", 3 => "tmm3"], |reg| unsafe {
            asm!(concat!("tilestored [{0} + {1}*1], ", reg!()), in(reg) dst, in(reg) bytes,
                 options(nostack))
        })
    }
}
