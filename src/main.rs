//! The `wraith` binary: parse the command line, run the subcommand, exit with its code.

/// mimalloc: per-request allocations (header maps, bodies, ids) are a visible share of a
/// proxy's CPU; mimalloc's thread-local free lists make them cheaper than glibc malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    wraith::cli::run()
}
