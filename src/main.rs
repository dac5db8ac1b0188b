//! The `ecic` binary: parse the command line, call into the library, map
//! errors to exit codes (0 done, 1 some stage failed, 2 bad input).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ecic::cli::main()
}
