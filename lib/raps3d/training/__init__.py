"""Training and evaluation of Raps-3D: simulated prompts on zoom-out and zoom-in samples of real CT."""
