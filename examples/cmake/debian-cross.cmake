# Shared part of the Debian cross toolchain files (aarch64-linux-gnu.cmake,
# arm-linux-gnueabihf.cmake): FLEETPROV_CROSS_TRIPLE names Debian's cross compiler
# (<triple>-gcc) and its libraries (/usr/<triple>).
set(CMAKE_C_COMPILER ${FLEETPROV_CROSS_TRIPLE}-gcc)
# C++ (g++-<triple>) is optional: never the host's c++ in its place. Without it the examples
# leave out their C++ header test.
set(CMAKE_CXX_COMPILER ${FLEETPROV_CROSS_TRIPLE}-g++)

# Libraries and headers of the target only; programs (python3, pkg-config) of the host. CMake
# packages from both, so that find_package(fleetprov) finds a prefix given by CMAKE_PREFIX_PATH.
set(CMAKE_FIND_ROOT_PATH /usr/${FLEETPROV_CROSS_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
# pkg-config: the target's .pc files only (Debian multiarch: libfoo-dev:arm64 installs them under
# /usr/lib/<triple>/pkgconfig), never the host's.
set(ENV{PKG_CONFIG_LIBDIR}
    "/usr/lib/${FLEETPROV_CROSS_TRIPLE}/pkgconfig:/usr/${FLEETPROV_CROSS_TRIPLE}/lib/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "")

# ctest runs the target's programs through qemu-user, with the target's dynamic loader and
# libraries from /usr/<triple>.
if(FLEETPROV_CROSS_TRIPLE MATCHES "^aarch64")
  set(_fp_qemu_name qemu-aarch64)
else()
  set(_fp_qemu_name qemu-arm)
endif()
find_program(_fp_qemu NAMES ${_fp_qemu_name}-static ${_fp_qemu_name})
if(_fp_qemu)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${_fp_qemu};-L;/usr/${FLEETPROV_CROSS_TRIPLE}")
endif()
