# Shared by the HTTP benchmarks (sourced, from the repository root): checks for wrk, builds the
# release binary and the upstream, and sets BIN, TGT, a work directory and `pids`, the processes
# stopped on exit (then `bench_cleanup`, if the script defines it).
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --bin portcullis --example bench-upstream --example bench-flood >&2
TGT=${CARGO_TARGET_DIR:-target}
BIN=$TGT/release/portcullis
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if declare -F bench_cleanup >/dev/null; then bench_cleanup; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p bench/results
