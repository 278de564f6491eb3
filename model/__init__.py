"""The Jamba model (hybrid Transformer-Mamba mixture of experts), in plain PyTorch.

``JambaConfig`` describes it in the paper's terms; ``Jamba`` is the language model; the Mamba mixer's
selective scan has a pure-PyTorch path (everywhere) and mamba-ssm kernels (CUDA), chosen in
``model.scan``. ``model.hf`` converts to and from Hugging Face checkpoints. Importing this package does not
import mamba-ssm, transformers or safetensors.
"""

from model.config import JambaConfig, ModelConfigError
from model.jamba import Jamba, JambaOutput

__all__ = ["Jamba", "JambaConfig", "JambaOutput", "ModelConfigError"]
