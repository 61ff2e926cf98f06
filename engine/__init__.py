"""crucible's paged-attention inference engine: ``from engine import LLM, SamplingParams``.

Files by role (a request flows top to bottom):
  llm.py            offline API (generate, chat, stream, score, update_weights)
  llm_engine.py     requests in, one scheduled step at a time, outputs out; stop rules
  scheduler.py      continuous batching: token budget, chunked prefill, preemption (FCFS)
  block_manager.py  KV blocks with reference counts and hash-chained prefix caching
  sequence.py       one sequence's tokens, computed count and block table
  model_runner.py   model + KV cache on a device: step inputs, forward, CUDA graphs
  model.py          Llama-family decoder (fused qkv / gate_up); layers.py: Linear, RMSNorm, RoPE
  attention.py      paged attention: torch reference, Triton dispatch (kernels/: paged_attention.py,
                    rope_kv.py, gemv.py, argmax.py, decode_advance.py)
  sampler.py        penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs
  loader.py         safetensors / trainer tensors / PEFT adapters -> fused parameters
  evaluate.py       perplexity and task accuracy (launch/eval.py, trainer eval hooks)
"""
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
