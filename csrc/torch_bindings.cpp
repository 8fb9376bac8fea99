// csrc/torch_bindings.cpp: every op schema of sinklora_ext, defined once (docs/ops.md), and the
// extension module's init. The kernels register per device: cpu/torch_bindings_cpu.cpp (CPU key)
// and cuda/torch_bindings_cuda.cpp (CUDA key, CUDA builds only). The emulator build (csrc/emu/)
// defines the same schemas in its own namespace, with the CUDA entry points under its CPU key.
#include <Python.h>

#include <torch/library.h>

#if defined(SINKLORA_CUDA_EMULATION)
#define SINKLORA_OPS sinklora_cuda_emu
#else
#define SINKLORA_OPS sinklora_ext
#endif
// Expands the namespace macro before TORCH_LIBRARY pastes it.
#define SINKLORA_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

SINKLORA_TORCH_LIBRARY(SINKLORA_OPS, m) {
  m.def(
      "sf_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, "
      "int group_size, int num_sinks, str shift, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "sf_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens, int max_seqlen, int group_size, int num_sinks, str shift, "
      "float softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "column_scores(Tensor q, Tensor k, Tensor lse, Tensor? cu_seqlens, int max_seqlen, "
      "int group_size, int num_sinks, str shift, float softmax_scale) -> Tensor");
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "float softmax_scale, Tensor(a!)? scores, Tensor? plan=None) -> Tensor");
  m.def(
      "paged_write_(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
      "Tensor(c!)? scores, Tensor? new_scores, Tensor(d!)? positions, Tensor? token_positions, "
      "Tensor? plan=None) -> ()");
  m.def(
      "select_evictions(Tensor(a!) scores, Tensor positions, Tensor block_tables, Tensor seq_lens, int num_sinks, "
      "int recent, str policy, float score_decay=1., Tensor? plan=None) -> Tensor");
  // MSA-Conv (TiC): q, k, v [B, H, W, heads, D]; kernel_size, dilation (h, w); kv_shift flat
  // [heads * 2] of (sy, sx) or None; lse float32 [B, H, W, heads].
  m.def(
      "msa_conv2d_fwd(Tensor q, Tensor k, Tensor v, int[] kernel_size, int[] dilation, str padding, "
      "int[]? kv_shift, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "msa_conv2d_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int[] kernel_size, "
      "int[] dilation, str padding, int[]? kv_shift, float softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // A step plan (csrc/paged_plan.h): int64 CPU tensor; num_heads_q 0 leaves the split sizes to the run.
  m.def(
      "plan_paged(Tensor k_cache, Tensor? block_tables, Tensor? seq_lens, Tensor? slots, int num_heads_q) "
      "-> Tensor");
  // "mma", "generic" or "cpu": the kernel `op` runs for dense inputs of like's dtype on like's device.
  m.def("kernel_for(Tensor like, str op, int head_dim, int heads_per_kv) -> str");
}

// Importing the module (sinklora_ext._C, or the emulator build's) runs the registrations; the module
// itself is empty.
#define SINKLORA_STR(x) #x
#define SINKLORA_XSTR(x) SINKLORA_STR(x)
#define SINKLORA_PYINIT_NAME(name) PyInit_##name
#define SINKLORA_PYINIT(name) SINKLORA_PYINIT_NAME(name)

extern "C" PyObject* SINKLORA_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, SINKLORA_XSTR(TORCH_EXTENSION_NAME), nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
