"""The efficiency benchmark behind ``scripts/bench.py``: speed, memory and cache size per mechanism.

For every mechanism (every registered name, or the presets in ``bench.attention``) on one model:

* **training**: tokens/s of a full step (forward, task + aux losses, backward, AdamW) and its peak
  memory, at each context length; model FLOPs per token and MFU against the measured matmul peak;
* **decoding**: tokens/s of single-token steps with the cache, after a prefill of ``L`` tokens:
  eager (each mechanism's own code) and, with ``bench.decode_compile=true``, the compiled static
  step (``GPT.step(compile=True)``, CUDA graphs on CUDA) with its compile time and graph counts;
  beside them the time of one read of the LM head's weights, the floor of any decoding step;
* **cache**: bytes per token held by the actual cache tensors after ``L`` tokens, beside the
  mechanism's closed form (and ``used_nbytes()`` where a cache class reports what it uses);
* **parameters**: ``GPT.parameter_counts()``.

``bench.reference=true`` instead compares attnlab's training path (LitLM under a Lightning
Trainer, chunked loss) with a bare PyTorch loop over the same model (plain cross-entropy), with
``torch.compile`` and dropout variants.

How things are measured:

* Timing: ``warmup`` untimed calls, then ``repeats`` timed ones (CUDA synchronised); the median is
  reported with min/max and the interquartile range. ``bench.rounds=R`` times every mechanism R
  times, round after round over all of them, and pools the timed calls
  (:func:`~attnlab.bench.mechanisms.pool_rounds`): on a shared host whose speed drifts, the
  ratios between mechanisms then hold where one pass, mechanism after mechanism, would give the
  slow minutes to whichever ran in them.
* Peak memory runs in a separate, untimed step. CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``. CPU has no allocator statistic, so the peak of live tensor bytes
  (parameters, gradients, optimizer states and every intermediate) is tracked op by op
  (:class:`attnlab.profiling.LiveTensorTracker`); it cannot see inside compiled graphs, so
  compiled CPU runs report no peak.
* FLOPs are counted by ``FlopCounterMode`` over one training step: they are the FLOPs the
  implementation *executes*. A fused causal kernel counts the ``T (T + 1) / 2`` scores it computes;
  an explicit mask (chunked prefill, a mechanism's dense masked path) counts the whole ``T x S``
  product, so FLOPs (and MFU) can exceed the algorithmic minimum. Elementwise work and the optimizer are not counted.

Every measurement that fails is recorded with its error; the benchmark goes on.

The package, one file a job: :mod:`~attnlab.bench.settings` (the validated ``bench`` section),
:mod:`~attnlab.bench.training`, :mod:`~attnlab.bench.decoding` and :mod:`~attnlab.bench.cache`
(the measurements), :mod:`~attnlab.bench.mechanisms` (all of one mechanism's),
:mod:`~attnlab.bench.reference` (the bare loop against Lightning), :mod:`~attnlab.bench.tables`
and :mod:`~attnlab.bench.plots` (reporting), :mod:`~attnlab.bench.runner` (the run), and
:mod:`~attnlab.bench.harness` (what the measurements share). The instruments they use (timing,
FLOPs, peak memory, the machine) are in :mod:`attnlab.profiling`.
"""

from attnlab.bench.cache import CACHE_FIELDS, measure_cache
from attnlab.bench.decoding import (
    COMPILED_DECODE_FIELDS,
    DECODE_FIELDS,
    LM_HEAD_FIELDS,
    measure_decode,
    measure_lm_head,
)
from attnlab.bench.mechanisms import MECHANISM_FIELDS, bench_mechanism, mechanisms_to_run, pool_rounds
from attnlab.bench.plots import write_plots
from attnlab.bench.reference import REFERENCE_FIELDS, run_reference
from attnlab.bench.runner import run
from attnlab.bench.settings import BENCH_PRECISIONS, GPT2_VOCAB_SIZE, BenchSettings, bench_model_config, load_settings
from attnlab.bench.tables import machine_table, mechanism_tables, reference_tables, write_markdown
from attnlab.bench.training import TRAIN_FIELDS, measure_training

__all__ = [
    "BENCH_PRECISIONS", "CACHE_FIELDS", "COMPILED_DECODE_FIELDS", "DECODE_FIELDS", "GPT2_VOCAB_SIZE", "LM_HEAD_FIELDS",
    "MECHANISM_FIELDS", "REFERENCE_FIELDS", "TRAIN_FIELDS", "BenchSettings", "bench_mechanism",
    "bench_model_config", "load_settings", "machine_table", "measure_cache", "measure_decode", "measure_lm_head",
    "measure_training", "mechanism_tables", "mechanisms_to_run", "pool_rounds", "reference_tables", "run", "run_reference",
    "write_markdown", "write_plots",
]
