# Finds cnats (the NATS C client) and provides the imported target cnats::nats, the name its
# own CMake package uses. Why not that package: Debian 12's libnats-dev ships a cnats config
# whose nats_static target points at libnats_static.a, which no Debian package installs, so
# find_package(cnats CONFIG) stops with a fatal error. When the upstream package is complete
# (its static library present) we use it as is.
find_file(_cnats_static libnats_static.a PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE} /usr/lib /usr/local/lib NO_CACHE)
if(_cnats_static AND NOT TARGET cnats::nats)
  find_package(cnats CONFIG QUIET)
endif()

if(NOT TARGET cnats::nats)
  find_path(cnats_INCLUDE_DIR nats/nats.h)
  find_library(cnats_LIBRARY NAMES nats)
  include(FindPackageHandleStandardArgs)
  find_package_handle_standard_args(cnats REQUIRED_VARS cnats_LIBRARY cnats_INCLUDE_DIR)
  if(cnats_FOUND)
    add_library(cnats::nats UNKNOWN IMPORTED)
    set_target_properties(cnats::nats PROPERTIES
      IMPORTED_LOCATION "${cnats_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${cnats_INCLUDE_DIR}")
  endif()
else()
  set(cnats_FOUND TRUE)
endif()
