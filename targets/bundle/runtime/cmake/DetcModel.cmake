# detc_add_model: compile a model with detc, verify it, and package it as a device bundle.
#
#   find_package(detc REQUIRED)          # -Ddetc_DIR="$(detc --cmake-dir)"
#   detc_add_model(detector
#     MODEL ${CMAKE_SOURCE_DIR}/model.onnx
#     TARGET x86                         # or arm, arm:<preset>, x86:<mcpu>
#     [PIPELINE "<text>"] [CONFIG file.toml] [CALIB dir] [SPEC file] [INPUT_SHAPE name=1,3,640,640]
#     [DATA dir]                         # detc verify --data: the detection check too
#     [NO_VERIFY] [COMPILE_ARGS ...] [VERIFY_ARGS ...])
#
# Build steps (each reruns only when what it reads changed; the compile step's depfile lists the
# model, its external data, the calibration images and the spec/config files):
#   <bin>/<name>/manifest.json      detc compile … --depfile <bin>/<name>.d
#   <bin>/<name>.verified           detc verify <bin>/<name> --reference MODEL, then a stamp
#   <bin>/<name>-bundle/SHA256SUMS  detc package <bin>/<name> -o <bin>/<name>-bundle
# and a target <name> (in ALL) that depends on the bundle. Sets <name>_ARTIFACT_DIR and
# <name>_BUNDLE_DIR in the caller's scope. The detc command is DETC_EXECUTABLE (a CMake list,
# e.g. "python3;-m;detc.compiler.cli"), found on PATH by default.
cmake_minimum_required(VERSION 3.20)

# Ninja and Makefile generators rewrite the depfile's paths to the build tree's (policies are
# recorded where the function is defined, so this holds for every call).
cmake_policy(PUSH)
cmake_policy(SET CMP0116 NEW)

if(NOT DETC_EXECUTABLE)
  find_program(DETC_FOUND_EXECUTABLE detc)
  if(NOT DETC_FOUND_EXECUTABLE)
    message(FATAL_ERROR "detc not found on PATH: pip install detc, or set DETC_EXECUTABLE")
  endif()
  set(DETC_EXECUTABLE "${DETC_FOUND_EXECUTABLE}" CACHE STRING "the detc command (a CMake list)")
endif()

function(detc_add_model name)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "NO_VERIFY"
    "MODEL;TARGET;PIPELINE;CONFIG;CALIB;SPEC;DATA"
    "INPUT_SHAPE;COMPILE_ARGS;VERIFY_ARGS")
  if(NOT ARG_MODEL OR NOT ARG_TARGET)
    message(FATAL_ERROR "detc_add_model(${name}): MODEL and TARGET are required")
  endif()
  foreach(kind MODEL CONFIG CALIB SPEC DATA)
    if(ARG_${kind})
      get_filename_component(ARG_${kind} "${ARG_${kind}}" ABSOLUTE
        BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
    endif()
  endforeach()

  set(artifact "${CMAKE_CURRENT_BINARY_DIR}/${name}")
  set(bundle "${CMAKE_CURRENT_BINARY_DIR}/${name}-bundle")
  set(depfile "${CMAKE_CURRENT_BINARY_DIR}/${name}.d")
  set(stamp "${CMAKE_CURRENT_BINARY_DIR}/${name}.verified")

  set(compile_args --target "${ARG_TARGET}" -o "${artifact}" --depfile "${depfile}" --quiet)
  if(ARG_PIPELINE)
    list(APPEND compile_args -p "${ARG_PIPELINE}")
  endif()
  if(ARG_CONFIG)
    list(APPEND compile_args --config "${ARG_CONFIG}")
  endif()
  if(ARG_CALIB)
    list(APPEND compile_args --calib "${ARG_CALIB}")
  endif()
  if(ARG_SPEC)
    list(APPEND compile_args --spec "${ARG_SPEC}")
  endif()
  foreach(shape IN LISTS ARG_INPUT_SHAPE)
    list(APPEND compile_args --input-shape "${shape}")
  endforeach()

  add_custom_command(
    OUTPUT "${artifact}/manifest.json"
    COMMAND ${DETC_EXECUTABLE} compile "${ARG_MODEL}" ${compile_args} ${ARG_COMPILE_ARGS}
    DEPENDS "${ARG_MODEL}"
    DEPFILE "${depfile}"
    COMMENT "detc: compiling ${name} for ${ARG_TARGET}"
    VERBATIM)

  set(bundle_depends "${artifact}/manifest.json")
  if(NOT ARG_NO_VERIFY)
    set(verify_args --reference "${ARG_MODEL}")
    if(ARG_DATA)
      list(APPEND verify_args --data "${ARG_DATA}")
    endif()
    add_custom_command(
      OUTPUT "${stamp}"
      COMMAND ${DETC_EXECUTABLE} verify "${artifact}" ${verify_args} ${ARG_VERIFY_ARGS}
      COMMAND "${CMAKE_COMMAND}" -E touch "${stamp}"
      DEPENDS "${artifact}/manifest.json"
      COMMENT "detc: verifying ${name}"
      VERBATIM)
    list(APPEND bundle_depends "${stamp}")
  endif()

  add_custom_command(
    OUTPUT "${bundle}/SHA256SUMS"
    COMMAND ${DETC_EXECUTABLE} package "${artifact}" -o "${bundle}"
    DEPENDS ${bundle_depends}
    COMMENT "detc: packaging ${name}"
    VERBATIM)
  add_custom_target(${name} ALL DEPENDS "${bundle}/SHA256SUMS")

  set(${name}_ARTIFACT_DIR "${artifact}" PARENT_SCOPE)
  set(${name}_BUNDLE_DIR "${bundle}" PARENT_SCOPE)
endfunction()

cmake_policy(POP)
