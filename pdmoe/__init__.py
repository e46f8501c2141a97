"""pdmoe: language expansion by upcycling to MoE, continued pre-training, and grafting ParamΔ.

Importing pdmoe registers ``MoEConfig`` / ``MoEForCausalLM`` with transformers' Auto classes
and the Triton kernels as the transformers experts implementation ``"pdmoe"``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

import pdmoe.kernels  # noqa: F401  (registers the "pdmoe" experts implementation)
from pdmoe.config import MoEConfig
from pdmoe.modeling import MoECausalLMOutput, MoEForCausalLM

AutoConfig.register(MoEConfig.model_type, MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM, exist_ok=True)

__all__ = ["MoECausalLMOutput", "MoEConfig", "MoEForCausalLM"]
