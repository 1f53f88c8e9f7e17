// libdetc_runtime: the C API of detc_runtime.h over TVM's FFI and Relax VM.
//
// Compiled by `detc package` for the bundle's architecture against the TVM runtime libraries the
// bundle ships, so that applications include only detc_runtime.h and link only this library.
//
// The bundle's files read here (all written by detc package):
//   SHA256SUMS      "<sha256>  <relative path>" per file (sha256sum's format), checked at open
//   model/io.tsv    one tab-separated record per line:
//                     detc-bundle <TAB> 1
//                     library <TAB> model/model.so
//                     input   <TAB> name <TAB> dtype <TAB> d0,d1,...   (-1 or a name such as
//                                                                   h: free / unknown until run)
//                     output  <TAB> name <TAB> dtype <TAB> d0,d1,...
//                     param   <TAB> dtype <TAB> d0,d1,... <TAB> model/params/p00000.bin
//                     class   <TAB> index <TAB> name                (the model spec's class names)
//   the library and the params' raw little-endian buffers, in main()'s order after the inputs
//
// Detections (detc_detections) are read from the outputs detc compile --with-nms gives, by name:
//   boxes float32 (M, 4) · scores float32 (M,) · classes int32 (M,) · count int32 (1,)

#include "detc_runtime.h"

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// TVM-generated kernels may assume 64-byte aligned buffers (kAllocAlignment in the runtime).
constexpr size_t kTensorAlignment = 64;
// relax.VirtualMachine.POOLED_ALLOCATOR: intermediate buffers are reused across runs.
constexpr int kPooledAllocator = 2;

thread_local std::string last_error;

struct Failure : std::runtime_error {
  Failure(detc_status status, const std::string& message)
      : std::runtime_error(message), status(status) {}
  detc_status status;
};

// ---- SHA-256 (FIPS 180-4) ------------------------------------------------------------------

class Sha256 {
 public:
  void Update(const unsigned char* data, size_t size) {
    total_bytes_ += size;
    while (size > 0) {
      size_t take = std::min(size, block_.size() - filled_);
      std::memcpy(block_.data() + filled_, data, take);
      filled_ += take;
      data += take;
      size -= take;
      if (filled_ == block_.size()) {
        Compress(block_.data());
        filled_ = 0;
      }
    }
  }

  std::string HexDigest() {
    uint64_t bit_length = total_bytes_ * 8;
    unsigned char pad = 0x80;
    Update(&pad, 1);
    unsigned char zero = 0;
    while (filled_ != 56) Update(&zero, 1);
    unsigned char length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(bit_length >> (56 - 8 * i));
    Update(length, 8);
    static const char* kHex = "0123456789abcdef";
    std::string hex;
    for (uint32_t word : state_) {
      for (int shift = 28; shift >= 0; shift -= 4) hex += kHex[(word >> shift) & 0xf];
    }
    return hex;
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void Compress(const unsigned char* chunk) {
    static const uint32_t kRound[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t{chunk[4 * i]} << 24) | (uint32_t{chunk[4 * i + 1]} << 16) |
             (uint32_t{chunk[4 * i + 2]} << 8) | uint32_t{chunk[4 * i + 3]};
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state_[0], b = state_[1], c = state_[2], d = state_[3];
    uint32_t e = state_[4], f = state_[5], g = state_[6], h = state_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                    kRound[i] + w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    state_[0] += a;
    state_[1] += b;
    state_[2] += c;
    state_[3] += d;
    state_[4] += e;
    state_[5] += f;
    state_[6] += g;
    state_[7] += h;
  }

  std::array<uint32_t, 8> state_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<unsigned char, 64> block_{};
  size_t filled_ = 0;
  uint64_t total_bytes_ = 0;
};

std::string Sha256OfFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Failure(DETC_ERROR_INTEGRITY, path + " is missing");
  Sha256 digest;
  std::vector<char> buffer(1 << 16);
  while (file) {
    file.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    digest.Update(reinterpret_cast<const unsigned char*>(buffer.data()),
                  static_cast<size_t>(file.gcount()));
  }
  return digest.HexDigest();
}

// ---- the bundle's index files ----------------------------------------------------------------

struct TensorDesc {
  std::string name;
  std::string dtype_name;
  DLDataType dtype{};
  std::vector<int64_t> shape;
};

struct ParamDesc {
  TensorDesc tensor;
  std::string path;
};

