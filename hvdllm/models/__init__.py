"""GPT models: one shape (config.py), a PyTorch module (gpt.py) and a Keras model (gpt_keras.py)."""
from hvdllm.models.config import PRESETS, GPTConfig

__all__ = ["GPTConfig", "PRESETS"]
