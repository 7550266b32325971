// Makes dps_fast._C importable from Python; importing it runs the TORCH_LIBRARY
// registrations of the other translation units.
//
// It also binds the eager fast path as a plain CPython function, dps_fast._C.dps_ce_eager,
// which dps_fast/_dispatch.py::eager_op prefers to torch.ops.dps_fast.dps_ce_eager: the same
// op, called through the same dispatcher (csrc/fast_path.h), without torch.ops' Python frame
// and boxed argument parsing. Measured side by side at [128, 10] (2-core VM, 2026-11-30,
// 500 calls x 30 rounds, interleaved): the forward through torch.ops 22.5 us, through a
// binding 15.1 us.
//
// What torch.ops does that this binding does not: __torch_function__ of tensor subclasses.
// It takes only plain tensors (torch.Tensor, nn.Parameter) and declines anything else the
// way the op declines (a NotImplementedError the Python path catches, csrc/fast_path.cpp).
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "fast_path.h"

namespace {

const at::Tensor& tensor_arg(PyObject* obj) {
  DPS_ACCEPT(THPVariable_CheckExact(obj), "arguments that are not plain tensors");
  return THPVariable_Unpack(obj);
}

// A float, or an int that a double holds exactly (dps_fast/_fast_path.py, the kind "real").
double real_arg(PyObject* obj) {
  if (PyFloat_CheckExact(obj)) return PyFloat_AS_DOUBLE(obj);
  DPS_ACCEPT(PyLong_CheckExact(obj), "this number type");
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
  constexpr long long kExact = 1LL << 53;
  DPS_ACCEPT(overflow == 0 && value >= -kExact && value <= kExact, "this number");
  return static_cast<double>(value);
}

bool bool_arg(PyObject* obj) {
  DPS_ACCEPT(PyBool_Check(obj), "flags that are not bools");
  return obj == Py_True;
}

// A view of a str's UTF-8, valid while the caller holds the object.
c10::string_view str_arg(PyObject* obj) {
  DPS_ACCEPT(PyUnicode_Check(obj), "names that are not str");
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
  if (data == nullptr) throw python_error();
  return {data, static_cast<size_t>(size)};
}

// dps_ce_eager(logits, index, alpha, gamma, tau_e, target, reduction, update, validate, backend),
// positional, as the op's schema.
PyObject* dps_ce_eager(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == dps_fast::contract::kEagerArguments, "dps_fast._C.dps_ce_eager takes ",
                   dps_fast::contract::kEagerArguments, " positional arguments, got ", nargs);
  const at::Tensor& logits = tensor_arg(args[0]);
  const at::Tensor& index = tensor_arg(args[1]);
  at::Tensor alpha = tensor_arg(args[2]);
  const double gamma = real_arg(args[3]), tau_e = real_arg(args[4]);
  const c10::string_view target = str_arg(args[5]), reduction = str_arg(args[6]);
  const bool update = bool_arg(args[7]), validate = bool_arg(args[8]);
  std::optional<c10::string_view> backend;
  if (args[9] != Py_None) backend = str_arg(args[9]);
  at::Tensor loss;
  {
    // as torch.ops does: other Python threads (data loading) run during the kernel
    pybind11::gil_scoped_release no_gil;
    loss = dps_fast::call_dps_ce_eager(logits, index, alpha, gamma, tau_e, target, reduction, update, validate,
                                       backend);
  }
  return THPVariable_Wrap(std::move(loss));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"dps_ce_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dps_ce_eager)), METH_FASTCALL,
     "The eager fast path of dps_fast.dps_cross_entropy (csrc/fast_path.cpp); dps_fast calls it."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dps_fast fused ops", -1, methods};
  return PyModule_Create(&module_def);
}
}