std::vector<std::string> Split(const std::string& text, char separator) {
  std::vector<std::string> fields;
  std::string field;
  std::istringstream stream(text);
  while (std::getline(stream, field, separator)) fields.push_back(field);
  return fields;
}

DLDataType ParseDtype(const std::string& name) {
  static const std::map<std::string, DLDataType> kTypes = {
      {"float32", {kDLFloat, 32, 1}},   {"float16", {kDLFloat, 16, 1}},
      {"float64", {kDLFloat, 64, 1}},   {"bfloat16", {kDLBfloat, 16, 1}},
      {"int8", {kDLInt, 8, 1}},         {"int16", {kDLInt, 16, 1}},
      {"int32", {kDLInt, 32, 1}},       {"int64", {kDLInt, 64, 1}},
      {"uint8", {kDLUInt, 8, 1}},       {"uint16", {kDLUInt, 16, 1}},
      {"uint32", {kDLUInt, 32, 1}},     {"uint64", {kDLUInt, 64, 1}},
      {"bool", {kDLBool, 8, 1}},
  };
  auto found = kTypes.find(name);
  if (found == kTypes.end()) throw Failure(DETC_ERROR_BAD_BUNDLE, "unknown dtype " + name);
  return found->second;
}

std::string DtypeName(DLDataType dtype) {
  const char* kind = dtype.code == kDLFloat    ? "float"
                     : dtype.code == kDLInt    ? "int"
                     : dtype.code == kDLUInt   ? "uint"
                     : dtype.code == kDLBfloat ? "bfloat"
                                               : nullptr;
  if (dtype.code == kDLBool) return "bool";
  if (kind == nullptr || dtype.lanes != 1) return "unknown";
  return kind + std::to_string(dtype.bits);
}

// Digits are a fixed size; a name ("h", "w") or -1 is a free dimension, stored as -1.
std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  for (const std::string& dim : Split(text, ',')) {
    if (dim.empty()) continue;
    bool digits = dim.size() <= 18 && dim.find_first_not_of("0123456789") == std::string::npos;
    shape.push_back(digits ? std::stoll(dim) : -1);
  }
  return shape;
}

bool HasFreeDim(const std::vector<int64_t>& shape) {
  return std::any_of(shape.begin(), shape.end(), [](int64_t dim) { return dim < 0; });
}

const char* kNmsHint =
    "its outputs are the network's raw tensors, not detections (boxes, scores, classes, count): "
    "compile the model with `detc compile --with-nms` (and --with-preprocess to run it on images "
    "of any size), then package it again";

size_t ByteSize(DLDataType dtype, const std::vector<int64_t>& shape) {
  size_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return 0;
    count *= static_cast<size_t>(dim);
  }
  return count * ((dtype.bits * dtype.lanes + 7) / 8);
}

bool SafeRelativePath(const std::string& path) {
  if (path.empty() || path[0] == '/') return false;
  for (const std::string& part : Split(path, '/')) {
    if (part == "..") return false;
  }
  return true;
}

// Every file SHA256SUMS lists must match; returns the listed paths.
std::set<std::string> CheckDigests(const std::string& dir) {
  std::ifstream sums(dir + "/SHA256SUMS");
  if (!sums) throw Failure(DETC_ERROR_BAD_BUNDLE, dir + " holds no SHA256SUMS: not a detc bundle");
  std::set<std::string> listed;
  std::string line;
  while (std::getline(sums, line)) {
    if (line.empty()) continue;
    // "<64 hex><space><space or *><path>"
    if (line.size() < 67 || line[64] != ' ' || (line[65] != ' ' && line[65] != '*')) {
      throw Failure(DETC_ERROR_BAD_BUNDLE, dir + "/SHA256SUMS has a malformed line: " + line);
    }
    std::string expected = line.substr(0, 64);
    std::string path = line.substr(66);
    if (!SafeRelativePath(path)) {
      throw Failure(DETC_ERROR_BAD_BUNDLE, dir + "/SHA256SUMS names " + path +
                                               ", which is not a file inside the bundle");
    }
    std::string actual = Sha256OfFile(dir + "/" + path);
    if (actual != expected) {
      throw Failure(DETC_ERROR_INTEGRITY, dir + "/" + path +
                                              " does not match SHA256SUMS (corrupt or replaced)"
                                              ": copy the bundle again");
    }
    listed.insert(path);
  }
  return listed;
}

void RequireListed(const std::set<std::string>& listed, const std::string& path,
                   const std::string& dir) {
  if (listed.count(path) == 0) {
    throw Failure(DETC_ERROR_INTEGRITY, dir + "/SHA256SUMS does not list " + path);
  }
}

