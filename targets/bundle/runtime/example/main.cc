// An application on detc's C API: open the bundle, run it on a PPM image, print the detections.
// Build it with the CMakeLists.txt beside it.
//
//   ./detect BUNDLE_DIR IMAGE.ppm
//
// The bundle's model must be compiled with `detc compile --with-preprocess --with-nms`: it then
// takes RGB images of any size and returns boxes in the image's pixels, after NMS. Other image
// formats convert to binary PPM (P6) with standard tools (see include/detc_ppm.h).
// Exit status: 0 ok, 1 the model failed, 2 bad usage, image or bundle.

#include <detc_ppm.h>
#include <detc_runtime.h>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s BUNDLE_DIR IMAGE.ppm\n", argv[0]);
    return 2;
  }
  detc_ppm::Image image;
  std::string error = detc_ppm::ReadFile(argv[2], &image);
  if (!error.empty()) {
    std::fprintf(stderr, "%s\n", error.c_str());
    return 2;
  }

  detc_model* model = nullptr;
  detc_status status = detc_open(argv[1], &model);
  if (status != DETC_OK) {
    std::fprintf(stderr, "cannot open %s: %s\n", argv[1], detc_last_error());
    return status == DETC_ERROR_RUNTIME ? 1 : 2;
  }
  // the status says whose fault a failure is: the input's (BAD_ARGUMENT) or the model's
  const detc_detection* found = nullptr;
  int count = 0;
  status = detc_run_image(model, image.rgb.data(), image.height, image.width);
  if (status == DETC_OK) status = detc_detections(model, &found, &count);
  if (status != DETC_OK) {
    std::fprintf(stderr, "%s\n", detc_last_error());
    detc_close(model);
    return status == DETC_ERROR_BAD_ARGUMENT ? 2 : 1;
  }

  std::printf("%d detection(s) in %s (%dx%d)\n", count, argv[2], image.width, image.height);
  for (int i = 0; i < count; ++i) {
    const detc_detection& d = found[i];
    const char* name = detc_class_name(model, d.class_id);  // NULL when the bundle has no names
    std::printf("%-12s class %d  score %.3f  box %.1f %.1f %.1f %.1f\n", name ? name : "-",
                d.class_id, d.score, d.box[0], d.box[1], d.box[2], d.box[3]);
  }
  detc_close(model);
  return 0;
}
