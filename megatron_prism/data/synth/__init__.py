"""PRISM's embedded task: a synthetic visual-reasoning dataset a laptop can learn in minutes.

Rendered scenes (coloured shapes, bar charts, seven-segment digits) with questions that need both
perception and reasoning, teacher demonstrations in PRISM's ``<caption><think><answer>`` form
(one template; the SFT split carries the teacher's slips, the alignment split none), a tiny trained tokenizer, and a manifest, all reproducible
from one seed. CLI: ``python -m megatron_prism.data.synth --out DIR --seed S``.

API: :func:`generate_dataset` (everything), and the pieces it is made of: scene makers
(:func:`shapes_scene`, :func:`bars_scene`, :func:`digits_scene`, :func:`render_scene`),
questions (:func:`sample_question`, :func:`solve`, :func:`teacher_response`), and the tokenizer
(:func:`train_tokenizer`, :func:`save_tokenizer`).
"""

from megatron_prism.data.synth.generate import (GENERATOR_VERSION, PROFILES, SPLITS, Manifest, SplitProfile,
                                                SynthSizes, generate_dataset, item_key, make_split, sample_item,
                                                split_rng)
from megatron_prism.data.synth.questions import QTYPES, Question, caption, sample_question, solve, teacher_response
from megatron_prism.data.synth.scenes import (COLORS, SHAPES, SIZES, bars_scene, digits_scene, render_scene,
                                              scene_key, shapes_scene)
from megatron_prism.data.synth.tokenizer import (TAG_TOKENS, check_tokenizer, save_tokenizer, special_token_ids,
                                                 train_tokenizer)

__all__ = [
    "GENERATOR_VERSION", "PROFILES", "SPLITS", "Manifest", "SplitProfile", "SynthSizes", "generate_dataset",
    "item_key", "make_split", "sample_item", "split_rng", "QTYPES", "Question", "caption",
    "sample_question", "solve", "teacher_response", "COLORS", "SHAPES", "SIZES", "bars_scene", "digits_scene",
    "render_scene", "scene_key", "shapes_scene", "TAG_TOKENS", "check_tokenizer", "save_tokenizer",
    "special_token_ids", "train_tokenizer",
]
