"""Speech LLMs: the audio path joined to the Megatron LLM (SALM, BESTOW)."""

from ..config import Config
from .bestow import BESTOW
from .salm import SALM
from .speech_llm import SpeechLLM


def build_speech_llm(cfg: Config, **kwargs) -> list[SpeechLLM]:
    """This rank's model chunks (one per virtual pipeline stage) of ``cfg.model.arch``."""
    cls = {"salm": SALM, "bestow": BESTOW}[cfg.model.arch]
    if cfg.parallel.virtual_pipeline_model_parallel_size is None:
        return [cls(cfg, **kwargs)]
    return [cls(cfg, vp_stage=i, **kwargs) for i in range(cfg.parallel.num_model_chunks)]


__all__ = ["BESTOW", "SALM", "SpeechLLM", "build_speech_llm"]
