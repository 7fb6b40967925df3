# CMake toolchain file: 32-bit ARMv7 Linux, hard-float (glibc) with Debian's cross compiler
# (apt-get install gcc-arm-linux-gnueabihf; g++-arm-linux-gnueabihf for C++; qemu-user to run the
# programs on this machine).
#
#   cmake -S . -B build-armhf -DCMAKE_TOOLCHAIN_FILE=examples/cmake/arm-linux-gnueabihf.cmake
#
# fleetprov's CMakeLists.txt derives the Rust target from this compiler and the processor
# (arm-linux-gnueabihf, armv7l -> armv7-unknown-linux-gnueabihf: rustup target add
# armv7-unknown-linux-gnueabihf). For an ARMv6 board (Raspberry Pi 1 or Zero) pass
# -DFLEETPROV_RUST_TARGET=arm-unknown-linux-gnueabihf and a compiler for ARMv6.
set(FLEETPROV_CROSS_TRIPLE arm-linux-gnueabihf)
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR armv7l)
include("${CMAKE_CURRENT_LIST_DIR}/debian-cross.cmake")
