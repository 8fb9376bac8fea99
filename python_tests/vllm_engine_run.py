"""A vLLM engine in its own process (tensor parallel spawns workers; vLLM on the CPU needs the
``__main__`` guard): greedy tokens of ``prompts`` as one JSON line ``RESULT [...]``.

    python vllm_engine_run.py MODEL_DIR TP '{"policy": "h2o", ...}'|none PROMPTS_JSON MAX_TOKENS BLOCK_SIZE
"""

import json
import os
import sys

for _name, _value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                      "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_name, _value)

if __name__ == "__main__":
    import vllm

    model, tp, policy, prompts, max_tokens, block_size = sys.argv[1:7]
    kw = dict(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=256, block_size=int(block_size),
              enforce_eager=True, enable_prefix_caching=False, tensor_parallel_size=int(tp), seed=0)
    if policy != "none":
        kw.update(attention_backend="SINKLORA", additional_config={"sinklora": json.loads(policy)})
    llm = vllm.LLM(**kw)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in json.loads(prompts)], params, use_tqdm=False)
    print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
