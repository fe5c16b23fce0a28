"""Floor 1, the core: rectified-flow maths, argument checks, video I/O and resizing, optical flow, metrics and
colour fixes. Imports no other part of cascade-vsr."""
