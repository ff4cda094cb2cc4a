"""The evaluation stage (issue 10): generate images of fixed prompt sets from several checkpoints, judge
them automatically with the curation pipeline's own scorers and distribution metrics, and (annotation/)
let people compare them side by side.

    prompts.py       PartiPrompts / DrawBench / a file, per-category sampling, selection/report split
    generate.py      the same prompts and seeds for every checkpoint -> images + manifest
    judges.py        per-image scores, bootstrap CIs over prompts, KID / CMMD -> judges.parquet, summary.json
    distribution.py  KID, CMMD and FD as pure functions, ImageNet features, reference image sets
    sample_score.py  the score of quality-tuning's fixed-prompt samples (early stopping)
"""

from model.evaluation.errors import EvaluationError
from model.evaluation.layout import EvalLayout
from model.evaluation.prompts import load_prompts, split_prompts
from model.evaluation.sample_score import PipelineSampleScorer
from model.evaluation.schema import read_manifest

__all__ = ["EvalLayout", "EvaluationError", "PipelineSampleScorer", "load_prompts", "read_manifest", "split_prompts"]
