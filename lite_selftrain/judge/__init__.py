"""The judge: rubrics by name (rubrics.py), a model judging (prompt, response) pairs and an iterate's held-out
answers (local.py), and a fixed model on an OpenAI-compatible server (endpoint.py)."""

from .endpoint import Endpoint, EndpointConfig, is_endpoint
from .local import (
    JUDGE_TEMPLATE,
    MAX_SCORE,
    JudgeConfig,
    Judgment,
    average_score,
    eft_example,
    judge,
    judge_prompt,
    judged_eval,
    parse_score,
)
from .rubrics import RUBRICS, rubric

__all__ = ["Endpoint", "EndpointConfig", "is_endpoint", "JUDGE_TEMPLATE", "MAX_SCORE", "JudgeConfig", "Judgment",
           "average_score", "eft_example", "judge", "judge_prompt", "judged_eval", "parse_score", "RUBRICS", "rubric"]
