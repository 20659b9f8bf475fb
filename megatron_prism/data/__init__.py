"""Data: one record format for every stage, Qwen3-VL input processing, packing, loading.

records     the record format, JSONL/Parquet readers, strict errors or counted skips
chat        Qwen's chat layout and PRISM's <caption><think><answer> response format
images      Qwen3-VL image preprocessing (resize to the patch grid, normalise, patchify)
processing  records -> token ids, pixel values, labels
packing     SFT sequence packing with per-sample isolation
loader      deterministic, resumable, data-parallel-sharded batches
importers   PRISM's published data layouts -> records
synth       the embedded synthetic visual-reasoning task (``python -m megatron_prism.data.synth``)
"""
