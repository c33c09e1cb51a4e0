// The Python module pydiff._C: loading it registers the CPU (and CUDA) kernels of torch.ops.pydiff.*,
// and it holds solver_step_direct, a dispatcher-free entry to the same solver_step kernels.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>

#include "solver_args.h"

#ifndef PYDIFF_CUDA_ARCHS
#define PYDIFF_CUDA_ARCHS ""
#endif

namespace {
PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef PYDIFF_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
PyObject* cuda_archs(PyObject*, PyObject*) { return PyUnicode_FromString(PYDIFF_CUDA_ARCHS); }

// ---- solver_step_direct ------------------------------------------------------------------------
//
// solver_step_direct(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step,
//                    clip_lo, clip_hi, write_history[, x0_stats]) -> (Tensor, Tensor) | NotImplemented
//
// The arguments of torch.ops.pydiff.solver_step (solver_step_track with x0_stats), positional (except
// that write_history may be None: the default of pydiff.solver_step, computed here), and the
// same kernel bodies (pydiff::solver_step_{cpu,cuda}_impl) those registrations run, minus the
// dispatcher: torch.ops parses the 12 arguments against the schema into a boxed IValue stack, walks
// the dispatch keys (Autograd fallback, ADInplaceOrView, CPU/CUDA) and unboxes again. Measured with
// 128-element tensors: torch.ops.pydiff.solver_step 3.9 us, this call 1.15 us, torch.add 0.95 us
// (2-core CPU box, torch 2.14); on an H100 host (torch 2.11, CUDA tensors) 14.5-21.5 us vs 8.8-9.1 us
// (torch.add 7.5-10 us). The fall-back checks below cost ~0.03 us, the GIL release ~0.03 us.
//
// It only runs when the dispatcher would do exactly the same thing, i.e. reach the CPU or CUDA kernel
// with nothing in between that acts; otherwise it returns NotImplemented, before touching anything,
// and the caller (pydiff/ops/solver.py) goes through torch.ops. Falls back when:
//  * an argument has an unexpected Python type: a tensor that is not exactly torch.Tensor (subclasses,
//    FakeTensor, Parameter: __torch_function__ / __torch_dispatch__), coeffs not a list/tuple of
//    Python floats, clip not floats, write_history not a bool, too many history entries or coeffs
//    (the dispatcher path then also produces the error message for bad input);
//  * a tensor is on another device than x (the dispatcher picks the kernel by all of them);
//  * grad mode is on and a tensor requires grad (the Autograd fallback attaches a grad_fn that warns
//    or raises on backward);
//  * the dispatch keys the dispatcher would compute from the tensors and the thread-local include /
//    exclude sets hold anything but the backend (CPU / CUDA) and keys that pass straight through for
//    this op (BackendSelect, ADInplaceOrView, Autograd without grad, Autocast): Python dispatch modes,
//    functorch transforms (vmap, grad, functionalize), jit tracing, conjugate / negative views, sparse
//    or nested tensors, ...;
//  * a TorchFunctionMode is active, or RecordFunction callbacks (the profiler) are installed (they
//    would record the op);
//  * x is on a device without compiled kernels here (CUDA when built without them, meta, ...).
// torch.compile is excluded by the caller (torch.compiler.is_compiling()): Dynamo has to see the op.

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

// Python tensor -> at::Tensor when it is exactly torch.Tensor (not a subclass, not Parameter).
inline bool plain_tensor(PyObject* o) { return Py_TYPE(o) == reinterpret_cast<PyTypeObject*>(THPVariableClass); }

// Keys whose kernels for pydiff::solver_step[_track] are fallthroughs or, without grad, plain redispatches.
const c10::DispatchKeySet kPassThroughKeys = c10::DispatchKeySet({
    c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradFunctionality,
    c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA});

struct DirectTensors {
  c10::DispatchKeySet keys;
  bool requires_grad = false;
  bool same_device = true;
  void add(const at::Tensor& t, const at::Device& dev) {
    keys = keys | t.key_set();
    requires_grad = requires_grad || t.requires_grad();
    same_device = same_device && t.device() == dev;
  }
};

// None -> nullopt; a plain tensor -> it; anything else -> false (fall back).
inline bool opt_tensor(PyObject* o, std::optional<at::Tensor>& out, DirectTensors& seen, const at::Device& dev) {
  if (o == Py_None) return true;
  if (!plain_tensor(o)) return false;
  out = THPVariable_Unpack(o);
  seen.add(*out, dev);
  return true;
}

PyObject* solver_step_direct(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if ((nargs != 12 && nargs != 13) || !plain_tensor(args[0])) return not_implemented();
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Device dev = x.device();
  DirectTensors seen;
  seen.add(x, dev);
  std::optional<at::Tensor> model_cond, model_uncond, noise, row_scale, coeff_table, step, x0_stats;
  if (!opt_tensor(args[1], model_cond, seen, dev) || !opt_tensor(args[2], model_uncond, seen, dev) ||
      !opt_tensor(args[4], noise, seen, dev) || !opt_tensor(args[5], row_scale, seen, dev) ||
      !opt_tensor(args[7], coeff_table, seen, dev) || !opt_tensor(args[8], step, seen, dev))
    return not_implemented();
  if (nargs == 13 && (args[12] == Py_None || !opt_tensor(args[12], x0_stats, seen, dev))) return not_implemented();

  // history: a list or tuple of plain tensors, at most kMaxHistory (more: the op's error, via torch.ops)
  PyObject* hist = args[3];
  if (!PyList_CheckExact(hist) && !PyTuple_CheckExact(hist)) return not_implemented();
  const Py_ssize_t nh = PySequence_Fast_GET_SIZE(hist);
  if (nh > pydiff::kMaxHistory) return not_implemented();
  PyObject** hitems = PySequence_Fast_ITEMS(hist);
  std::array<at::Tensor, pydiff::kMaxHistory> history;
  for (Py_ssize_t i = 0; i < nh; ++i) {
    if (!plain_tensor(hitems[i])) return not_implemented();
    history[i] = THPVariable_Unpack(hitems[i]);
    seen.add(history[i], dev);
  }

  // coeffs: a list or tuple of Python floats, at most kMaxStepCoeffs (more: the op's error, via torch.ops)
  PyObject* co = args[6];
  if (!PyList_CheckExact(co) && !PyTuple_CheckExact(co)) return not_implemented();
  const Py_ssize_t nc = PySequence_Fast_GET_SIZE(co);
  if (nc > pydiff::kMaxStepCoeffs) return not_implemented();
  PyObject** citems = PySequence_Fast_ITEMS(co);
  std::array<double, pydiff::kMaxStepCoeffs> coeffs;
  for (Py_ssize_t i = 0; i < nc; ++i) {
    if (!PyFloat_CheckExact(citems[i])) return not_implemented();
    coeffs[i] = PyFloat_AS_DOUBLE(citems[i]);
  }
  if (!PyFloat_CheckExact(args[9]) || !PyFloat_CheckExact(args[10])) return not_implemented();
  const double clip_lo = PyFloat_AS_DOUBLE(args[9]), clip_hi = PyFloat_AS_DOUBLE(args[10]);
  // write_history None: the wrapper's default, computed here as solver.py does it (saves ~0.1 us there):
  // with a coefficient table, or when the history row (coeffs[11 + K:]) has a nonzero (or NaN) entry
  bool write_history = args[11] == Py_True;
  if (args[11] == Py_None) {
    write_history = coeff_table.has_value();
    for (Py_ssize_t i = pydiff::kHeadCoeffs + pydiff::kRowTerms + nh; i < nc && !write_history; ++i)
      write_history = coeffs[i] != 0.0;
  } else if (!PyBool_Check(args[11])) {
    return not_implemented();
  }

  // would the dispatcher run anything but the backend kernel?
  if (!seen.same_device || (seen.requires_grad && c10::GradMode::is_enabled())) return not_implemented();
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  const c10::DispatchKeySet keys = ((seen.keys | tls.included_) - tls.excluded_) - kPassThroughKeys;
  if (keys.highestFunctionalityKey() != c10::DispatchKey::Dense) return not_implemented();
  if (at::impl::torch_function_mode_enabled() || at::hasCallbacks()) return not_implemented();

  const at::TensorList hl(history.data(), size_t(nh));
  const c10::ArrayRef<double> cl(coeffs.data(), size_t(nc));
  std::tuple<at::Tensor, at::Tensor> out;
  if (dev.is_cpu()) {
    pybind11::gil_scoped_release no_gil;  // as torch.ops does around the kernel
    out = pydiff::solver_step_cpu_impl(x, model_cond, model_uncond, hl, noise, row_scale, cl, coeff_table, step, clip_lo,
                                       clip_hi, write_history, x0_stats);
  } else {
#ifdef PYDIFF_WITH_CUDA
    if (!dev.is_cuda()) return not_implemented();
    pybind11::gil_scoped_release no_gil;
    out = pydiff::solver_step_cuda_impl(x, model_cond, model_uncond, hl, noise, row_scale, cl, coeff_table, step,
                                        clip_lo, clip_hi, write_history, x0_stats);
#else
    return not_implemented();
#endif
  }
  PyObject* a = THPVariable_Wrap(std::move(std::get<0>(out)));
  if (!a) return nullptr;
  PyObject* b = THPVariable_Wrap(std::move(std::get<1>(out)));
  if (!b) {
    Py_DECREF(a);
    return nullptr;
  }
  PyObject* res = PyTuple_Pack(2, a, b);
  Py_DECREF(a);
  Py_DECREF(b);
  return res;
  END_HANDLE_TH_ERRORS
}

// solver_cuda_launch(threads, blocks_per_sm): the CUDA step kernel's launch shape (tuning hook, see
// pydiff::solver_step_cuda_set_launch; 0, 0 = defaults). Raises ValueError for a bad value, and
// RuntimeError in a build without CUDA kernels.
PyObject* solver_cuda_launch(PyObject*, PyObject* args) {
  int threads = 0, per_sm = 0;
  if (!PyArg_ParseTuple(args, "ii", &threads, &per_sm)) return nullptr;
#ifdef PYDIFF_WITH_CUDA
  if (pydiff::solver_step_cuda_set_launch(threads, per_sm) != 0) {
    PyErr_Format(PyExc_ValueError,
                 "solver_cuda_launch: expected threads in (0, 64, 128, 256) and blocks_per_sm in [0, 1024], got %d, %d",
                 threads, per_sm);
    return nullptr;
  }
  Py_RETURN_NONE;
#else
  PyErr_SetString(PyExc_RuntimeError, "solver_cuda_launch: this build has no CUDA kernels");
  return nullptr;
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cuda_archs", cuda_archs, METH_NOARGS, "The CUDA architectures the kernels were compiled for."},
    {"solver_cuda_launch", solver_cuda_launch, METH_VARARGS,
     "solver_cuda_launch(threads, blocks_per_sm): the CUDA solver kernel's launch shape (tuning; 0, 0 = defaults)."},
    {"solver_step_direct", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(solver_step_direct)),
     METH_FASTCALL,
     "solver_step_direct(x, model_cond, model_uncond, history, noise, row_scale, coeffs, coeff_table, step, clip_lo, "
     "clip_hi, write_history[, x0_stats]): torch.ops.pydiff.solver_step (solver_step_track with x0_stats) without "
     "the dispatcher; returns NotImplemented where the dispatcher would do anything else than call the CPU / CUDA "
     "kernel (see csrc/bindings/module.cpp)."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pydiff compiled kernels", -1, methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
