// detc-run: run a detc bundle on an image or tensor files and print detections or outputs as
// JSON. No Python, no TVM headers: only the C API of detc_runtime.h (and detc_ppm.h).
// kHelp below is the user's documentation; DEVICE_README.md repeats it.

#include "detc_ppm.h"
#include "detc_runtime.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr size_t kInlineValues = 16;

const char* kUsage =
    "usage: detc-run BUNDLE_DIR IMAGE.ppm|INPUT... [--runs N] [--tensors] [--full] [--save DIR]";

const char* kHelp =
    R"(Run a detc bundle on an image or on tensor files.

IMAGE.ppm  a binary PPM image (P6, maxval 255, RGB), of any size for a model compiled with
           --with-preprocess, else of the model's input size (a uint8 H x W x 3 input).
           Files named .ppm/.pnm, or whose content starts with P1..P7 (not .npy/.bin), are
           read as images; other PNM kinds and maxvals are refused.
INPUT...   one tensor file per model input, in order: .npy (the input's dtype and shape,
           C order) or raw little-endian bytes of exactly the input's size.

Output (one JSON document on stdout):
  a model compiled with --with-nms: the detections, best first, boxes in the image's pixels
  (in the model input's pixels when compiled without --with-preprocess)
    [{"box": [x1, y1, x2, y2], "score": s, "class": c}, ...]
  with --runs N: {"detections": [...], "latency_ms": LATENCY}
  other models, or with --tensors: {"bundle": DIR, "outputs": [{"name", "dtype", "shape",
    "summary": {"min", "max", "mean"}, "values" (at most 16 elements, or all with --full)}],
    "latency_ms": LATENCY (with --runs N)}
  LATENCY = {"runs": N, "mean": ms, "median": ms, "min": ms, "max": ms} over N runs after the
  first (each run includes copying the input in and, for images, the compiled-in
  preprocessing and NMS).

Options:
  --runs N    time N more runs after the first
  --tensors   print the outputs as tensors even when the model gives detections
  --full      print every value of every output (with --tensors or a model without NMS)
  --save DIR  write output k as DIR/<k>.npy

Exit status: 0 ok, 1 the model failed, 2 bad usage, input or bundle.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string bundle;
  std::vector<std::string> inputs;
  int runs = 0;
  bool full = false;
  bool tensors = false;
  std::string save_dir;
};

struct HelpRequested {};

int ParseCount(const std::string& text) {
  bool digits = !text.empty() && text.size() <= 9 &&
                text.find_first_not_of("0123456789") == std::string::npos;
  int count = digits ? std::stoi(text) : 0;
  if (count < 1) throw UsageError("--runs takes a positive count, got " + text);
  return count;
}

Options ParseArguments(int argc, char** argv) {
  Options options;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--runs" && i + 1 < argc) {
      options.runs = ParseCount(argv[++i]);
    } else if (arg == "--full") {
      options.full = true;
    } else if (arg == "--tensors") {
      options.tensors = true;
    } else if (arg == "--save" && i + 1 < argc) {
      options.save_dir = argv[++i];
    } else if (arg == "-h" || arg == "--help") {
      throw HelpRequested();
    } else if (arg.rfind("--", 0) == 0) {
      throw UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) throw UsageError("give a bundle folder and an input file");
  options.bundle = positional[0];
  options.inputs.assign(positional.begin() + 1, positional.end());
  return options;
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw UsageError("cannot read " + path);
  std::ostringstream content;
  content << file.rdbuf();
  return content.str();
}

// numpy's dtype.str for the dtypes detc models take
std::string NpyDescr(const std::string& dtype) {
  if (dtype == "float32") return "<f4";
  if (dtype == "float16") return "<f2";
  if (dtype == "float64") return "<f8";
  if (dtype == "int8") return "|i1";
  if (dtype == "uint8") return "|u1";
  if (dtype == "int16") return "<i2";
  if (dtype == "int32") return "<i4";
  if (dtype == "int64") return "<i8";
  if (dtype == "bool") return "|b1";
  return "";
}

std::string HeaderValue(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  at = header.find(':', at);
  if (at == std::string::npos) return "";
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  if (at >= header.size()) return "";
  if (header[at] == '(') return header.substr(at, header.find(')', at) - at + 1);
  size_t end = header.find_first_of(",}", at);
  return header.substr(at, end - at);
}

