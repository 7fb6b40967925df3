# Tests of the installed `fleetprov` command (fleetprov::cli, from the package when the library
# was installed with FLEETPROV_BUILD_CLI=ON) against the emulator: cli_test.py starts a fresh
# emulator per case and runs the command. Included at the end of CMakeLists.txt, whose launcher
# (valgrind), labels, environment and timeouts it uses.
#
# The command line of each test is `cli_test.py ... -- [launcher] fleetprov`: the examples'
# launcher, which holds CMAKE_CROSSCOMPILING_EMULATOR (qemu-aarch64 -L SYSROOT, say: it runs the
# command of another architecture) and valgrind in that pass; cli_test.py only ever prefixes its
# own arguments with the whole list.
if(NOT TARGET fleetprov::cli)
  message(STATUS "fleetprov::cli not in the package (FLEETPROV_BUILD_CLI=OFF): no cli tests")
  return()
endif()
set(_cli_program $<TARGET_FILE:fleetprov::cli>)
if(FLEETPROV_SANITIZE)
  # The installed command is not instrumented: this pass builds its source again with ASan and
  # UBSan (the examples' flags) and runs the same cases against that build.
  add_executable(fleetprov_cli_sanitized "${CMAKE_CURRENT_SOURCE_DIR}/../../src/cli/fleetprov.c")
  target_link_libraries(fleetprov_cli_sanitized PRIVATE fleetprov::fleetprov)
  example_flags(fleetprov_cli_sanitized)
  set(_cli_program $<TARGET_FILE:fleetprov_cli_sanitized>)
endif()

set(_cli_cases ok cbor config reject unreachable busy interrupt sigterm rotate systemd)
if(FLEETPROV_VALGRIND)
  # valgrind sits between a signal and the program: no interrupt cases; the rest costs a
  # valgrind run each, so the passes that cover the flow's outcomes only.
  set(_cli_cases ok cbor reject rotate)
endif()
foreach(_case IN LISTS _cli_cases)
  example_wanted(cli_${_case} _wanted)
  if(NOT _wanted)
    continue()
  endif()
  add_test(NAME cli_${_case}
    COMMAND "${Python3_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/cli_test.py"
            --emulator "${FLEETPROV_EMULATOR}"
            --work "${CMAKE_CURRENT_BINARY_DIR}/cli-${_case}"
            --examples "${CMAKE_CURRENT_SOURCE_DIR}/.."
            --case ${_case} --timeout ${_timeout_each}
            -- ${_launcher} ${_cli_program})
  set_tests_properties(cli_${_case} PROPERTIES
    LABELS "${_labels};emulator;cli" ENVIRONMENT "${_env}" TIMEOUT ${FLEETPROV_TEST_TIMEOUT})
endforeach()
