// The Python module pydiff._C: loading it registers the CPU (and CUDA) kernels of torch.ops.pydiff.*.
#include <Python.h>

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

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cuda_archs", cuda_archs, METH_NOARGS, "The CUDA architectures the kernels were compiled for."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pydiff compiled kernels", -1, methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
