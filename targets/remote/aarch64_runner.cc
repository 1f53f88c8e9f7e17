// detc aarch64 runner: loads a Relax executable exported by detc (model.so), runs it on the CPU
// for one or more input sets and writes the outputs as raw little-endian buffers.
//
// Cross-compiled on the host with aarch64-linux-gnu-g++ against libtvm_runtime.so,
// libtvm_runtime_extra.so and libtvm_ffi.so from the aarch64 apache-tvm wheels (linked, not
// called: loading libtvm_runtime_extra registers tvm.contrib.sort.*, which TopK, argsort and NMS
// lower to), and run under qemu-aarch64 by detc.targets._emulator (it
// also runs unchanged on a real aarch64 board). It needs no Python: the host side converts
// params.npz and the feeds into raw buffers and describes them in a plan file.
//
// Plan file (UTF-8, one tab-separated record per line; paths may not contain tabs/newlines):
//   detc-aarch64-plan <TAB> 1
//   model  <TAB> /path/model.so
//   param  <TAB> code <TAB> bits <TAB> lanes <TAB> d0,d1,... <TAB> /path/p00000.bin   (main() order)
//   run    <TAB> /path/out_dir                         (starts one input set)
//   input  <TAB> code <TAB> bits <TAB> lanes <TAB> d0,d1,... <TAB> /path/x.bin        (main() order)
// code/bits/lanes are DLPack's DLDataType fields. For every `run` the runner writes
// out_dir/<k>.bin for the k-th flattened output and out_dir/outputs.tsv with lines
//   <k> <TAB> code <TAB> bits <TAB> lanes <TAB> d0,d1,... <TAB> <k>.bin
// Errors: one line "detc-aarch64-runner: error: ..." on stderr and exit status 1.

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// TVM-generated kernels may assume 64-byte aligned buffers (kAllocAlignment in the runtime).
constexpr size_t kTensorAlignment = 64;
// relax.VirtualMachine.POOLED_ALLOCATOR.
constexpr int kPooledAllocator = 2;

struct AlignedCpuAlloc {
  void AllocData(DLTensor* tensor) {
    size_t bytes = ffi::GetDataSize(*tensor);
    size_t rounded = (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
    tensor->data = std::aligned_alloc(kTensorAlignment, rounded == 0 ? kTensorAlignment : rounded);
    if (tensor->data == nullptr) throw std::runtime_error("out of memory allocating a tensor");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

struct TensorRecord {
  DLDataType dtype;
  std::vector<int64_t> shape;
  std::string path;
};

struct InputSet {
  std::string out_dir;
  std::vector<TensorRecord> inputs;
};

struct Plan {
  std::string model_path;
  std::vector<TensorRecord> params;
  std::vector<InputSet> sets;
};

std::vector<std::string> SplitTabs(const std::string& line) {
  std::vector<std::string> fields;
  std::string field;
  std::istringstream stream(line);
  while (std::getline(stream, field, '\t')) fields.push_back(field);
  return fields;
}

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::string dim;
  std::istringstream stream(text);
  while (std::getline(stream, dim, ',')) {
    if (!dim.empty()) shape.push_back(std::stoll(dim));
  }
  return shape;
}

std::string FormatShape(const DLTensor& tensor) {
  std::string text;
  for (int i = 0; i < tensor.ndim; ++i) {
    if (i > 0) text += ",";
    text += std::to_string(tensor.shape[i]);
  }
  return text;
}

TensorRecord ParseTensorRecord(const std::vector<std::string>& fields, const std::string& line) {
  if (fields.size() != 6) throw std::runtime_error("malformed plan line: " + line);
  TensorRecord record;
  record.dtype.code = static_cast<uint8_t>(std::stoi(fields[1]));
  record.dtype.bits = static_cast<uint8_t>(std::stoi(fields[2]));
  record.dtype.lanes = static_cast<uint16_t>(std::stoi(fields[3]));
  record.shape = ParseShape(fields[4]);
  record.path = fields[5];
  return record;
}

Plan ReadPlan(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw std::runtime_error("cannot open plan file " + path);
  Plan plan;
  std::string line;
  bool header_seen = false;
  while (std::getline(file, line)) {
    if (line.empty()) continue;
    std::vector<std::string> fields = SplitTabs(line);
    const std::string& kind = fields[0];
    if (!header_seen) {
      if (kind != "detc-aarch64-plan" || fields.size() != 2 || fields[1] != "1") {
        throw std::runtime_error("plan file " + path + " is not a version-1 detc plan");
      }
      header_seen = true;
    } else if (kind == "model" && fields.size() == 2) {
      plan.model_path = fields[1];
    } else if (kind == "param") {
      plan.params.push_back(ParseTensorRecord(fields, line));
    } else if (kind == "run" && fields.size() == 2) {
      plan.sets.push_back(InputSet{fields[1], {}});
    } else if (kind == "input" && !plan.sets.empty()) {
      plan.sets.back().inputs.push_back(ParseTensorRecord(fields, line));
    } else {
      throw std::runtime_error("unexpected plan line: " + line);
    }
  }
  if (plan.model_path.empty()) throw std::runtime_error("plan file names no model");
  return plan;
}

ffi::Tensor LoadTensor(const TensorRecord& record) {
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(
      AlignedCpuAlloc(), ffi::ShapeView(record.shape.data(), record.shape.size()), record.dtype,
      cpu);
  size_t bytes = ffi::GetDataSize(tensor);
  std::ifstream file(record.path, std::ios::binary | std::ios::ate);
  if (!file) throw std::runtime_error("cannot open tensor file " + record.path);
  if (static_cast<size_t>(file.tellg()) != bytes) {
    throw std::runtime_error("tensor file " + record.path + " has " +
                             std::to_string(static_cast<size_t>(file.tellg())) +
                             " bytes, expected " + std::to_string(bytes));
  }
  file.seekg(0);
  file.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(bytes));
  return tensor;
}

// Relax returns a tensor or a (possibly nested) tuple of tensors; flatten in tuple order.
void FlattenOutputs(const ffi::Any& value, std::vector<ffi::Tensor>* tensors) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    tensors->push_back(*tensor);
  } else if (auto array = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *array) FlattenOutputs(item, tensors);
  } else {
    throw std::runtime_error("model returned a value of type " + value.GetTypeKey() +
                             ", expected tensors");
  }
}

