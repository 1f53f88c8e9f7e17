# find_package(detc) with -Ddetc_DIR="$(detc --cmake-dir)": brings detc_add_model().
include("${CMAKE_CURRENT_LIST_DIR}/DetcModel.cmake")
