"""The ComfyUI adapter: thin nodes over the pure core in ``p2p_attention``."""
from .blend_nodes import P2PBlendMask, P2PLocalBlend
from .controller_node import P2PController
from .edit_nodes import P2PRefine, P2PReweight, P2PWordSwap
from .invert_node import P2PDDIMInvert
from .maps_node import P2PAttentionMaps
from .sampler_node import P2PSampler

# Node type names and input names are public API: saved workflows reference them. Never rename.
NODE_CLASS_MAPPINGS = {
    "P2PController": P2PController,
    "P2PWordSwap": P2PWordSwap,
    "P2PRefine": P2PRefine,
    "P2PReweight": P2PReweight,
    "P2PSampler": P2PSampler,
    "P2PLocalBlend": P2PLocalBlend,
    "P2PBlendMask": P2PBlendMask,
    "P2PAttentionMaps": P2PAttentionMaps,
    "P2PDDIMInvert": P2PDDIMInvert,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "P2PController": "P2P Controller",
    "P2PWordSwap": "P2P Word Swap",
    "P2PRefine": "P2P Refine",
    "P2PReweight": "P2P Reweight",
    "P2PSampler": "P2P Shared Noise Sampler",
    "P2PLocalBlend": "P2P Local Blend",
    "P2PBlendMask": "P2P Local Blend Mask",
    "P2PAttentionMaps": "P2P Attention Maps",
    "P2PDDIMInvert": "P2P DDIM Invert",
}
