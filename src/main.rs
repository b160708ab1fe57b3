//! The `portcullis` binary: parses the command line and hands over to the library.

/// mimalloc: allocation is a large share of the proxy path's CPU time (`docs/performance.md`),
/// and it keeps per-thread free lists that suit the many small, short-lived buffers of HTTP.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    portcullis::cli::main()
}
