// An application on detc's C API: open the bundle, describe its tensors, run it on an input
// buffer, read the outputs. Build it with the CMakeLists.txt beside it.
//
//   ./detect BUNDLE_DIR [INPUT.bin]
//
// INPUT.bin: raw bytes of the first input (e.g. a preprocessed image, CHW float32); without it
// the example runs on zeros. Decoding boxes from the outputs is the application's part.

#include <detc_runtime.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>

namespace {

void Describe(const char* kind, const detc_tensor_info& info) {
  std::printf("%s %s %s [", kind, info.name, info.dtype);
  for (int d = 0; d < info.ndim; ++d) std::printf(d ? ", %lld" : "%lld", (long long)info.shape[d]);
  std::printf("]\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s BUNDLE_DIR [INPUT.bin]\n", argv[0]);
    return 2;
  }
  detc_model* model = nullptr;
  if (detc_open(argv[1], &model) != DETC_OK) {
    std::fprintf(stderr, "cannot open %s: %s\n", argv[1], detc_last_error());
    return 1;
  }

  std::vector<std::vector<char>> buffers;
  std::vector<const void*> inputs;
  std::vector<size_t> sizes;
  for (int i = 0; i < detc_num_inputs(model); ++i) {
    detc_tensor_info info;
    detc_input_info(model, i, &info);
    Describe("input", info);
    std::vector<char> buffer(info.bytes, 0);
    if (i == 0 && argc > 2) {
      std::ifstream file(argv[2], std::ios::binary);
      buffer.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
    }
    buffers.push_back(std::move(buffer));
  }
  for (const std::vector<char>& buffer : buffers) {
    inputs.push_back(buffer.data());
    sizes.push_back(buffer.size());
  }

  if (detc_run(model, inputs.data(), sizes.data(), static_cast<int>(inputs.size())) != DETC_OK) {
    std::fprintf(stderr, "run failed: %s\n", detc_last_error());
    detc_close(model);
    return 1;
  }
  for (int k = 0; k < detc_num_outputs(model); ++k) {
    detc_tensor_info info;
    const void* data = nullptr;
    size_t bytes = 0;
    detc_output_info(model, k, &info);
    detc_output_data(model, k, &data, &bytes);
    Describe("output", info);
    if (info.dtype[0] == 'f' && info.dtype[5] == '3') {  // float32: show the first values
      const float* values = static_cast<const float*>(data);
      for (size_t i = 0; i < bytes / sizeof(float) && i < 4; ++i) std::printf("  %g\n", values[i]);
    }
  }
  detc_close(model);
  return 0;
}
