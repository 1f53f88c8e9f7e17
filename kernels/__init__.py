"""Hand-written TVM kernels and schedules (int8 conv/matmul, NMS, ...). Imports TVM."""
