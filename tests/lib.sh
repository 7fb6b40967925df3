# Shared by the test scripts that build through CMake (examples/c/run-tests.sh, tests/cross.sh,
# tests/offline.sh), sourced after they cd to the repository: step(), which prints a heading with
# the seconds since the script started, a parallel level for CMake's builds, and CMake from PyPI.

started=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}

# cmake_from_pypi VENV: CMake from PyPI in VENV (the venv made first if missing); sets $cmake and
# $ctest.
cmake_from_pypi() {
    local venv=$1
    step "cmake from PyPI in $venv"
    if [ ! -x "$venv/bin/cmake" ]; then
        [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'cmake>=3.20,<5'
    fi
    cmake=$venv/bin/cmake
    ctest=$venv/bin/ctest
    "$cmake" --version | head -n 1
}
