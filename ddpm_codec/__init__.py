"""ddpm-codec: image compression with a denoising diffusion model (Ho, Jain & Abbeel 2020)."""
__version__ = "0.1.0"
