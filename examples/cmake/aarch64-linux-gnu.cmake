# CMake toolchain file: 64-bit ARM Linux (glibc) with Debian's cross compiler
# (apt-get install gcc-aarch64-linux-gnu; g++-aarch64-linux-gnu for C++; qemu-user to run the
# programs on this machine).
#
#   cmake -S . -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=examples/cmake/aarch64-linux-gnu.cmake
#
# fleetprov's CMakeLists.txt derives the Rust target from this compiler
# (aarch64-linux-gnu -> aarch64-unknown-linux-gnu: rustup target add aarch64-unknown-linux-gnu).
set(FLEETPROV_CROSS_TRIPLE aarch64-linux-gnu)
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
include("${CMAKE_CURRENT_LIST_DIR}/debian-cross.cmake")
