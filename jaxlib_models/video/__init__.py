"""Video-to-video editing (StreamV2V, Fairy, FlowVid) and shared video tools.

Subpackages: `video.io` (read/write videos and frame folders, webcam),
`video.synthetic` (photo moved by a known motion, with its true flows),
`video.flow` (bilinear warping, optical-flow estimators) and
`video.metrics` (warp errors, CLIP scores, streaming FPS). They are imported
explicitly (`from jaxlib_models.video import io`), so that importing a method
subpackage does not pull in OpenCV.
"""
