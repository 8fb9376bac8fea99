// csrc/paged_plan.h: the layout of a paged-KV step plan (plan_paged, docs/paged_kv.md): a small
// int64 CPU tensor that records which index tensors were validated (data pointer and version
// counter, so a run can tell in O(1) whether it is given the same, unmodified tensors) and the
// split-KV sizes of the CUDA decode.
#pragma once

#include <cstdint>

namespace sinklora {

enum PagedPlanField : int {
  kPlanMagic,
  kPlanNumBlocks,   // the pool the plan was validated against
  kPlanBlockSize,
  kPlanHeadsKv,
  kPlanTablesPtr,   // 0: no block tables
  kPlanTablesVersion,
  kPlanBatch,
  kPlanMaxBlocks,
  kPlanLensBegin,   // [begin, end) bytes of the validated seq_lens ([B], or [rows, B]); a run passes one row
  kPlanLensVersion,
  kPlanSlotsBegin,  // [begin, end) bytes of the validated slots (0, 0: none); a run may pass a view
  kPlanSlotsEnd,
  kPlanSlotsVersion,
  kPlanHeadsQ,      // query heads the split sizes were computed for (0: none computed)
  kPlanSplits,      // CUDA decode: splits per (sequence, kv head), 0 when not computed
  kPlanPartition,   // CUDA decode: slots per split
  kPlanLensEnd,
  kPlanFields
};

constexpr int64_t kPlanMagicValue = 0x534c4b5650414e31;  // "SLKVPAN1"

}  // namespace sinklora