void WriteOutputs(const std::vector<ffi::Tensor>& outputs, const std::string& out_dir) {
  std::ofstream index(out_dir + "/outputs.tsv");
  if (!index) throw std::runtime_error("cannot write to output directory " + out_dir);
  for (size_t k = 0; k < outputs.size(); ++k) {
    const DLTensor& tensor = *outputs[k].GetDLTensorPtr();
    if (tensor.device.device_type != kDLCPU || !outputs[k].IsContiguous()) {
      throw std::runtime_error("output " + std::to_string(k) + " is not a contiguous CPU tensor");
    }
    std::string name = std::to_string(k) + ".bin";
    std::ofstream file(out_dir + "/" + name, std::ios::binary);
    const char* data = static_cast<const char*>(tensor.data) + tensor.byte_offset;
    file.write(data, static_cast<std::streamsize>(ffi::GetDataSize(tensor)));
    if (!file) throw std::runtime_error("cannot write " + out_dir + "/" + name);
    index << k << '\t' << static_cast<int>(tensor.dtype.code) << '\t'
          << static_cast<int>(tensor.dtype.bits) << '\t' << tensor.dtype.lanes << '\t'
          << FormatShape(tensor) << '\t' << name << '\n';
  }
}

ffi::Function RequireFunction(const ffi::Module& module, const char* name) {
  ffi::Optional<ffi::Function> function = module->GetFunction(name, /*query_imports=*/true);
  if (!function.has_value()) {
    throw std::runtime_error(std::string("the library has no function '") + name + "'");
  }
  return *function;
}

void Run(const Plan& plan) {
  ffi::Module library = ffi::Module::LoadFromFile(plan.model_path);
  ffi::Module vm = RequireFunction(library, "vm_load_executable")().cast<ffi::Module>();
  RequireFunction(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  ffi::Function main_function = RequireFunction(vm, "main");

  std::vector<ffi::Tensor> params;
  for (const TensorRecord& record : plan.params) params.push_back(LoadTensor(record));

  for (const InputSet& set : plan.sets) {
    std::vector<ffi::Tensor> inputs;
    for (const TensorRecord& record : set.inputs) inputs.push_back(LoadTensor(record));
    std::vector<ffi::AnyView> args;
    for (const ffi::Tensor& tensor : inputs) args.emplace_back(tensor);
    for (const ffi::Tensor& tensor : params) args.emplace_back(tensor);
    ffi::Any result;
    main_function.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    std::vector<ffi::Tensor> outputs;
    FlattenOutputs(result, &outputs);
    WriteOutputs(outputs, set.out_dir);
  }
}

std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s PLAN_FILE\n", argv[0]);
    return 2;
  }
  try {
    Run(ReadPlan(argv[1]));
  } catch (const ffi::Error& error) {
    std::fprintf(stderr, "detc-aarch64-runner: error: %s: %s\n", error.kind().c_str(),
                 OneLine(error.message()).c_str());
    return 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "detc-aarch64-runner: error: %s\n", OneLine(error.what()).c_str());
    return 1;
  }
  return 0;
}
