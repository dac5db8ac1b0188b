//! The `ecic` binary: parse the command line, call into the library, map
//! errors to exit codes (0 done, 1 some stage failed, 2 bad input).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ecic::runtime::init();
    // Like other Unix tools, end quietly when the reader of our output goes
    // away (`ecic status | head`) instead of failing to print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    ecic::cli::main()
}
