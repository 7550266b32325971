// Makes dps_fast._C importable from Python; importing it runs the TORCH_LIBRARY
// registrations of the other translation units.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dps_fast fused ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
