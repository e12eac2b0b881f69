# Builds the Debian package with `cpack -G DEB` from the already built tree, then checks it with
# dpkg-deb: its control fields and that the tools, library, headers, pkg-config and CMake files,
# migrations, systemd unit and man pages are inside.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
execute_process(COMMAND cpack -G DEB --config ${BINARY_DIR}/CPackConfig.cmake -B ${WORK_DIR}
  WORKING_DIRECTORY ${BINARY_DIR} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cpack -G DEB failed (${rc}): ${out} ${err}")
endif()
file(GLOB debs ${WORK_DIR}/*.deb)
list(LENGTH debs count)
if(NOT count EQUAL 1)
  message(FATAL_ERROR "expected one .deb in ${WORK_DIR}, found: ${debs}")
endif()

execute_process(COMMAND dpkg-deb --field ${debs} Package Version Architecture Depends
  OUTPUT_VARIABLE fields RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "dpkg-deb --field failed on ${debs}")
endif()
set(expected_fields "Package: natspubsub" "Version: ${VERSION}" "Architecture: amd64" "libnats" "libprometheus-cpp-core")
if(WITH_POSTGRES)
  list(APPEND expected_fields "libpqxx")
endif()
foreach(expected ${expected_fields})
  string(FIND "${fields}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "control fields lack '${expected}':\n${fields}")
  endif()
endforeach()

execute_process(COMMAND dpkg-deb --contents ${debs} OUTPUT_VARIABLE contents RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "dpkg-deb --contents failed on ${debs}")
endif()
foreach(path
    ./usr/bin/natspubsub-relay
    ./usr/bin/natspubsub-dlq
    ./usr/lib/libnatspubsub.a
    ./usr/include/natspubsub/consumer.hpp
    ./usr/include/natspubsub/metrics.hpp
    ./usr/lib/pkgconfig/natspubsub.pc
    ./usr/lib/cmake/natspubsub/natspubsubConfig.cmake
    ./usr/share/natspubsub/migrations/postgres/
    ./usr/share/natspubsub/migrations/sqlite/
    ./usr/share/natspubsub/grafana/natspubsub-dashboard.json
    ./usr/share/natspubsub/prometheus/natspubsub-alerts.yml
    ./usr/lib/systemd/system/natspubsub-relay.service
    ./usr/share/doc/natspubsub/LICENSE
    ./usr/share/doc/natspubsub/examples/natspubsub-relay.env
    ./usr/share/man/man1/natspubsub-relay.1)
  string(FIND "${contents}" " ${path}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "${debs} lacks ${path}:\n${contents}")
  endif()
endforeach()
get_filename_component(name ${debs} NAME)
file(SIZE ${debs} size)
message(STATUS "${name}: ${size} bytes\n${fields}")