struct AlignedCpuAlloc {
  void AllocData(DLTensor* tensor) {
    size_t bytes = ffi::GetDataSize(*tensor);
    size_t rounded = (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
    tensor->data = std::aligned_alloc(kTensorAlignment, rounded == 0 ? kTensorAlignment : rounded);
    if (tensor->data == nullptr) throw std::runtime_error("out of memory allocating a tensor");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

ffi::Tensor EmptyTensor(const TensorDesc& desc) {
  for (int64_t dim : desc.shape) {
    if (dim < 0) throw Failure(DETC_ERROR_BAD_BUNDLE, "input " + desc.name + " has no fixed shape");
  }
  return ffi::Tensor::FromNDAlloc(AlignedCpuAlloc(),
                                  ffi::ShapeView(desc.shape.data(), desc.shape.size()), desc.dtype,
                                  DLDevice{kDLCPU, 0});
}

ffi::Tensor LoadRawTensor(const TensorDesc& desc, const std::string& path) {
  ffi::Tensor tensor = EmptyTensor(desc);
  size_t bytes = ffi::GetDataSize(tensor);
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw Failure(DETC_ERROR_BAD_BUNDLE, "cannot open " + path);
  if (static_cast<size_t>(file.tellg()) != bytes) {
    throw Failure(DETC_ERROR_BAD_BUNDLE, path + " has " +
                                             std::to_string(static_cast<size_t>(file.tellg())) +
                                             " bytes, expected " + std::to_string(bytes));
  }
  file.seekg(0);
  file.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(bytes));
  return tensor;
}

ffi::Function RequireFunction(const ffi::Module& module, const char* name) {
  ffi::Optional<ffi::Function> function = module->GetFunction(name, /*query_imports=*/true);
  if (!function.has_value()) {
    throw Failure(DETC_ERROR_RUNTIME, std::string("the model library has no function '") + name +
                                          "'");
  }
  return *function;
}

// Relax returns a tensor or a (possibly nested) tuple of tensors; flatten in tuple order.
void FlattenOutputs(const ffi::Any& value, std::vector<ffi::Tensor>* tensors) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    tensors->push_back(*tensor);
  } else if (auto array = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *array) FlattenOutputs(item, tensors);
  } else {
    throw Failure(DETC_ERROR_RUNTIME,
                  "the model returned a value of type " + value.GetTypeKey() + ", not tensors");
  }
}

std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

template <typename Body>
detc_status Guarded(Body body) {
  try {
    body();
    last_error.clear();
    return DETC_OK;
  } catch (const Failure& failure) {
    last_error = OneLine(failure.what());
    return failure.status;
  } catch (const ffi::Error& error) {
    last_error = error.kind() + ": " + OneLine(error.message());
    return DETC_ERROR_RUNTIME;
  } catch (const std::exception& error) {
    last_error = OneLine(error.what());
    return DETC_ERROR_RUNTIME;
  }
}

}  // namespace

struct detc_model {
  std::string dir;
  std::string library_path;
  std::vector<TensorDesc> inputs;
  std::vector<TensorDesc> outputs;
  std::vector<ParamDesc> param_descs;
  std::vector<std::string> class_names;
  std::optional<ffi::Module> library;
  std::optional<ffi::Module> vm;
  std::optional<ffi::Function> main_function;
  std::vector<ffi::Tensor> params;
  // inputs of fixed shape are allocated once; free ones (an image of any size) per shape
  std::vector<std::optional<ffi::Tensor>> input_tensors;
  std::vector<ffi::Tensor> results;
  // what detc_output_info reports after a run
  std::vector<TensorDesc> produced;
  std::vector<detc_detection> detections;

