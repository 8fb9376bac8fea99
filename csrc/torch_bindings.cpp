// All op schemas of sinklora_ext, registered once. Device kernels register beside their code.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(sinklora_ext, m) {
  m.def(
      "sf_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, "
      "int group_size, int num_sinks, str shift, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "sf_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens, int max_seqlen, int group_size, int num_sinks, str shift, "
      "float softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(sinklora_ext, CPU, m) {
  m.impl("sf_attention_fwd", &sinklora::sf_attention_fwd);
  m.impl("sf_attention_bwd", &sinklora::sf_attention_bwd);
}

#ifdef SINKLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(sinklora_ext, CUDA, m) {
  m.impl("sf_attention_fwd", &sinklora::sf_attention_fwd);
  m.impl("sf_attention_bwd", &sinklora::sf_attention_bwd);
}
#endif

// `import sinklora_ext._C` runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