std::string ShapeText(const int64_t* shape, int ndim) {
  std::string text = "[";
  for (int i = 0; i < ndim; ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// The data of `path` for an input described by `info`: the payload of a .npy whose dtype and
// shape match, or a raw file of exactly info.bytes.
std::string LoadInput(const std::string& path, const detc_tensor_info& info) {
  std::string content = ReadFile(path);
  const std::string magic = "\x93NUMPY";
  if (content.compare(0, magic.size(), magic) != 0) {
    if (content.size() != info.bytes) {
      throw UsageError(path + " has " + std::to_string(content.size()) + " bytes; input " +
                       info.name + " (" + info.dtype + " " + ShapeText(info.shape, info.ndim) +
                       ") takes " + std::to_string(info.bytes) + " (or give a .npy)");
    }
    return content;
  }
  if (content.size() < 10) throw UsageError(path + " is a truncated .npy file");
  unsigned major = static_cast<unsigned char>(content[6]);
  size_t header_length, header_start;
  if (major == 1) {
    header_length = static_cast<unsigned char>(content[8]) |
                    (static_cast<size_t>(static_cast<unsigned char>(content[9])) << 8);
    header_start = 10;
  } else {
    if (content.size() < 12) throw UsageError(path + " is a truncated .npy file");
    header_length = 0;
    for (int i = 0; i < 4; ++i) {
      header_length |= static_cast<size_t>(static_cast<unsigned char>(content[8 + i])) << (8 * i);
    }
    header_start = 12;
  }
  if (header_start + header_length > content.size()) {
    throw UsageError(path + " is a truncated .npy file");
  }
  std::string header = content.substr(header_start, header_length);
  std::string descr = HeaderValue(header, "descr");
  descr.erase(std::remove(descr.begin(), descr.end(), '\''), descr.end());
  if (descr != NpyDescr(info.dtype)) {
    throw UsageError(path + " holds " + descr + ", input " + info.name + " takes " + info.dtype);
  }
  if (HeaderValue(header, "fortran_order") != "False") {
    throw UsageError(path + " is in Fortran order; save it in C order");
  }
  std::string shape = HeaderValue(header, "shape");
  std::vector<int64_t> dims;
  std::string digits;
  for (char c : shape) {
    if (c >= '0' && c <= '9') {
      digits += c;
    } else if (!digits.empty()) {
      if (digits.size() > 18) throw UsageError(path + " has a malformed .npy shape " + shape);
      dims.push_back(std::stoll(digits));
      digits.clear();
    }
  }
  if (dims != std::vector<int64_t>(info.shape, info.shape + info.ndim)) {
    throw UsageError(path + " has shape " + shape + ", input " + info.name + " takes " +
                     ShapeText(info.shape, info.ndim));
  }
  std::string payload = content.substr(header_start + header_length);
  if (payload.size() != info.bytes) throw UsageError(path + " holds the wrong number of bytes");
  return payload;
}

std::string JsonString(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string JsonNumber(double value) {
  if (std::isnan(value) || std::isinf(value)) return "null";  // JSON has neither
  char text[32];
  std::snprintf(text, sizeof text, "%.9g", value);
  return text;
}

// The elements of an output as doubles; empty for dtypes without a numeric reading here.
std::vector<double> AsDoubles(const std::string& dtype, const void* data, size_t bytes) {
  std::vector<double> values;
  auto read = [&](auto sample) {
    using T = decltype(sample);
    const T* typed = static_cast<const T*>(data);
    for (size_t i = 0; i < bytes / sizeof(T); ++i) values.push_back(static_cast<double>(typed[i]));
  };
  if (dtype == "float32") read(float{});
  else if (dtype == "float64") read(double{});
  else if (dtype == "int8") read(int8_t{});
  else if (dtype == "uint8" || dtype == "bool") read(uint8_t{});
  else if (dtype == "int32") read(int32_t{});
  else if (dtype == "int64") read(int64_t{});
  return values;
}

void SaveNpy(const std::string& path, const detc_tensor_info& info, const void* data,
             size_t bytes) {
  std::string shape = "(";
  for (int i = 0; i < info.ndim; ++i) shape += std::to_string(info.shape[i]) + ", ";
  if (info.ndim > 1) shape.resize(shape.size() - 2);
  else if (info.ndim == 1) shape.resize(shape.size() - 1);
  shape += ")";
  std::string header = "{'descr': '" + NpyDescr(info.dtype) +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  // numpy pads the header with spaces so the data starts on a multiple of 64 bytes
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream file(path, std::ios::binary);
  file.write("\x93NUMPY\x01\x00", 8);
  char length[2] = {static_cast<char>(header.size() & 0xff),
                    static_cast<char>((header.size() >> 8) & 0xff)};
  file.write(length, 2);
  file << header;
  file.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!file) throw std::runtime_error("cannot write " + path);
}

struct RunFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void Check(detc_status status, bool usage_error) {
  if (status == DETC_OK) return;
  if (usage_error) throw UsageError(detc_last_error());
  throw RunFailure(detc_last_error());
}

bool EndsWith(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string Lowercase(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

// An image by its name (.ppm, .pnm) or, unless named as a tensor file, by its first bytes.
bool IsImageFile(const std::string& path, const std::string& content) {
  std::string name = Lowercase(path);
  if (EndsWith(name, ".ppm") || EndsWith(name, ".pnm")) return true;
  if (EndsWith(name, ".npy") || EndsWith(name, ".bin")) return false;
  return detc_ppm::LooksLikePnm(content);
}

std::string LatencyJson(const std::vector<double>& latencies) {
  std::vector<double> sorted = latencies;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double value : latencies) sum += value;
  return "{\"runs\": " + std::to_string(latencies.size()) +
         ", \"mean\": " + JsonNumber(sum / static_cast<double>(latencies.size())) +
         ", \"median\": " + JsonNumber(sorted[sorted.size() / 2]) +
         ", \"min\": " + JsonNumber(sorted.front()) + ", \"max\": " + JsonNumber(sorted.back()) +
         "}";
}

std::string DetectionsJson(const detc_detection* found, int count) {
  std::string json = "[";
  for (int i = 0; i < count; ++i) {
    const detc_detection& detection = found[i];
    json += std::string(i ? ", " : "") + "{\"box\": [" + JsonNumber(detection.box[0]) + ", " +
            JsonNumber(detection.box[1]) + ", " + JsonNumber(detection.box[2]) + ", " +
            JsonNumber(detection.box[3]) + "], \"score\": " + JsonNumber(detection.score) +
            ", \"class\": " + std::to_string(detection.class_id) + "}";
  }
  return json + "]";
}

std::string OutputsJson(detc_model* model, const Options& options) {
  std::string json = "{\"bundle\": " + JsonString(options.bundle) + ", \"outputs\": [";
  for (int k = 0; k < detc_num_outputs(model); ++k) {
    detc_tensor_info info;
    const void* data;
    size_t bytes;
    Check(detc_output_info(model, k, &info), false);
    Check(detc_output_data(model, k, &data, &bytes), false);
    json += std::string(k ? ", " : "") + "{\"name\": " + JsonString(info.name) +
            ", \"dtype\": " + JsonString(info.dtype) +
            ", \"shape\": " + ShapeText(info.shape, info.ndim);
    std::vector<double> values = AsDoubles(info.dtype, data, bytes);
    if (!values.empty()) {
      double low = values[0], high = values[0], sum = 0;
      for (double value : values) {
        low = std::min(low, value);
        high = std::max(high, value);
        sum += value;
      }
      json += ", \"summary\": {\"min\": " + JsonNumber(low) + ", \"max\": " + JsonNumber(high) +
              ", \"mean\": " + JsonNumber(sum / static_cast<double>(values.size())) + "}";
      if (options.full || values.size() <= kInlineValues) {
        json += ", \"values\": [";
        for (size_t i = 0; i < values.size(); ++i) {
          json += (i ? ", " : "") + JsonNumber(values[i]);
        }
        json += "]";
      }
    }
    json += "}";
  }
  return json + "]";
}

void SaveOutputs(detc_model* model, const std::string& save_dir) {
  for (int k = 0; k < detc_num_outputs(model); ++k) {
    detc_tensor_info info;
    const void* data;
    size_t bytes;
    Check(detc_output_info(model, k, &info), false);
    Check(detc_output_data(model, k, &data, &bytes), false);
    SaveNpy(save_dir + "/" + std::to_string(k) + ".npy", info, data, bytes);
  }
}

bool HasFreeDim(const detc_tensor_info& info) {
  for (int d = 0; d < info.ndim; ++d) {
    if (info.shape[d] < 0) return true;
  }
  return false;
}

int Main(const Options& options) {
  detc_model* model = nullptr;
  detc_status opened = detc_open(options.bundle.c_str(), &model);
  Check(opened, opened != DETC_ERROR_RUNTIME);
  std::unique_ptr<detc_model, void (*)(detc_model*)> owner(model, detc_close);

  // One closure per input kind, so that the timed runs repeat exactly the first.
  std::function<detc_status()> run;
  detc_ppm::Image image;
  std::vector<std::string> buffers;
  std::vector<const void*> pointers;
  std::vector<size_t> sizes;
  int num_inputs = detc_num_inputs(model);
  std::string first = options.inputs.size() == 1 ? ReadFile(options.inputs[0]) : "";
  if (options.inputs.size() == 1 && IsImageFile(options.inputs[0], first)) {
    std::string error = detc_ppm::Parse(first, &image);
    if (!error.empty()) throw UsageError(options.inputs[0] + ": " + error);
    run = [&] { return detc_run_image(model, image.rgb.data(), image.height, image.width); };
  } else {
    if (static_cast<int>(options.inputs.size()) != num_inputs) {
      throw UsageError("the model takes " + std::to_string(num_inputs) + " input(s), got " +
                       std::to_string(options.inputs.size()) + " file(s)");
    }
    for (int i = 0; i < num_inputs; ++i) {
      detc_tensor_info info;
      Check(detc_input_info(model, i, &info), true);
      if (HasFreeDim(info)) {
        throw UsageError("input " + std::string(info.name) +
                         " takes an image of any size: give a binary PPM image (P6)");
      }
      buffers.push_back(LoadInput(options.inputs[i], info));
    }
    for (const std::string& buffer : buffers) {
      pointers.push_back(buffer.data());
      sizes.push_back(buffer.size());
    }
    run = [&] { return detc_run(model, pointers.data(), sizes.data(), num_inputs); };
  }
  detc_status first_run = run();
  // a refused input (wrong image size, not an image model) is the user's, not the model's
  Check(first_run, first_run == DETC_ERROR_BAD_ARGUMENT);

  // the detections (and the --save files) of the first run: the timed runs only add latency
  const detc_detection* found = nullptr;
  int found_count = 0;
  bool detections = false;
  if (!options.tensors) {
    detc_status status = detc_detections(model, &found, &found_count);
    if (status != DETC_ERROR_BAD_ARGUMENT) Check(status, false);  // BAD_ARGUMENT: no NMS
    detections = status == DETC_OK;
  }
  std::string json = detections ? DetectionsJson(found, found_count) : OutputsJson(model, options);
  if (!options.save_dir.empty()) SaveOutputs(model, options.save_dir);

  std::vector<double> latencies;
  for (int count = 0; count < options.runs; ++count) {
    auto started = std::chrono::steady_clock::now();
    Check(run(), false);
    std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - started;
    latencies.push_back(elapsed.count());
  }
  if (detections) {
    if (!latencies.empty()) {
      json = "{\"detections\": " + json + ", \"latency_ms\": " + LatencyJson(latencies) + "}";
    }
  } else {
    if (!latencies.empty()) json += ", \"latency_ms\": " + LatencyJson(latencies);
    json += "}";
  }
  std::printf("%s\n", json.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(ParseArguments(argc, argv));
  } catch (const HelpRequested&) {
    std::printf("%s\n\n%s", kUsage, kHelp);
    return 0;
  } catch (const UsageError& error) {
    std::fprintf(stderr, "detc-run: error: %s\n", error.what());
    std::fprintf(stderr, "%s (--help for more)\n", kUsage);
    return 2;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "detc-run: error: %s\n", error.what());
    return 1;
  }
}
