"""sdlora: train Stable Diffusion LoRAs from a folder of images, preview them at any strength, export everywhere."""

__version__ = "0.1.0"
