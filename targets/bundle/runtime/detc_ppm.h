/* detc_ppm.h — read a binary PPM image (P6, maxval 255) as RGB bytes. Header-only C++17.
 *
 * Shipped in a bundle's include/ beside detc_runtime.h for detc-run and the example: the
 * image a detc_run_image call takes is what this returns (height x width x 3, RGB, row-major).
 * Any other image format converts to P6 with standard tools, e.g.
 *   convert photo.jpg photo.ppm        (ImageMagick)
 *   python -c "from PIL import Image; Image.open('photo.jpg').convert('RGB').save('photo.ppm')"
 *
 *   detc_ppm::Image image;
 *   std::string error = detc_ppm::ReadFile("photo.ppm", &image);   // "" when it was read
 *
 * The header is checked before anything is allocated: sides above kMaxSide, pixel data shorter
 * or longer than width * height * 3 bytes, other maxvals and other PNM kinds (P1-P5, P7) are
 * refused with a one-line reason.
 */
#ifndef DETC_PPM_H_
#define DETC_PPM_H_

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace detc_ppm {

/* Largest width or height read: larger sides are refused before any allocation. */
constexpr int kMaxSide = 1 << 14;

struct Image {
  int height = 0;
  int width = 0;
  std::vector<uint8_t> rgb;  // height * width * 3 bytes, RGB, row-major
};

/* Whether `data` starts like a PNM file of any kind ("P1" … "P7"). */
inline bool LooksLikePnm(const std::string& data) {
  return data.size() >= 2 && data[0] == 'P' && data[1] >= '1' && data[1] <= '7';
}

namespace internal {

inline bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

// Skips whitespace and '#' comments (to the end of their line), then reads a decimal number of
// at most 9 digits (no overflow). Returns -1 when there is none.
inline long ReadHeaderNumber(const std::string& data, size_t* at) {
  while (*at < data.size()) {
    if (IsSpace(data[*at])) {
      ++*at;
    } else if (data[*at] == '#') {
      while (*at < data.size() && data[*at] != '\n' && data[*at] != '\r') ++*at;
    } else {
      break;
    }
  }
  long value = 0;
  size_t digits = 0;
  while (*at < data.size() && data[*at] >= '0' && data[*at] <= '9') {
    if (++digits > 9) return -1;
    value = value * 10 + (data[*at] - '0');
    ++*at;
  }
  return digits == 0 ? -1 : value;
}

}  // namespace internal

/* Parse the whole content of a PPM file; "" on success, else a one-line reason. */
inline std::string Parse(const std::string& data, Image* image) {
  if (!LooksLikePnm(data)) return "not a PPM image (it does not start with P6)";
  if (data[1] != '6') {
    return std::string("a P") + data[1] +
           " PNM image; only binary PPM (P6, RGB, maxval 255) is read: convert it to P6";
  }
  size_t at = 2;
  if (at >= data.size() || !(internal::IsSpace(data[at]) || data[at] == '#')) {
    return "malformed PPM header after P6";
  }
  long width = internal::ReadHeaderNumber(data, &at);
  long height = internal::ReadHeaderNumber(data, &at);
  long maxval = internal::ReadHeaderNumber(data, &at);
  if (width < 0 || height < 0 || maxval < 0) {
    return "malformed or truncated PPM header (expected width, height and maxval)";
  }
  if (width == 0 || height == 0) return "the PPM image is empty (width or height 0)";
  if (width > kMaxSide || height > kMaxSide) {
    return "the PPM image is " + std::to_string(width) + "x" + std::to_string(height) +
           "; sides up to " + std::to_string(kMaxSide) + " pixels are read";
  }
  if (maxval != 255) {
    return "the PPM image has maxval " + std::to_string(maxval) +
           "; only 8-bit images (maxval 255) are read";
  }
  // exactly one whitespace byte separates the header from the pixels
  if (at >= data.size() || !internal::IsSpace(data[at])) {
    return "malformed or truncated PPM header (no whitespace after maxval)";
  }
  ++at;
  size_t expected = static_cast<size_t>(width) * static_cast<size_t>(height) * 3;
  size_t available = data.size() - at;
  if (available != expected) {
    return "the PPM image (" + std::to_string(width) + "x" + std::to_string(height) +
           ") needs " + std::to_string(expected) + " bytes of pixels, the file holds " +
           std::to_string(available) + (available < expected ? " (truncated)" : "");
  }
  image->width = static_cast<int>(width);
  image->height = static_cast<int>(height);
  image->rgb.assign(data.begin() + static_cast<std::ptrdiff_t>(at), data.end());
  return "";
}

/* Read and parse the PPM file at `path`; "" on success, else a one-line reason. */
inline std::string ReadFile(const std::string& path, Image* image) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) return "cannot read " + path;
  std::streamoff size = file.tellg();
  // the largest valid image plus a generous header: refuse bigger files before reading them
  const std::streamoff limit = static_cast<std::streamoff>(kMaxSide) * kMaxSide * 3 + 4096;
  if (size < 0 || size > limit) return path + " is too large for a PPM image detc reads";
  std::string data(static_cast<size_t>(size), '\0');
  file.seekg(0);
  file.read(&data[0], size);
  if (!file) return "cannot read " + path;
  std::string error = Parse(data, image);
  return error.empty() ? "" : path + ": " + error;
}

}  // namespace detc_ppm

#endif /* DETC_PPM_H_ */
