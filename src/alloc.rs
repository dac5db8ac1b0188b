//! Allocator tuning shared by the `ecic` binary and the benchmarks, which both
//! use mimalloc as their global allocator, and the process's use of transparent
//! huge pages.

// mimalloc returns freed memory to the OS 10 ms after it is freed, so every training step
// page-faults (and the kernel re-zeroes) its activations and gradients again: ~240k faults and
// about a quarter of the CPU time of a full 4+4 bench step. Keep freed memory for 1 s instead.
// `mi_option_purge_delay` is entry 15 of mimalloc's option enum; set only if it reads 10 (its
// default), so another mimalloc version is left alone.
// Links libmimalloc, which defines the two functions below.
use mimalloc as _;

extern "C" {
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Keep memory freed by mimalloc for 1 s before returning it to the OS. Harmless
/// (only an option write) when mimalloc is linked but not the global allocator.
pub fn keep_freed_memory() {
    // SAFETY: mimalloc's option getters/setters take any option index and are thread-safe.
    unsafe {
        if mi_option_get(15) == 10 {
            mi_option_set(15, 1000);
        }
    }
}

/// Undo [`keep_freed_memory`] (back to mimalloc's 10 ms): for short commands whose peak memory
/// matters more than faulting pages in again (`ecic eval` frees its reading and tokenizing
/// buffers before it counts n-grams).
pub fn return_freed_memory_soon() {
    // SAFETY: as in `keep_freed_memory`.
    unsafe {
        if mi_option_get(15) == 1000 {
            mi_option_set(15, 10);
        }
    }
}

/// Stop backing this process's memory with transparent huge pages from now on: for short
/// commands whose peak memory matters more than TLB misses (`ecic eval`). mimalloc reserves its
/// arena with `MADV_HUGEPAGE`, so on a host whose THP setting is `madvise` (or `always`) each
/// 2 MiB region the allocator touches becomes resident whole: `ecic eval` on 100 images peaked
/// at 24 MiB with huge pages and 14 MiB without, 68 against 45 MiB on 10,000 images of short
/// captions. The flag (`PR_SET_THP_DISABLE`) is checked when a page is faulted in, so it also
/// covers the arena mimalloc may already have reserved. Training keeps huge pages: its tensors
/// are large and live long. A no-op where the kernel does not support it.
pub fn avoid_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes four integer arguments and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
