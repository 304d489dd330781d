"""stablesr: StableSR super-resolution on a frozen Stable Diffusion, built on Hugging Face diffusers."""

__version__ = "0.1.0"
