// The Python extension module boxloss._C.  It holds no Python functions:
// importing it runs the static registrations of the ops with the PyTorch
// dispatcher (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in csrc/ops).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "boxloss compiled ops (registered with torch.ops.boxloss)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
