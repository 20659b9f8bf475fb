"""Data: one record format for every stage, Qwen3-VL input processing, packing, loading.

records     the record format, JSONL/JSON/Parquet readers, strict errors or counted skips
layouts     other tools' row layouts (chat content parts, verl, ShareGPT, LLaMA-Factory) mapped onto ours
errors      RecordError, the one error of bad input data
chat        Qwen's chat layout and PRISM's <caption><think><answer> response format
images      Qwen3-VL image preprocessing (resize to the patch grid, normalise, patchify)
processing  records -> token ids, pixel values, labels
packing     SFT sequence packing with per-sample isolation
loader      deterministic, resumable, data-parallel-sharded batches
importers   ``prism import``: ShareGPT, LLaMA-Factory and verl files -> record JSONL
synth       the embedded synthetic visual-reasoning task (``python -m megatron_prism.data.synth``)
"""
