// All op schemas of sinklora_ext, registered once. Device kernels register beside their code.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

// The emulator build (csrc/emu/) registers the same schemas under its own namespace, with the CUDA
// kernels run by the CPU emulation of CUDA on CPU tensors.
#if defined(SINKLORA_CUDA_EMULATION)
#define SINKLORA_OPS sinklora_cuda_emu
#else
#define SINKLORA_OPS sinklora_ext
#endif
// Expands the namespace macro before TORCH_LIBRARY pastes it.
#define SINKLORA_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define SINKLORA_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace {
void register_kernels(torch::Library& m) {
  m.impl("sf_attention_fwd", &sinklora::sf_attention_fwd);
  m.impl("sf_attention_bwd", &sinklora::sf_attention_bwd);
  m.impl("sf_attention_column_scores", &sinklora::sf_attention_column_scores);
  m.impl("paged_decode", &sinklora::paged_decode);
  m.impl("paged_write_kv_", &sinklora::paged_write_kv_);
  m.impl("h2o_evict", &sinklora::h2o_evict);
}
}  // namespace

SINKLORA_TORCH_LIBRARY(SINKLORA_OPS, m) {
  m.def(
      "sf_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, "
      "int group_size, int num_sinks, str shift, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "sf_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens, int max_seqlen, int group_size, int num_sinks, str shift, "
      "float softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "sf_attention_column_scores(Tensor q, Tensor k, Tensor lse, Tensor? cu_seqlens, int max_seqlen, "
      "int group_size, int num_sinks, str shift, float softmax_scale) -> Tensor");
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "float softmax_scale, Tensor(a!)? scores) -> Tensor");
  m.def(
      "paged_write_kv_(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
      "Tensor(c!)? scores, Tensor? new_scores, Tensor(d!)? positions, Tensor? token_positions) -> ()");
  m.def(
      "h2o_evict(Tensor scores, Tensor positions, Tensor block_tables, Tensor seq_lens, int num_sinks, "
      "int recent, str policy) -> Tensor");
}

SINKLORA_TORCH_LIBRARY_IMPL(SINKLORA_OPS, CPU, m) { register_kernels(m); }

#if defined(SINKLORA_WITH_CUDA) && !defined(SINKLORA_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(sinklora_ext, CUDA, m) { register_kernels(m); }
#endif

// Importing the module (sinklora_ext._C, or the emulator build's) runs the registrations above. The
// module itself holds one plain function, not an op: trust_tables(enabled) -> previous, the
// per-thread switch of the host-side table checks.
static PyObject* trust_tables_py(PyObject*, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) return nullptr;
  return PyBool_FromLong(sinklora::trust_tables(enabled != 0));
}

#define SINKLORA_STR(x) #x
#define SINKLORA_XSTR(x) SINKLORA_STR(x)
#define SINKLORA_PYINIT_NAME(name) PyInit_##name
#define SINKLORA_PYINIT(name) SINKLORA_PYINIT_NAME(name)

extern "C" PyObject* SINKLORA_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static PyMethodDef methods[] = {
      {"trust_tables", trust_tables_py, METH_O, "trust_tables(enabled) -> previous setting (this thread)"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, SINKLORA_XSTR(TORCH_EXTENSION_NAME), nullptr, -1,
                                          methods};
  return PyModule_Create(&module_def);
}
