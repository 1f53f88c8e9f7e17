/* detc_runtime.h — run a detc bundle from C or C++.
 *
 * A bundle is the folder `detc package` writes: the compiled model, its parameters, the TVM
 * runtime libraries for the device's architecture and this library (lib/libdetc_runtime.so).
 * Link with -ldetc_runtime (-L BUNDLE/lib, rpath BUNDLE/lib); nothing else is needed on the
 * device: no Python, no TVM headers.
 *
 *   detc_model* model = NULL;
 *   if (detc_open("/opt/detector", &model) != DETC_OK) { puts(detc_last_error()); return 1; }
 *   const void* inputs[] = {pixels};                // CHW float32, the input's shape
 *   size_t sizes[] = {pixel_bytes};
 *   if (detc_run(model, inputs, sizes, 1) != DETC_OK) { puts(detc_last_error()); }
 *   const void* data; size_t bytes;
 *   detc_output_data(model, 0, &data, &bytes);      // valid until the next run or close
 *   detc_close(model);
 *
 * Bundles compiled with `detc compile --with-preprocess --with-nms` take an image and give
 * detections (boxes in the image's pixels):
 *
 *   detc_run_image(model, rgb, height, width);      // uint8 RGB, row-major HWC, any size
 *   const detc_detection* found; int count;
 *   detc_detections(model, &found, &count);         // valid until the next run or close
 *   for (int i = 0; i < count; ++i) printf("class %d score %.2f\n", found[i].class_id,
 *                                          found[i].score);
 *
 * detc_open checks every file of the bundle against its SHA256SUMS before loading anything.
 * A model handle is not thread-safe: use one handle per thread. The number of worker threads
 * TVM's kernels use comes from the TVM_NUM_THREADS environment variable (default: all cores).
 */
#ifndef DETC_RUNTIME_H_
#define DETC_RUNTIME_H_

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define DETC_API __attribute__((visibility("default")))
#else
#define DETC_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* 2: detc_run_image, detc_detections, detc_num_classes, detc_class_name,
 *    detc_runtime_api_version (every version-1 call is unchanged) */
#define DETC_RUNTIME_API_VERSION 2

typedef enum {
  DETC_OK = 0,
  /* the folder is not a bundle this library reads (missing or malformed files) */
  DETC_ERROR_BAD_BUNDLE = 1,
  /* a file of the bundle does not match its SHA256SUMS entry (corrupt or replaced) */
  DETC_ERROR_INTEGRITY = 2,
  /* a wrong index, input count or input size, or a call the model's compiled-in stages do not
   * support (detc_last_error names the detc compile flag that adds them) */
  DETC_ERROR_BAD_ARGUMENT = 3,
  /* the model failed while loading or running */
  DETC_ERROR_RUNTIME = 4
} detc_status;

typedef struct detc_model detc_model;

/* One detection of a --with-nms model. */
typedef struct {
  /* x1, y1, x2, y2: pixels of the image given to detc_run_image (of the model's input when the
   * model was compiled without --with-preprocess) */
  float box[4];
  float score;
  /* 0 .. detc_num_classes() - 1, the order of the model spec's class names */
  int class_id;
} detc_detection;

typedef struct {
  const char* name;
  /* "float32", "float16", "int8", "uint8", "int32", "int64", "bool", ... */
  const char* dtype;
  int ndim;
  /* -1 for a dimension known only after a run (outputs of dynamic shape), or free (the image
   * input of a --with-preprocess model: any height and width) */
  const int64_t* shape;
  /* bytes of one tensor of this shape; 0 while a dimension is unknown */
  size_t bytes;
} detc_tensor_info;

/* Open the bundle in `bundle_dir`: check its files, load the model and its parameters. */
DETC_API detc_status detc_open(const char* bundle_dir, detc_model** model);

/* Release the model and its outputs; NULL is allowed. */
DETC_API void detc_close(detc_model* model);

/* The message of the last failed call on this thread ("" when none). */
DETC_API const char* detc_last_error(void);

DETC_API int detc_num_inputs(const detc_model* model);
DETC_API int detc_num_outputs(const detc_model* model);

/* The input's name, dtype and shape; pointers stay valid until detc_close. */
DETC_API detc_status detc_input_info(const detc_model* model, int index, detc_tensor_info* info);

/* The output's name, dtype and shape: as declared before the first run, as produced after. */
DETC_API detc_status detc_output_info(const detc_model* model, int index, detc_tensor_info* info);

/* Run once. `inputs[i]` holds input i (row-major, its dtype) and `input_bytes[i]` its size,
 * which must equal the input's `bytes`. The buffers are copied: any alignment will do. */
DETC_API detc_status detc_run(detc_model* model, const void* const* inputs,
                              const size_t* input_bytes, int num_inputs);

/* Output `index` of the last run (row-major, its dtype). Valid until the next run or close. */
DETC_API detc_status detc_output_data(const detc_model* model, int index, const void** data,
                                      size_t* bytes);

/* ---- version 2 -------------------------------------------------------------------------- */

/* The DETC_RUNTIME_API_VERSION this library was built with (compare with the header's). */
DETC_API int detc_runtime_api_version(void);

/* Run once on an image: `rgb` holds height * width * 3 bytes, RGB, row-major (HWC), uint8.
 * The model must take one uint8 (height, width, 3) input: any size when compiled with
 * `detc compile --with-preprocess`, else exactly its input's size. The image is copied. */
DETC_API detc_status detc_run_image(detc_model* model, const uint8_t* rgb, int height,
                                    int width);

/* The detections of the last run, best first (the model's NMS order): `*out` points at `*count`
 * entries, valid until the next run or close. Only for models compiled with `--with-nms`
 * (outputs boxes, scores, classes, count); DETC_ERROR_BAD_ARGUMENT otherwise. */
DETC_API detc_status detc_detections(detc_model* model, const detc_detection** out, int* count);

/* The number of class names the bundle carries (from the model spec; 0 when none). */
DETC_API int detc_num_classes(const detc_model* model);

/* The name of class `class_id`, or NULL when the bundle names no such class. Valid until
 * detc_close. */
DETC_API const char* detc_class_name(const detc_model* model, int class_id);

#ifdef __cplusplus
}
#endif

#endif /* DETC_RUNTIME_H_ */