  void ReadIndex(const std::set<std::string>& listed) {
    const std::string index_path = "model/io.tsv";
    RequireListed(listed, index_path, dir);
    std::ifstream index(dir + "/" + index_path);
    std::string line;
    bool header_seen = false;
    while (std::getline(index, line)) {
      if (line.empty()) continue;
      std::vector<std::string> fields = Split(line, '\t');
      const std::string& kind = fields[0];
      if (!header_seen) {
        if (kind != "detc-bundle" || fields.size() != 2 || fields[1] != "1") {
          throw Failure(DETC_ERROR_BAD_BUNDLE,
                        dir + "/" + index_path + " is not a version-1 detc bundle index");
        }
        header_seen = true;
      } else if (kind == "library" && fields.size() == 2 && SafeRelativePath(fields[1])) {
        RequireListed(listed, fields[1], dir);
        library_path = dir + "/" + fields[1];
      } else if ((kind == "input" || kind == "output") && fields.size() == 4) {
        TensorDesc desc{fields[1], fields[2], ParseDtype(fields[2]), ParseShape(fields[3])};
        (kind == "input" ? inputs : outputs).push_back(desc);
      } else if (kind == "param" && fields.size() == 4 && SafeRelativePath(fields[3])) {
        RequireListed(listed, fields[3], dir);
        TensorDesc desc{"param", fields[1], ParseDtype(fields[1]), ParseShape(fields[2])};
        if (HasFreeDim(desc.shape)) {
          throw Failure(DETC_ERROR_BAD_BUNDLE, dir + "/" + index_path + ": a param of free shape");
        }
        param_descs.push_back(ParamDesc{desc, dir + "/" + fields[3]});
      } else if (kind == "class" && fields.size() == 3 &&
                 fields[1] == std::to_string(class_names.size())) {
        class_names.push_back(fields[2]);
      } else {
        throw Failure(DETC_ERROR_BAD_BUNDLE, dir + "/" + index_path + ": unexpected line: " + line);
      }
    }
    if (library_path.empty()) {
      throw Failure(DETC_ERROR_BAD_BUNDLE, dir + "/" + index_path + " names no library");
    }
  }

