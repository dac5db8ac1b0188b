//! The `ecic` binary: parse the command line, call into the library, map
//! errors to exit codes (0 done, 1 some stage failed, 2 bad input).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc returns freed memory to the OS 10 ms after it is freed, so every training step
// page-faults (and the kernel re-zeroes) its activations and gradients again: ~240k faults and
// about a quarter of the CPU time of a full 4+4 bench step. Keep freed memory for 1 s instead.
// `mi_option_purge_delay` is entry 15 of mimalloc's option enum; set only if it reads 10 (its
// default), so another mimalloc version is left alone.
extern "C" {
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

fn keep_freed_memory() {
    // SAFETY: mimalloc's option getters/setters take any option index and are thread-safe.
    unsafe {
        if mi_option_get(15) == 10 {
            mi_option_set(15, 1000);
        }
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    // Like other Unix tools, end quietly when the reader of our output goes
    // away (`ecic status | head`) instead of failing to print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    ecic::cli::main()
}
