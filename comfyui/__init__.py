"""StableSR nodes for ComfyUI: real-world super-resolution with the `stablesr` package.

ComfyUI imports this folder as a custom node pack (``custom_nodes/stablesr``) and reads the two mappings below.
The nodes need the `stablesr` package in ComfyUI's Python environment; without it the import fails with a message
that says how to install it.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
