#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need, then runs
# every test. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

.ci/install-deps.sh
# Python packages install-deps.sh put into a virtual environment come first.
if [ -x target/ci-python/bin/python3 ]; then
  export PATH="$PWD/target/ci-python/bin:$PATH"
fi

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
cargo test --all-targets --no-fail-fast -- --test-threads="${WRAITH_TEST_THREADS:-4}"
cargo test --doc
