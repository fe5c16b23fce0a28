"""The one-step demo model (a diffusers pipeline folder), shipped as package data; demo/README.md reproduces it."""