  void Load() {
    library = ffi::Module::LoadFromFile(library_path);
    vm = RequireFunction(*library, "vm_load_executable")().cast<ffi::Module>();
    RequireFunction(*vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    main_function = RequireFunction(*vm, "main");
    for (const ParamDesc& param : param_descs) {
      params.push_back(LoadRawTensor(param.tensor, param.path));
    }
    for (const TensorDesc& input : inputs) {
      input_tensors.push_back(HasFreeDim(input.shape) ? std::nullopt
                                                      : std::optional(EmptyTensor(input)));
    }
    produced = outputs;
  }

  void Run(const void* const* data, const size_t* bytes, int count) {
    if (count != static_cast<int>(inputs.size())) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT, "the model takes " + std::to_string(inputs.size()) +
                                                 " input(s), got " + std::to_string(count));
    }
    for (int i = 0; i < count; ++i) {
      if (HasFreeDim(inputs[i].shape)) {
        throw Failure(DETC_ERROR_BAD_ARGUMENT,
                      "input " + inputs[i].name +
                          " takes an image of any size: run it with detc_run_image");
      }
      size_t expected = ffi::GetDataSize(*input_tensors[i]);
      if (data[i] == nullptr || bytes[i] != expected) {
        throw Failure(DETC_ERROR_BAD_ARGUMENT,
                      "input " + inputs[i].name + " takes " + std::to_string(expected) +
                          " bytes (" + inputs[i].dtype_name + "), got " +
                          std::to_string(bytes[i]));
      }
      std::memcpy(input_tensors[i]->data_ptr(), data[i], expected);
    }
    Execute();
  }

  void RunImage(const uint8_t* rgb, int height, int width) {
    const TensorDesc* image = inputs.size() == 1 ? &inputs[0] : nullptr;
    if (image == nullptr || image->dtype_name != "uint8" || image->shape.size() != 3 ||
        image->shape[2] != 3) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT,
                    "this model does not take an image (it takes " + DescribeInputs() +
                        "): compile it with `detc compile --with-preprocess` to run it on uint8 "
                        "RGB images of any size, then package it again");
    }
    if (rgb == nullptr || height <= 0 || width <= 0 || height > kMaxImageSide ||
        width > kMaxImageSide) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT,
                    "detc_run_image needs RGB pixels and a height and width in 1.." +
                        std::to_string(kMaxImageSide) + ", got " + std::to_string(height) + "x" +
                        std::to_string(width));
    }
    const int64_t wanted[2] = {height, width};
    for (int d = 0; d < 2; ++d) {
      if (image->shape[d] >= 0 && image->shape[d] != wanted[d]) {
        throw Failure(DETC_ERROR_BAD_ARGUMENT,
                      "this model takes " + std::to_string(image->shape[0]) + "x" +
                          std::to_string(image->shape[1]) + " images, got " +
                          std::to_string(height) + "x" + std::to_string(width) +
                          ": resize the image, or compile the model with `detc compile "
                          "--with-preprocess` to take images of any size");
      }
    }
    std::optional<ffi::Tensor>& tensor = input_tensors[0];
    if (!tensor.has_value() || tensor->shape()[0] != height || tensor->shape()[1] != width) {
      TensorDesc shaped = *image;
      shaped.shape = {height, width, 3};
      tensor = EmptyTensor(shaped);
    }
    std::memcpy(tensor->data_ptr(), rgb, static_cast<size_t>(height) * width * 3);
    Execute();
  }

  void ReadDetections() {
    const ffi::Tensor* boxes = Produced("boxes", "float32", 2);
    const ffi::Tensor* scores = Produced("scores", "float32", 1);
    const ffi::Tensor* classes = Produced("classes", "int32", 1);
    const ffi::Tensor* count = Produced("count", "int32", 1);
    if (boxes == nullptr || scores == nullptr || classes == nullptr || count == nullptr) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT, std::string("this model gives no detections: ") +
                                                 kNmsHint);
    }
    int64_t rows = boxes->shape()[0];
    if (boxes->shape()[1] != 4 || scores->shape()[0] != rows || classes->shape()[0] != rows ||
        count->shape()[0] != 1) {
      throw Failure(DETC_ERROR_RUNTIME,
                    "the outputs boxes, scores, classes, count do not have the shapes (M, 4), "
                    "(M,), (M,), (1,) of --with-nms");
    }
    int32_t valid = *static_cast<const int32_t*>(Data(*count));
    valid = std::max<int32_t>(0, std::min<int64_t>(valid, rows));
    const float* box = static_cast<const float*>(Data(*boxes));
    const float* score = static_cast<const float*>(Data(*scores));
    const int32_t* class_id = static_cast<const int32_t*>(Data(*classes));
    detections.assign(static_cast<size_t>(valid), detc_detection{});
    for (int32_t i = 0; i < valid; ++i) {
      std::copy(box + 4 * i, box + 4 * i + 4, detections[i].box);
      detections[i].score = score[i];
      detections[i].class_id = class_id[i];
    }
  }

 private:
  // Bounds an image's side before anything is allocated for it (as detc_ppm.h does).
  static constexpr int kMaxImageSide = 1 << 14;

  void Execute() {
    results.clear();
    detections.clear();
    std::vector<ffi::AnyView> args;
    for (const std::optional<ffi::Tensor>& tensor : input_tensors) args.emplace_back(*tensor);
    for (const ffi::Tensor& tensor : params) args.emplace_back(tensor);
    ffi::Any result;
    main_function->CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    std::vector<ffi::Tensor> flat;
    FlattenOutputs(result, &flat);
    std::vector<TensorDesc> shapes;
    for (size_t k = 0; k < flat.size(); ++k) {
      const DLTensor& tensor = *flat[k].GetDLTensorPtr();
      if (tensor.device.device_type != kDLCPU || !flat[k].IsContiguous()) {
        throw Failure(DETC_ERROR_RUNTIME,
                      "output " + std::to_string(k) + " is not a contiguous CPU tensor");
      }
      std::string name = k < outputs.size() ? outputs[k].name : "output_" + std::to_string(k);
      shapes.push_back(TensorDesc{name, DtypeName(tensor.dtype), tensor.dtype,
                                  std::vector<int64_t>(tensor.shape, tensor.shape + tensor.ndim)});
    }
    results = std::move(flat);
    produced = std::move(shapes);
  }

  // The output of the last run named `name`, if it has that dtype and rank.
  const ffi::Tensor* Produced(const std::string& name, const std::string& dtype, int ndim) const {
    for (size_t k = 0; k < results.size() && k < produced.size(); ++k) {
      if (produced[k].name == name) {
        bool fits = produced[k].dtype_name == dtype &&
                    static_cast<int>(produced[k].shape.size()) == ndim;
        return fits ? &results[k] : nullptr;
      }
    }
    return nullptr;
  }

  static const void* Data(const ffi::Tensor& tensor) {
    const DLTensor& view = *tensor.GetDLTensorPtr();
    return static_cast<const char*>(view.data) + view.byte_offset;
  }

  std::string DescribeInputs() const {
    std::string text;
    for (const TensorDesc& input : inputs) {
      text += (text.empty() ? "" : ", ") + input.name + " " + input.dtype_name + " [";
      for (size_t d = 0; d < input.shape.size(); ++d) {
        text += (d ? ", " : "") +
                (input.shape[d] < 0 ? std::string("?") : std::to_string(input.shape[d]));
      }
      text += "]";
    }
    return text.empty() ? "no inputs" : text;
  }
};

