"""Training of cascade-vsr (SimpleGVR recipe): pair dataset, timestep samplers, accelerate trainer, calibration.

Submodules are imported on use, so `import cascade_vsr.training` stays cheap.
"""
