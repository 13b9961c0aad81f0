"""comfyui-p2p-attention: Prompt-to-Prompt image editing (Hertz et al., arXiv 2208.01626) for ComfyUI."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