namespace {

detc_status Describe(const std::vector<TensorDesc>& tensors, int index, detc_tensor_info* info) {
  return Guarded([&] {
    if (info == nullptr || index < 0 || index >= static_cast<int>(tensors.size())) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT, "tensor index " + std::to_string(index) +
                                                 " out of range (" +
                                                 std::to_string(tensors.size()) + " tensors)");
    }
    const TensorDesc& desc = tensors[index];
    info->name = desc.name.c_str();
    info->dtype = desc.dtype_name.c_str();
    info->ndim = static_cast<int>(desc.shape.size());
    info->shape = desc.shape.data();
    info->bytes = ByteSize(desc.dtype, desc.shape);
  });
}

}  // namespace

extern "C" {

detc_status detc_open(const char* bundle_dir, detc_model** model) {
  if (model != nullptr) *model = nullptr;
  auto opened = std::make_unique<detc_model>();
  detc_status status = Guarded([&] {
    if (bundle_dir == nullptr || model == nullptr) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT, "detc_open needs a bundle folder and a result");
    }
    opened->dir = bundle_dir;
    std::set<std::string> listed = CheckDigests(opened->dir);
    opened->ReadIndex(listed);
    opened->Load();
  });
  if (status == DETC_OK) *model = opened.release();
  return status;
}

void detc_close(detc_model* model) { delete model; }

const char* detc_last_error(void) { return last_error.c_str(); }

int detc_num_inputs(const detc_model* model) {
  return model == nullptr ? 0 : static_cast<int>(model->inputs.size());
}

int detc_num_outputs(const detc_model* model) {
  return model == nullptr ? 0 : static_cast<int>(model->produced.size());
}

detc_status detc_input_info(const detc_model* model, int index, detc_tensor_info* info) {
  static const std::vector<TensorDesc> none;
  return Describe(model == nullptr ? none : model->inputs, index, info);
}

detc_status detc_output_info(const detc_model* model, int index, detc_tensor_info* info) {
  static const std::vector<TensorDesc> none;
  return Describe(model == nullptr ? none : model->produced, index, info);
}

detc_status detc_run(detc_model* model, const void* const* inputs, const size_t* input_bytes,
                     int num_inputs) {
  return Guarded([&] {
    if (model == nullptr || (num_inputs > 0 && (inputs == nullptr || input_bytes == nullptr))) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT, "detc_run needs a model and its input buffers");
    }
    model->Run(inputs, input_bytes, num_inputs);
  });
}

detc_status detc_output_data(const detc_model* model, int index, const void** data,
                             size_t* bytes) {
  return Guarded([&] {
    if (model == nullptr || data == nullptr || bytes == nullptr) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT, "detc_output_data needs a model, data and bytes");
    }
    if (index < 0 || index >= static_cast<int>(model->results.size())) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT,
                    model->results.empty()
                        ? std::string("no outputs yet: call detc_run first")
                        : "output index " + std::to_string(index) + " out of range");
    }
    const DLTensor& tensor = *model->results[index].GetDLTensorPtr();
    *data = static_cast<const char*>(tensor.data) + tensor.byte_offset;
    *bytes = ffi::GetDataSize(tensor);
  });
}

int detc_runtime_api_version(void) { return DETC_RUNTIME_API_VERSION; }

detc_status detc_run_image(detc_model* model, const uint8_t* rgb, int height, int width) {
  return Guarded([&] {
    if (model == nullptr) throw Failure(DETC_ERROR_BAD_ARGUMENT, "detc_run_image needs a model");
    model->RunImage(rgb, height, width);
  });
}

detc_status detc_detections(detc_model* model, const detc_detection** out, int* count) {
  return Guarded([&] {
    if (model == nullptr || out == nullptr || count == nullptr) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT, "detc_detections needs a model, out and count");
    }
    *out = nullptr;
    *count = 0;
    if (model->results.empty()) {
      throw Failure(DETC_ERROR_BAD_ARGUMENT,
                    "no outputs yet: call detc_run_image (or detc_run) first");
    }
    model->ReadDetections();
    *out = model->detections.data();
    *count = static_cast<int>(model->detections.size());
  });
}

int detc_num_classes(const detc_model* model) {
  return model == nullptr ? 0 : static_cast<int>(model->class_names.size());
}

const char* detc_class_name(const detc_model* model, int class_id) {
  if (model == nullptr || class_id < 0 || class_id >= static_cast<int>(model->class_names.size())) {
    return nullptr;
  }
  return model->class_names[class_id].c_str();
}

}  // extern "C"
