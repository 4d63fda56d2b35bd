"""Load SD1.5 / SDXL pipelines (hub id, local folder, single file or ``tiny:``) and add LoRA."""
from .loader import DiffusionModel, load_model
from .lora import add_lora, load_lora_into, lora_state_dict, save_lora

__all__ = ["DiffusionModel", "load_model", "add_lora", "save_lora", "lora_state_dict", "load_lora_into"]
