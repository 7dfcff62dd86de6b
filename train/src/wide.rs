//! [`wide_fn!`]: hot loops compiled a second time for AVX-512, chosen at run time.

/// Defines `fn $name<A: Activation, …>(args) -> R` (or a non-generic `fn $name(args) -> R`) whose
/// body is compiled twice: as written, and with AVX-512 enabled, taken when the CPU has it
/// ([`fmnist::kernels::avx512_wide`]). The training engine's batch-norm and activation loops
/// (and batch-norm's statistics) are plain Rust over slices of channels, written branch-free
/// (GELU included) so that they vectorise; the baseline x86-64 target only gives them SSE2's
/// 4 lanes, AVX-512 gives 16. The arithmetic is the same in both copies (Rust
/// never fuses `a·b + c`, and the lanes are independent channels), so the results are
/// bit-identical whichever runs.
macro_rules! wide_fn {
    ($(#[$m:meta])* fn $name:ident<$($g:ident: $b:ident),+>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name<$($g: $b),+>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<$($g: $b),+>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn wide<$($g: $b),+>($($arg: $ty),*) $(-> $ret)? {
                body::<$($g),+>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if fmnist::kernels::avx512_wide() {
                // SAFETY: `avx512_wide` checked every feature `wide` is compiled with.
                return unsafe { wide::<$($g),+>($($arg),*) };
            }
            body::<$($g),+>($($arg),*)
        }
    };
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
            unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if fmnist::kernels::avx512_wide() {
                // SAFETY: `avx512_wide` checked every feature `wide` is compiled with.
                return unsafe { wide($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
